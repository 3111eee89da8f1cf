"""read_mmad on the drawn fixture (tests/mmad/fixture.py): every number below is counted by hand."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.mmad import (
    MmadFileNotFoundError,
    MmadFilterError,
    MmadFormatError,
    anomaly_detection_letters,
    read_mmad,
    read_mmad_samples,
)
from tests.mmad.fixture import MmadFixture, build_mmad_fixture

BOTTLE_BAD = "DS-MVTec/bottle/image/broken_large/000.png"
BOTTLE_GOOD = "DS-MVTec/bottle/image/good/000.png"
CANDLE_BAD = "VisA/candle/test/bad/000.JPG"
CANDLE_GOOD = "VisA/candle/test/good/001.JPG"
BOX_LOGICAL = "MVTec-LOCO/breakfast_box/test/logical_anomalies/000.png"
BOX_GOOD = "MVTec-LOCO/breakfast_box/test/good/000.png"
BOX_NO_MASK = "MVTec-LOCO/breakfast_box/test/structural_anomalies/001.png"


@pytest.fixture
def fx(tmp_path: Path) -> MmadFixture:
    return build_mmad_fixture(tmp_path)


def _samples_by_key(fx: MmadFixture, **kwargs: object) -> dict[str, object]:
    data = read_mmad(fx.root, **kwargs)
    return {os.path.relpath(s.image_path, fx.root).replace(os.sep, "/"): s for s in data.samples}


# --- reading everything -----------------------------------------------------------------------


def test_reads_every_question_with_its_fields(fx: MmadFixture) -> None:
    data = read_mmad(fx.root)
    assert len(data.items) == 22 and data.skipped == 0
    assert Counter(i.question_type for i in data.items) == {
        "Anomaly Detection": 7,
        "Defect Classification": 2,
        "Defect Localization": 2,
        "Defect Description": 2,
        "Defect Analysis": 1,
        "Object Classification": 3,
        "Object Structure": 3,
        "Object Details": 2,
    }
    assert Counter(i.dataset for i in data.items) == {"DS-MVTec": 11, "VisA": 5, "MVTec-LOCO": 6}
    assert data.datasets == ["DS-MVTec", "VisA", "MVTec-LOCO"]  # file order

    first = data.items[0]
    assert first.image_key == BOTTLE_BAD
    assert Path(first.image_path) == fx.root / BOTTLE_BAD and Path(first.image_path).is_absolute()
    assert (first.dataset, first.category, first.index) == ("DS-MVTec", "bottle", 0)
    assert first.question == "Is there any defect in the object?"
    assert first.options == {"A": "Yes.", "B": "No."} and first.answer == "A"
    assert first.mask_path == str(fx.root / "DS-MVTec/bottle/ground_truth/broken_large/000_mask.png")
    assert not first.is_normal

    details = [i for i in data.items if i.question_type == "Object Details"]
    assert [(i.image_key, i.index, i.answer, i.score_type) for i in details] == [
        (BOTTLE_BAD, 7, "C", "Object Analysis"),
        (BOTTLE_GOOD, 2, "A", "Object Analysis"),
    ]
    assert [i.is_normal for i in details] == [False, True]


def test_references_default_to_the_first_random_template(fx: MmadFixture) -> None:
    item = read_mmad(fx.root).items[0]
    assert item.reference_paths == (str(fx.root / "DS-MVTec/bottle/train/good/002.png"),)


def test_similar_templates_and_count(fx: MmadFixture) -> None:
    data = read_mmad(fx.root, template_source="similar", num_references=2)
    candle = next(i for i in data.items if i.image_key == CANDLE_GOOD)
    assert candle.reference_paths == (
        str(fx.root / "VisA/candle/train/good/000.JPG"),
        str(fx.root / "VisA/candle/train/good/001.JPG"),
    )
    assert all(i.reference_paths == () for i in read_mmad(fx.root, num_references=0).items)


def test_samples_labels_sizes_and_mask_boxes(fx: MmadFixture) -> None:
    samples = _samples_by_key(fx)
    assert list(samples) == [
        BOTTLE_BAD,
        BOTTLE_GOOD,
        CANDLE_BAD,
        CANDLE_GOOD,
        BOX_LOGICAL,
        BOX_GOOD,
        BOX_NO_MASK,
    ]
    expected = {  # key: (label, defect_type, (w, h), boxes) — boxes from the rectangles drawn
        BOTTLE_BAD: (
            "anomalous",
            "broken_large",
            (40, 30),
            {(5, 4, 10, 8), (12, 5, 14, 7), (20, 15, 30, 25), (35, 2, 36, 3)},
        ),
        BOTTLE_GOOD: ("normal", "good", (40, 30), set()),
        CANDLE_BAD: ("anomalous", "bad", (32, 24), {(3, 10, 7, 13)}),  # "B: Yes" read from the text
        CANDLE_GOOD: ("normal", "good", (32, 24), set()),
        BOX_LOGICAL: ("anomalous", "logical_anomalies", (48, 36), {(0, 0, 4, 4), (40, 30, 48, 36)}),
        BOX_GOOD: ("normal", "good", (48, 36), set()),
        BOX_NO_MASK: ("anomalous", "structural_anomalies", (48, 36), set()),
    }
    for key, (label, defect, size, boxes) in expected.items():
        sample = samples[key]
        assert (sample.label, sample.defect_type, sample.image_size) == (label, defect, size), key
        assert set(sample.boxes) == boxes, key
        assert sample.split == "test" and sample.category == key.split("/")[1]
        assert sample.reference_paths == (
            str(fx.root / Path(key).parents[2] / "train/good" / f"002{Path(key).suffix}"),
        )
    # mmad.json's "../ground_truth/..." is normalised, and LOCO's mask folder is kept as a folder
    assert samples[BOTTLE_BAD].mask_path == str(
        fx.root / "DS-MVTec/bottle/ground_truth/broken_large/000_mask.png"
    )
    assert samples[BOX_LOGICAL].mask_path == str(
        fx.root / "MVTec-LOCO/breakfast_box/ground_truth/logical_anomalies/000"
    )
    assert samples[BOX_NO_MASK].mask_path is None and samples[BOX_GOOD].mask_path is None


def test_boxes_settings_reach_the_mask(fx: MmadFixture) -> None:
    bottle = _samples_by_key(fx, boxes_cfg={"dilation": 1, "min_area": 2})[BOTTLE_BAD]
    # dilation 1 bridges the 2-px gap between the first two rectangles; min_area 2 drops the pixel
    assert set(bottle.boxes) == {(5, 4, 14, 8), (20, 15, 30, 25)}


def test_load_boxes_false_reads_no_mask(fx: MmadFixture) -> None:
    (fx.root / "DS-MVTec/bottle/ground_truth/broken_large/000_mask.png").unlink()
    samples = _samples_by_key(fx, load_boxes=False)
    assert samples[BOTTLE_BAD].label == "anomalous" and samples[BOTTLE_BAD].boxes == ()


# --- filters ------------------------------------------------------------------------------------


def test_dataset_filter(fx: MmadFixture) -> None:
    data = read_mmad(fx.root, datasets=["VisA"])
    assert len(data.items) == 5 and {i.dataset for i in data.items} == {"VisA"}
    assert [s.category for s in data.samples] == ["candle", "candle"]


def test_question_type_filter_and_object_analysis_alias(fx: MmadFixture) -> None:
    detection = read_mmad(fx.root, question_types=["Anomaly Detection"])
    assert len(detection.items) == 7 and len(detection.samples) == 7
    objects = read_mmad(fx.root, question_types=["Object Analysis"])
    assert Counter(i.question_type for i in objects.items) == {"Object Structure": 3, "Object Details": 2}
    assert objects.samples == []  # no detection question selected, so no training samples
    both = read_mmad(fx.root, datasets=["DS-MVTec", "MVTec-LOCO"], question_types=["Defect Classification"])
    assert [i.image_key for i in both.items] == [BOTTLE_BAD, BOX_NO_MASK]


def test_filtered_out_entries_need_no_files(fx: MmadFixture) -> None:
    for path in (fx.root / "VisA").rglob("*.JPG"):
        path.unlink()
    assert len(read_mmad(fx.root, datasets=["DS-MVTec", "MVTec-LOCO"]).items) == 17
    # an entry whose questions are all filtered out is not checked either
    (fx.root / BOTTLE_GOOD).unlink()
    assert len(read_mmad(fx.root, datasets=["DS-MVTec"], question_types=["Defect Analysis"]).items) == 1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"datasets": ["MVTec-AD"]}, "available: ['DS-MVTec', 'MVTec-LOCO', 'VisA']"),
        ({"question_types": ["Defect Counting"]}, "'Object Structure', 'Object Details']"),
        ({"datasets": []}, "empty dataset filter"),
        ({"datasets": "VisA"}, "must be a list"),
    ],
)
def test_unknown_filter_names_list_the_available_ones(fx: MmadFixture, kwargs: dict, needle: str) -> None:
    with pytest.raises(MmadFilterError) as error:
        read_mmad(fx.root, **kwargs)
    assert needle in str(error.value)


# --- errors -------------------------------------------------------------------------------------


def test_missing_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MmadFileNotFoundError, match=str(tmp_path / "nowhere" / "mmad.json")):
        read_mmad(tmp_path / "nowhere")


def test_invalid_json_and_wrong_top_level(fx: MmadFixture) -> None:
    fx.json_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(MmadFormatError, match="mmad.json: not valid JSON"):
        read_mmad(fx.root)
    fx.write([1, 2])
    with pytest.raises(MmadFormatError, match="expected a JSON object"):
        read_mmad(fx.root)


def test_missing_image_raises_or_is_skipped_and_counted(fx: MmadFixture) -> None:
    (fx.root / BOTTLE_GOOD).unlink()
    with pytest.raises(MmadFileNotFoundError) as error:
        read_mmad(fx.root)
    assert BOTTLE_GOOD in str(error.value) and "query image not found" in str(error.value)
    assert isinstance(error.value, DataError) and isinstance(error.value, FileNotFoundError)

    data = read_mmad(fx.root, on_error="skip")
    assert data.skipped == 1 and len(data.items) == 22 - 3 and len(data.samples) == 6
    assert BOTTLE_GOOD in data.skip_reasons[0]


def test_missing_template_and_mask(fx: MmadFixture) -> None:
    (fx.root / "VisA/candle/train/good/002.JPG").unlink()
    with pytest.raises(MmadFileNotFoundError, match="template image not found"):
        read_mmad(fx.root)
    assert len(read_mmad(fx.root, template_source="similar").items) == 22  # the similar ones exist
    (fx.root / "VisA/candle/ground_truth/bad/000.png").unlink()
    with pytest.raises(
        MmadFileNotFoundError, match=r"mask not found: .*VisA/candle/ground_truth/bad/000.png"
    ):
        read_mmad(fx.root, template_source="similar")


def _break(fx: MmadFixture, key: str, change: Callable[[dict], object]) -> None:
    entries = fx.entries()
    change(entries[key])
    fx.write(entries)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda e: e["conversation"][1].update(Answer="E"),
            "question 1: 'Answer' 'E' is not one of the options",
        ),
        (lambda e: e["conversation"][2].pop("Options"), "question 2: missing ['Options']"),
        (lambda e: e.pop("conversation"), "'conversation' must be a list"),
        (lambda e: e["conversation"][0].update(Options={"A": "Maybe", "B": "Perhaps"}), "which option means"),
        (lambda e: e.update(mask_path="../../../../../etc/x.png"), "points outside the data root"),
        (
            lambda e: e.update(random_templates="DS-MVTec/bottle/train/good/002.png"),
            "must be a list of paths",
        ),
    ],
)
def test_malformed_entries_name_the_entry(
    fx: MmadFixture, change: Callable[[dict], object], needle: str
) -> None:
    _break(fx, BOTTLE_BAD, change)
    with pytest.raises(MmadFormatError) as error:
        read_mmad(fx.root)
    message = str(error.value)
    assert needle in message and BOTTLE_BAD in message and str(fx.json_path) in message
    skipped = read_mmad(fx.root, on_error="skip")
    assert skipped.skipped == 1 and len(skipped.items) == 22 - 8


def test_too_few_templates_and_bad_settings(fx: MmadFixture) -> None:
    with pytest.raises(MmadFormatError, match="'random_templates' has 2 template\\(s\\), 3 requested"):
        read_mmad(fx.root, num_references=3)
    with pytest.raises(DataError, match="template_source"):
        read_mmad(fx.root, template_source="nearest")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="on_error"):
        read_mmad(fx.root, on_error="ignore")
    with pytest.raises(DataError, match="boxes"):
        read_mmad(fx.root, boxes_cfg={"dilate": 3})


def test_mask_of_another_size_is_an_error(fx: MmadFixture) -> None:
    Image.new("L", (10, 10), 255).save(fx.root / "VisA/candle/ground_truth/bad/000.png")
    with pytest.raises(MmadFormatError, match="is 10x10 but the image is 32x24"):
        read_mmad(fx.root)


def test_bad_key_is_an_error(fx: MmadFixture) -> None:
    entries = fx.entries()
    entries["lonely.png"] = entries[BOTTLE_GOOD]
    fx.write(entries)
    with pytest.raises(MmadFormatError, match="'lonely.png': the key must be a relative path"):
        read_mmad(fx.root, datasets=["lonely.png"])


# --- the yes/no options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"A": "Yes", "B": "No"}, ("A", "B")),
        ({"A": "No.", "B": "Yes."}, ("B", "A")),
        ({"A": "There is no defect.", "B": "There is a defect."}, ("B", "A")),
        ({"A": "Normal", "B": "Abnormal"}, ("B", "A")),
        ({"A": "Yes, it is defective", "B": "No, it is not"}, ("A", "B")),
    ],
)
def test_anomaly_detection_letters(options: dict[str, str], expected: tuple[str, str]) -> None:
    assert anomaly_detection_letters(options) == expected


@pytest.mark.parametrize("options", [{"A": "Yes", "B": "Yes!"}, {"A": "Red", "B": "Blue"}, {"A": "Yes"}])
def test_anomaly_detection_letters_refuses_ambiguity(options: dict[str, str]) -> None:
    with pytest.raises(MmadFormatError):
        anomaly_detection_letters(options)


# --- the reader contract of anomaly_rl.data.readers ----------------------------------------------


def test_read_mmad_samples_follows_the_reader_contract(fx: MmadFixture) -> None:
    for path in (fx.root).rglob("train/good/*"):
        path.unlink()  # no references asked for: templates need not exist
    samples = read_mmad_samples(fx.root, boxes={"dilation": 1, "min_area": 2})
    assert len(samples) == 7 and all(s.reference_paths == () for s in samples)
    assert set(samples[0].boxes) == {(5, 4, 14, 8), (20, 15, 30, 25)}
    assert [s.label for s in read_mmad_samples(fx.root, categories=["candle"])] == ["anomalous", "normal"]
    with pytest.raises(MmadFilterError, match=r"available: \['bottle', 'breakfast_box', 'candle'\]"):
        read_mmad_samples(fx.root, categories=["capsule"])

    (fx.root / CANDLE_GOOD).unlink()
    skipped: list[DataError] = []
    assert len(read_mmad_samples(fx.root, on_error="skip", skipped=skipped)) == 6
    assert len(skipped) == 1 and CANDLE_GOOD in str(skipped[0])


def test_options_are_relettered_as_mmad_shows_them(fx: MmadFixture) -> None:
    entries = fx.entries()
    entries[BOX_NO_MASK]["conversation"][1].update(
        Options={"A": "Scratch.", "C": "Broken large."}, Answer="C"
    )
    fx.write(entries)
    item = next(i for i in read_mmad(fx.root).items if i.image_key == BOX_NO_MASK and i.index == 1)
    assert item.options == {"A": "Scratch.", "B": "Broken large."} and item.answer == "B"


def test_mask_path_relative_to_the_category_is_found(fx: MmadFixture) -> None:
    # some copies of mmad.json write "ground_truth/..." (from dataset/category), not "../ground_truth/..."
    _break(fx, CANDLE_BAD, lambda e: e.update(mask_path="ground_truth/bad/000.png"))
    assert set(_samples_by_key(fx)[CANDLE_BAD].boxes) == {(3, 10, 7, 13)}
    _break(fx, CANDLE_BAD, lambda e: e.update(mask_path="nowhere/000.png"))
    with pytest.raises(MmadFileNotFoundError, match=r"mask not found: .*VisA/candle/test/nowhere/000.png"):
        read_mmad(fx.root)
