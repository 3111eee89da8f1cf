"""Reader for the MVTec AD folder layout, shared by MPDD, BTAD, MVTec LOCO and our synthetic set.

    <root>/<category>/train/good/*            normal training images
    <root>/<category>/validation/good/*       (MVTec LOCO) more normal images, read as "train"
    <root>/<category>/test/good/*             normal test images
    <root>/<category>/test/<defect>/*         anomalous test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.<ext> | <stem>.<ext> | <stem>/*.<ext>

The normal folder is "good" (BTAD calls it "ok"; both are accepted and reported as "good").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from anomaly_rl.data.boxes import BoxConfig, boxes_from_mask
from anomaly_rl.data.errors import DataError, ErrorPolicy
from anomaly_rl.data.files import image_size, is_image_file, list_images, read_mask_union
from anomaly_rl.data.records import ANOMALOUS, NORMAL, Sample

log = logging.getLogger(__name__)

NORMAL_DIRS: tuple[str, ...] = ("good", "ok")
LAYOUT = (
    "<root>/<category>/train/good/*.png, <root>/<category>/test/<good|defect>/*.png, "
    "<root>/<category>/ground_truth/<defect>/<stem>_mask.png"
)
# Reader split folders and the split they feed; LOCO's validation images are normal-only and
# never part of the test set, so they join the training pool.
_SPLIT_DIRS: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "train"), ("test", "test"))


def check_categories(requested: Sequence[str] | None, available: Sequence[str], where: str) -> list[str]:
    """The requested categories in the given order, or all available; unknown names are an error."""
    if requested is None:
        return list(available)
    if isinstance(requested, str):
        requested = [requested]
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise DataError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in {where}; "
                        f"available: {sorted(available)}")
    return list(dict.fromkeys(requested))


def mvtec_categories(root: str | Path) -> list[str]:
    """Category folders under an MVTec-layout root (those holding a train/ or test/ folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist (expected the MVTec layout: {LAYOUT})")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))


def _mask_index(folder: Path) -> dict[str, list[Path]]:
    """stem -> mask files, covering `<stem>_mask.ext`, `<stem>.ext` and LOCO's `<stem>/` folders."""
    index: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return index
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            index.setdefault(entry.name, []).extend(list_images(entry))
        elif is_image_file(entry):
            stem = entry.stem[: -len("_mask")] if entry.stem.endswith("_mask") else entry.stem
            # An explicit <stem>_mask file wins over a same-stem file, which might be something else.
            if entry.stem.endswith("_mask") or stem not in index:
                index[stem] = [entry]
    return index


def read_mvtec(
    root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    boxes: BoxConfig | dict | None = None,
    on_error: str = "raise",
    skipped: list[DataError] | None = None,
    normal_dirs: Sequence[str] = NORMAL_DIRS,
) -> list[Sample]:
    """Every image of the chosen categories as a `Sample` (split "train" or "test").

    `skipped`, when given, receives the per-sample errors passed over under on_error="skip".
    """
    root = Path(root)
    box_config = BoxConfig.from_any(boxes)
    policy = ErrorPolicy(on_error, skipped)
    available = mvtec_categories(root)
    if not available:
        raise DataError(f"no category folders under {root} (expected the MVTec layout: {LAYOUT})")
    samples: list[Sample] = []
    for category in check_categories(categories, available, str(root)):
        found, read = _read_category(root / category, category, box_config, policy, tuple(normal_dirs))
        if found == 0:
            raise DataError(f"category {category!r} under {root} has no images "
                            f"(looked in {root / category}/train/*/ and test/*/; layout: {LAYOUT})")
        samples.extend(read)
    policy.report(f"read_mvtec({root})")
    return samples


def _read_category(
    folder: Path, category: str, box_config: BoxConfig, policy: ErrorPolicy, normal_dirs: tuple[str, ...]
) -> tuple[int, list[Sample]]:
    """(number of image files seen, samples read) for one category folder."""
    seen = 0
    samples: list[Sample] = []
    for split_dir, split in _SPLIT_DIRS:
        split_folder = folder / split_dir
        if not split_folder.is_dir():
            continue
        for defect_folder in sorted((d for d in split_folder.iterdir() if d.is_dir()), key=lambda d: d.name):
            images = list_images(defect_folder)
            seen += len(images)
            is_normal = defect_folder.name in normal_dirs
            masks = {} if is_normal else _mask_index(folder / "ground_truth" / defect_folder.name)
            for path in images:
                try:
                    samples.append(_read_one(path, category, defect_folder.name, split, is_normal, masks,
                                             folder, box_config))
                except DataError as error:
                    policy.handle(error)
    return seen, samples


def _read_one(
    path: Path,
    category: str,
    defect: str,
    split: str,
    is_normal: bool,
    masks: dict[str, list[Path]],
    folder: Path,
    box_config: BoxConfig,
) -> Sample:
    size = image_size(path)
    if is_normal:
        return Sample(image_path=str(path), label=NORMAL, category=category, defect_type="good",
                      mask_path=None, boxes=(), image_size=size, split=split)
    mask_files = masks.get(path.stem, [])
    if not mask_files:
        gt = folder / "ground_truth" / defect
        raise DataError(f"anomalous image {path} has no mask (looked for {gt}/{path.stem}_mask.png, "
                        f"{gt}/{path.stem}.png and {gt}/{path.stem}/*.png)")
    mask = read_mask_union(mask_files)
    mask_size = (mask.shape[1], mask.shape[0])
    if mask_size != size:
        raise DataError(f"mask {mask_files[0]} is {mask_size[0]}x{mask_size[1]} but its image {path} is "
                        f"{size[0]}x{size[1]}")
    boxes = boxes_from_mask(mask, box_config.dilation, box_config.min_area)
    if not boxes:
        # Kept (the label is still right), but worth a look: an empty mask or a min_area too large.
        log.warning("anomalous image %s has no box left (empty mask or all components < min_area=%d)",
                    path, box_config.min_area)
    # A LOCO folder of masks is recorded by its folder so the union can be rebuilt from one path.
    mask_path = mask_files[0].parent if len(mask_files) > 1 or mask_files[0].parent.name == path.stem \
        else mask_files[0]
    return Sample(image_path=str(path), label=ANOMALOUS, category=category, defect_type=defect,
                  mask_path=str(mask_path), boxes=tuple(boxes), image_size=size, split=split)
