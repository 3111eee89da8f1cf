from __future__ import annotations

from collections import Counter
from pathlib import Path

from anomaly_rl.data.splits import make_splits
from anomaly_rl.data.visa import read_visa


def test_reads_the_fixture(tiny_visa: Path) -> None:
    samples = read_visa(tiny_visa)
    assert Counter((s.category, s.split, s.label) for s in samples) == {
        ("candle", "train", "normal"): 2, ("candle", "test", "normal"): 1, ("candle", "test", "anomalous"): 1,
        ("pcb1", "train", "normal"): 1, ("pcb1", "test", "normal"): 1, ("pcb1", "test", "anomalous"): 1,
    }
    by_cat = {s.category: s for s in samples if s.is_anomalous}
    # Hand-placed regions (grey value 1) in the fixture; dilation 0 keeps the two candle defects apart.
    assert sorted(by_cat["candle"].boxes) == [(4.0, 2.0, 9.0, 7.0), (14.0, 10.0, 15.0, 11.0)]
    assert by_cat["pcb1"].boxes == ((0.0, 0.0, 3.0, 2.0),)
    assert all(s.image_size == (16, 12) for s in samples)
    assert all(s.defect_type == ("anomaly" if s.is_anomalous else "good") for s in samples)
    assert all((s.mask_path is None) != s.is_anomalous for s in samples)
    assert all(Path(s.image_path).is_file() for s in samples)


def test_box_settings_apply(tiny_visa: Path) -> None:
    candle = [s for s in read_visa(tiny_visa, boxes={"dilation": 3}) if s.is_anomalous and s.category == "candle"]
    assert candle[0].boxes == ((4.0, 2.0, 15.0, 11.0),)  # gap of 5 px <= 2 * 3: merged, still tight
    candle = [s for s in read_visa(tiny_visa, boxes={"min_area": 2}) if s.is_anomalous and s.category == "candle"]
    assert candle[0].boxes == ((4.0, 2.0, 9.0, 7.0),)


def test_category_subset_and_custom_split_file(tiny_visa: Path) -> None:
    assert {s.category for s in read_visa(tiny_visa, categories=["pcb1"])} == {"pcb1"}
    (tiny_visa / "split_csv" / "1cls.csv").rename(tiny_visa / "mine.csv")
    assert len(read_visa(tiny_visa, split_csv="mine.csv")) == 7


def test_visa_one_shot_split(tiny_visa: Path) -> None:
    splits = make_splits(read_visa(tiny_visa), shots=1, seed=0)
    assert Counter((s.category, s.label) for s in splits.train) == {
        ("candle", "normal"): 1, ("candle", "anomalous"): 1, ("pcb1", "normal"): 1, ("pcb1", "anomalous"): 1}
    # The only anomalous images trained, so evaluation holds the test normals alone.
    assert Counter((s.category, s.label) for s in splits.test) == {("candle", "normal"): 1, ("pcb1", "normal"): 1}
