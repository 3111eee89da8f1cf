"""Fixtures for the data floor's tests, including an independent box reference implementation.

Helpers are served as fixtures (not imported) so the tests do not depend on how the lead lays
out test packages.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_rl.data.synthetic import SyntheticConfig, ensure_synthetic

REPO = Path(__file__).resolve().parents[2]
MVTEC_SAMPLE = REPO / ".." / "shared" / "datasets" / "mvtec_ad_sample"

# Small enough to generate in well under a second, big enough for every category and defect type.
TINY_SYNTHETIC = {"image_size": 64, "train_good": 4, "test_good": 3, "test_anomalous": 8,
                  "defect_size": [8, 24], "seed": 3}


def reference_boxes(mask: np.ndarray, dilation: int = 0, min_area: int = 0) -> list[tuple[float, ...]]:
    """Boxes by a different algorithm from the product's: run-length labelling with union-find
    and a dilation by explicit shifts, then tight bounds over each component's undilated pixels."""
    binary = np.asarray(mask)
    if binary.ndim == 3:
        binary = (binary > 0).any(axis=2)
    binary = binary > 0
    height, width = binary.shape
    grown = binary
    if dilation:
        padded = np.pad(binary, dilation)
        grown = np.zeros_like(binary)
        for dy in range(2 * dilation + 1):
            for dx in range(2 * dilation + 1):
                grown |= padded[dy:dy + height, dx:dx + width]
    runs: list[tuple[int, int, int]] = []  # (row, start, stop) with stop exclusive
    rows_runs: list[list[int]] = []
    for r in range(height):
        edges = np.diff(np.concatenate([[0], grown[r].astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        rows_runs.append(list(range(len(runs), len(runs) + len(starts))))
        runs += [(r, int(a), int(b)) for a, b in zip(starts, stops, strict=True)]
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(height - 1):
        for a in rows_runs[r]:
            for b in rows_runs[r + 1]:
                # 8-connected: runs touch if they overlap or meet diagonally.
                if runs[b][1] <= runs[a][2] and runs[a][1] <= runs[b][2]:
                    parent[find(a)] = find(b)
    bounds: dict[int, list[int]] = {}
    for i, (r, start, stop) in enumerate(runs):
        cols = np.flatnonzero(binary[r, start:stop]) + start
        if len(cols) == 0:
            continue
        b = bounds.setdefault(find(i), [width, height, -1, -1, 0])
        b[0], b[1] = min(b[0], int(cols[0])), min(b[1], r)
        b[2], b[3] = max(b[2], int(cols[-1]) + 1), max(b[3], r + 1)
        b[4] += len(cols)
    return sorted((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in bounds.values() if b[4] >= min_area)


@pytest.fixture(scope="session")
def ref_boxes() -> Callable[..., list[tuple[float, ...]]]:
    return reference_boxes


@pytest.fixture(scope="session")
def mvtec_sample() -> Path:
    if not MVTEC_SAMPLE.is_dir():
        pytest.skip("../shared/datasets/mvtec_ad_sample is absent")
    return MVTEC_SAMPLE.resolve()


@pytest.fixture(scope="session")
def tiny_synthetic_config() -> SyntheticConfig:
    return SyntheticConfig.from_mapping(TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic_config: SyntheticConfig) -> Path:
    """One generated tiny dataset shared by the tests that only read it."""
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "data", tiny_synthetic_config, progress=False)


def save_png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_mvtec(root: Path, category: str = "widget", size: tuple[int, int] = (20, 16)) -> dict[str, Path]:
    """A tiny MVTec-layout category: 2 train/good, 1 test/good, 2 test/dent with known masks.

    dent/000 has one defect at x 2..5, y 3..4 (box (2, 3, 6, 5)); dent/001 has two, (10, 8, 12, 12)
    and a single pixel (0, 0, 1, 1), in grey level 7 (MVTec LOCO style codes).
    """
    w, h = size
    paths: dict[str, Path] = {}
    rng = np.random.default_rng(0)
    for name in ("train/good/000", "train/good/001", "test/good/000", "test/dent/000", "test/dent/001"):
        paths[name] = save_png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), root / category / f"{name}.png")
    m0 = np.zeros((h, w), np.uint8)
    m0[3:5, 2:6] = 255
    m1 = np.zeros((h, w), np.uint8)
    m1[8:12, 10:12] = 7
    m1[0, 0] = 7
    paths["mask0"] = save_png(m0, root / category / "ground_truth" / "dent" / "000_mask.png")
    paths["mask1"] = save_png(m1, root / category / "ground_truth" / "dent" / "001_mask.png")
    return paths


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    return tmp_path / "mvtec", make_mvtec(tmp_path / "mvtec")


def make_visa(root: Path) -> None:
    """A tiny VisA: objects candle (2 train normal, 1 test normal, 1 anomaly) and pcb1 (1 + 1 + 1).

    Masks use grey value 1 (VisA stores small label codes, not 255). Boxes: candle anomaly
    (4, 2, 9, 7) and (14, 10, 15, 11); pcb1 anomaly (0, 0, 3, 2).
    """
    rows = ["object,split,label,image,mask"]
    rng = np.random.default_rng(1)

    def image(obj: str, kind: str, name: str) -> str:
        rel = f"{obj}/Data/Images/{kind}/{name}.JPG"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / rel, format="JPEG")
        return rel

    def mask(obj: str, name: str, regions: list[tuple[int, int, int, int]]) -> str:
        rel = f"{obj}/Data/Masks/Anomaly/{name}.png"
        array = np.zeros((12, 16), np.uint8)
        for x1, y1, x2, y2 in regions:
            array[y1:y2, x1:x2] = 1
        save_png(array, root / rel)
        return rel

    for obj, n_train in (("candle", 2), ("pcb1", 1)):
        for i in range(n_train):
            rows.append(f"{obj},train,normal,{image(obj, 'Normal', f'{i:03d}')},")
        rows.append(f"{obj},test,normal,{image(obj, 'Normal', '100')},")
    rows.append(f"candle,test,anomaly,{image('candle', 'Anomaly', '000')},"
                f"{mask('candle', '000', [(4, 2, 9, 7), (14, 10, 15, 11)])}")
    rows.append(f"pcb1,test,anomaly,{image('pcb1', 'Anomaly', '000')},{mask('pcb1', '000', [(0, 0, 3, 2)])}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def tiny_visa(tmp_path: Path) -> Path:
    make_visa(tmp_path / "visa")
    return tmp_path / "visa"


@pytest.fixture(scope="session")
def builders() -> dict[str, Callable[..., object]]:
    """Fixture builders for tests that need to corrupt a dataset after building it."""
    return {"mvtec": make_mvtec, "visa": make_visa, "png": save_png}
