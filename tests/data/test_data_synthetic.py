from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.synthetic import (
    CATEGORIES,
    COMBINED,
    DEFECT_TYPES,
    GENERATOR_VERSION,
    SyntheticConfig,
    ensure_synthetic,
    generate,
    main,
    read_synthetic,
    render,
)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path, tiny_synthetic: Path, tiny_synthetic_config) -> None:
    again = generate(tmp_path / "again", tiny_synthetic_config, progress=False)
    first, second = tree(tiny_synthetic), tree(again)
    assert first.keys() == second.keys() and len(first) > 50
    assert all(first[name] == second[name] for name in first)


def test_another_seed_gives_other_images(tmp_path: Path, tiny_synthetic: Path, tiny_synthetic_config) -> None:
    other = SyntheticConfig.from_mapping({**tiny_synthetic_config.to_dict(), "seed": 4, "test_anomalous": 0})
    generated = tree(generate(tmp_path / "other", other, progress=False))
    original = tree(tiny_synthetic)
    shared = [n for n in generated if n.endswith(".png") and n in original]
    assert shared and all(generated[n] != original[n] for n in shared)


def test_layout_counts_and_meta(tiny_synthetic: Path, tiny_synthetic_config: SyntheticConfig) -> None:
    cfg = tiny_synthetic_config
    samples = read_synthetic(tiny_synthetic)
    counts = Counter((s.category, s.split, s.label) for s in samples)
    for category in CATEGORIES:
        assert counts[(category, "train", "normal")] == cfg.train_good
        assert counts[(category, "test", "normal")] == cfg.test_good
        assert counts[(category, "test", "anomalous")] == cfg.test_anomalous
    assert {s.defect_type for s in samples if s.is_anomalous} <= {*DEFECT_TYPES, COMBINED}
    meta = json.loads((tiny_synthetic / "meta.json").read_text())
    assert meta["version"] == GENERATOR_VERSION and meta["config"] == cfg.to_dict()
    assert all(s.image_size == (cfg.image_size, cfg.image_size) for s in samples)


def test_boxes_match_masks_and_every_defective_image_has_one(tiny_synthetic: Path, ref_boxes) -> None:
    for s in read_synthetic(tiny_synthetic, boxes={"dilation": 1, "min_area": 4}):
        if not s.is_anomalous:
            assert s.boxes == () and s.mask_path is None
            continue
        assert s.boxes, s.image_path
        mask = np.asarray(Image.open(s.mask_path))
        assert set(np.unique(mask)) <= {0, 255}
        assert sorted(s.boxes) == ref_boxes(mask, 1, 4)


def test_masks_are_exact_and_defects_visible(tiny_synthetic_config: SyntheticConfig) -> None:
    cfg = SyntheticConfig.from_mapping({**tiny_synthetic_config.to_dict(), "image_size": 112,
                                        "defect_size": [12, 40]})
    seen_types: set[str] = set()
    for category in cfg.categories:
        normal = render(cfg, category, "train_good", 0)
        assert not normal.mask.any() and np.array_equal(normal.image, normal.clean)
        for index in range(12):
            r = render(cfg, category, "test_anomalous", index)
            seen_types.update(r.defect_types)
            assert cfg.min_defects <= len(r.defect_types) <= cfg.max_defects
            diff = np.abs(r.image.astype(int) - r.clean.astype(int)).max(axis=2)
            # Nothing outside the mask changed; inside, the change is clearly visible on average.
            assert not diff[~r.mask].any(), (category, index)
            assert diff[r.mask].mean() > 40, (category, index, r.defect_types, diff[r.mask].mean())
            ys, xs = np.nonzero(r.mask)
            assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= 6
    assert seen_types == set(DEFECT_TYPES)


def test_rendering_is_per_image_deterministic(tiny_synthetic_config: SyntheticConfig) -> None:
    a = render(tiny_synthetic_config, "pill", "test_anomalous", 5)
    b = render(tiny_synthetic_config, "pill", "test_anomalous", 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    # Seeded by category too: the same index of another category is another image.
    assert not np.array_equal(a.image, render(tiny_synthetic_config, "screw", "test_anomalous", 5).image)


def test_mixed_types_go_to_combined(tmp_path: Path) -> None:
    cfg = SyntheticConfig(image_size=64, categories=("metal",), train_good=0, test_good=0, test_anomalous=10,
                          defect_size=(8, 16), min_defects=2, max_defects=3, mixed_fraction=1.0)
    root = generate(tmp_path / "mixed", cfg, progress=False)
    for index in range(10):
        types = render(cfg, "metal", "test_anomalous", index).defect_types
        folder = types[0] if len(set(types)) == 1 else COMBINED
        assert (root / "metal" / "test" / folder / f"{index:04d}.png").is_file()
        assert (root / "metal" / "ground_truth" / folder / f"{index:04d}_mask.png").is_file()
    assert (root / "metal" / "test" / COMBINED).is_dir()


def test_ensure_reuses_a_matching_copy_and_regenerates_a_stale_one(tmp_path: Path) -> None:
    cfg = SyntheticConfig(image_size=48, categories=("fabric",), train_good=1, test_good=1, test_anomalous=1,
                          defect_size=(6, 12))
    root = ensure_synthetic(tmp_path / "s", cfg, progress=False)
    marker = root / "fabric" / "marker.txt"
    marker.write_text("still here")
    ensure_synthetic(root, cfg, progress=False)
    assert marker.exists()  # matching meta: nothing regenerated
    bigger = SyntheticConfig.from_mapping({**cfg.to_dict(), "train_good": 2})
    ensure_synthetic(root, bigger, progress=False)
    assert not marker.exists() and len(list((root / "fabric" / "train" / "good").iterdir())) == 2


def test_ensure_never_deletes_foreign_folders(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="refusing to overwrite"):
        ensure_synthetic(foreign, SyntheticConfig(image_size=48, defect_size=(6, 12)), progress=False)
    assert (foreign / "precious.txt").exists()
    with pytest.raises(DataError, match="no meta.json"):
        read_synthetic(foreign)


@pytest.mark.parametrize(
    ("values", "setting"),
    [({"colour": 1}, "colour"), ({"min_defects": 0}, "min_defects"), ({"categories": ["wood"]}, "categories"),
     ({"defect_size": [30, 10]}, "defect_size"), ({"contrast": [0, 0.5]}, "contrast"),
     ({"defect_types": ["dent"]}, "defect_types")],
)
def test_bad_settings_name_themselves(values: dict, setting: str) -> None:
    with pytest.raises(DataError, match=setting):
        SyntheticConfig.from_mapping(values)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = [f"out={out}", "image_size=48", "categories=[pill]", "train_good=2", "test_good=1", "test_anomalous=2",
            "defect_size=[6,12]"]
    assert main(args) == 0
    assert len(list((out / "pill" / "train" / "good").glob("*.png"))) == 2
    assert json.loads((out / "meta.json").read_text())["config"]["categories"] == ["pill"]
    assert main([f"out={out}", "image_size=8"]) == 1
    assert "image_size" in capsys.readouterr().err
