"""Reader for VisA through its split file.

    <root>/split_csv/1cls.csv   columns: object, split (train|test), label (normal|anomaly),
                                image, mask (paths relative to <root>; mask empty for normals)
    images  <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    masks   <root>/<object>/Data/Masks/Anomaly/*.png

The split file names no defect type, so anomalous samples get defect_type "anomaly".
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from anomaly_rl.data.boxes import BoxConfig, boxes_from_mask
from anomaly_rl.data.errors import DataError, ErrorPolicy
from anomaly_rl.data.files import image_size, read_mask
from anomaly_rl.data.mvtec import check_categories
from anomaly_rl.data.records import ANOMALOUS, NORMAL, Sample

REQUIRED_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
DEFAULT_SPLIT_CSV = "split_csv/1cls.csv"
_LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS, "anomalous": ANOMALOUS}
_SPLITS = ("train", "test")


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(f"split file {csv_path} lacks column(s) {missing}; it has {columns}, "
                                f"needs {list(REQUIRED_COLUMNS)}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read split file {csv_path}: {exc}") from exc
    if not rows:
        raise DataError(f"split file {csv_path} has a header but no rows")
    return rows


def read_visa(
    root: str | Path,
    *,
    split_csv: str = DEFAULT_SPLIT_CSV,
    categories: Sequence[str] | None = None,
    boxes: BoxConfig | dict | None = None,
    on_error: str = "raise",
    skipped: list[DataError] | None = None,
) -> list[Sample]:
    """Every row of the split file for the chosen objects, as `Sample`s in file order."""
    root = Path(root)
    box_config = BoxConfig.from_any(boxes)
    policy = ErrorPolicy(on_error, skipped)
    if not root.is_dir():
        raise DataError(f"VisA root {root} does not exist (expected <root>/{DEFAULT_SPLIT_CSV} and "
                        f"<root>/<object>/Data/Images/{{Normal,Anomaly}}/*.JPG)")
    csv_path = root / split_csv
    if not csv_path.is_file():
        raise DataError(f"VisA split file {csv_path} not found (set data.reader_options.split_csv "
                        f"if it lives elsewhere)")
    rows = _read_rows(csv_path)
    available = list(dict.fromkeys(row["object"] for row in rows))
    chosen = set(check_categories(categories, available, str(csv_path)))
    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["object"] not in chosen:
            continue
        try:
            samples.append(_read_row(root, row, f"{csv_path}:{line}", box_config))
        except DataError as error:
            policy.handle(error)
    policy.report(f"read_visa({root})")
    return samples


def _read_row(root: Path, row: dict[str, str], where: str, box_config: BoxConfig) -> Sample:
    label = _LABELS.get(row["label"].lower())
    if label is None:
        raise DataError(f"{where}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
    split = row["split"].lower()
    if split not in _SPLITS:
        raise DataError(f"{where}: split {row['split']!r} is neither 'train' nor 'test'")
    if not row["image"]:
        raise DataError(f"{where}: empty image path")
    image_path = root / row["image"]
    if not image_path.is_file():
        raise DataError(f"{where}: image {image_path} not found")
    size = image_size(image_path)
    if label == NORMAL:
        return Sample(image_path=str(image_path), label=NORMAL, category=row["object"], defect_type="good",
                      mask_path=None, boxes=(), image_size=size, split=split)
    if not row["mask"]:
        raise DataError(f"{where}: anomalous image {image_path} has no mask (empty 'mask' column)")
    mask_path = root / row["mask"]
    if not mask_path.is_file():
        raise DataError(f"{where}: anomalous image {image_path} has no mask: {mask_path} not found")
    mask = read_mask(mask_path)
    if (mask.shape[1], mask.shape[0]) != size:
        raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                        f"{size[0]}x{size[1]}")
    boxes = boxes_from_mask(mask, box_config.dilation, box_config.min_area)
    return Sample(image_path=str(image_path), label=ANOMALOUS, category=row["object"], defect_type="anomaly",
                  mask_path=str(mask_path), boxes=tuple(boxes), image_size=size, split=split)
