from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.mvtec import read_mvtec

# Counted from the folder (and its README): (category, split, defect) -> images.
SAMPLE_COUNTS = {
    ("bottle", "train", "good"): 6, ("bottle", "test", "good"): 5, ("bottle", "test", "broken_large"): 6,
    ("bottle", "test", "broken_small"): 6, ("bottle", "test", "contamination"): 6,
    ("grid", "train", "good"): 6, ("grid", "test", "good"): 3, ("grid", "test", "bent"): 3,
    ("grid", "test", "broken"): 2, ("grid", "test", "glue"): 2, ("grid", "test", "metal_contamination"): 2,
    ("grid", "test", "thread"): 2,
}
MVTEC_BOXES = {"dilation": 4, "min_area": 16}  # conf/data/mvtec.yaml's defaults


@pytest.fixture(scope="module")
def sample_read(mvtec_sample: Path):
    return read_mvtec(mvtec_sample, boxes=MVTEC_BOXES)


def test_real_sample_counts(sample_read) -> None:
    assert Counter((s.category, s.split, s.defect_type) for s in sample_read) == SAMPLE_COUNTS
    assert all(s.label == ("normal" if s.defect_type == "good" else "anomalous") for s in sample_read)


def test_real_sample_boxes_inside_images_and_only_on_defects(sample_read) -> None:
    for s in sample_read:
        w, h = s.image_size
        with Image.open(s.image_path) as image:
            assert image.size == (w, h)
        if s.is_anomalous:
            assert s.boxes, s.image_path
            assert s.mask_path and Path(s.mask_path).name == Path(s.image_path).stem + "_mask.png"
            for x1, y1, x2, y2 in s.boxes:
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        else:
            assert s.boxes == () and s.mask_path is None


@pytest.mark.parametrize("boxes", [MVTEC_BOXES, {"dilation": 0, "min_area": 0}])
def test_real_sample_boxes_match_masks(mvtec_sample: Path, ref_boxes, boxes: dict) -> None:
    samples = read_mvtec(mvtec_sample, boxes=boxes)
    for s in samples:
        if not s.is_anomalous:
            continue
        mask = np.asarray(Image.open(s.mask_path))
        assert sorted(s.boxes) == ref_boxes(mask, boxes["dilation"], boxes["min_area"]), s.image_path


def test_real_sample_grey_images_report_their_size(sample_read) -> None:
    grid = [s for s in sample_read if s.category == "grid"]
    assert {s.image_size for s in grid} == {(1024, 1024)}
    assert {s.image_size for s in sample_read if s.category == "bottle"} == {(900, 900)}


def test_category_selection(mvtec_sample: Path) -> None:
    only = read_mvtec(mvtec_sample, categories=["grid"])
    assert {s.category for s in only} == {"grid"} and len(only) == 6 + 3 + 11
    with pytest.raises(DataError, match=r"unknown category \['carpet'\].*available: \['bottle', 'grid'\]"):
        read_mvtec(mvtec_sample, categories=["carpet"])


def test_tiny_layout_boxes_and_fields(tiny_mvtec) -> None:
    root, paths = tiny_mvtec
    samples = {Path(s.image_path).relative_to(root).as_posix(): s for s in read_mvtec(root)}
    assert set(samples) == {"widget/train/good/000.png", "widget/train/good/001.png", "widget/test/good/000.png",
                            "widget/test/dent/000.png", "widget/test/dent/001.png"}
    dent0, dent1 = samples["widget/test/dent/000.png"], samples["widget/test/dent/001.png"]
    assert dent0.boxes == ((2.0, 3.0, 6.0, 5.0),)
    assert sorted(dent1.boxes) == [(0.0, 0.0, 1.0, 1.0), (10.0, 8.0, 12.0, 12.0)]
    assert dent1.defect_type == "dent" and dent1.split == "test" and dent1.image_size == (20, 16)
    assert samples["widget/train/good/000.png"].split == "train"
    # min_area drops the one-pixel grey-code fragment.
    by_name = {Path(s.image_path).name + s.defect_type: s for s in read_mvtec(root, boxes={"min_area": 2})}
    assert by_name["001.pngdent"].boxes == ((10.0, 8.0, 12.0, 12.0),)


def test_same_stem_masks_jpg_images_and_btad_ok_folders(tmp_path: Path, builders) -> None:
    save = builders["png"]
    root = tmp_path / "btad"
    save(np.zeros((8, 8, 3), np.uint8), root / "01" / "train" / "ok" / "0000.png")
    (root / "01" / "test" / "ko").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "01" / "test" / "ko" / "0005.JPG", format="JPEG")
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 4:7] = 255
    save(mask, root / "01" / "ground_truth" / "ko" / "0005.png")  # BTAD: no "_mask" suffix
    samples = read_mvtec(root)
    assert [(s.defect_type, s.label, s.boxes) for s in samples] == [
        ("good", "normal", ()), ("ko", "anomalous", ((4.0, 1.0, 7.0, 3.0),))]


def test_loco_mask_folders_are_united(tmp_path: Path, builders) -> None:
    save = builders["png"]
    root = tmp_path / "loco"
    save(np.zeros((10, 10, 3), np.uint8), root / "box" / "train" / "good" / "000.png")
    save(np.zeros((10, 10, 3), np.uint8), root / "box" / "validation" / "good" / "000.png")
    save(np.zeros((10, 10, 3), np.uint8), root / "box" / "test" / "logical_anomalies" / "000.png")
    first, second = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    first[0:2, 0:2] = 200
    second[1:3, 1:4] = 120  # overlaps the first: the union is one defect
    save(first, root / "box" / "ground_truth" / "logical_anomalies" / "000" / "000.png")
    save(second, root / "box" / "ground_truth" / "logical_anomalies" / "000" / "001.png")
    samples = read_mvtec(root)
    assert Counter(s.split for s in samples) == {"train": 2, "test": 1}
    anomalous = [s for s in samples if s.is_anomalous][0]
    assert anomalous.boxes == ((0.0, 0.0, 4.0, 3.0),)
    assert Path(anomalous.mask_path).name == "000" and Path(anomalous.mask_path).is_dir()
