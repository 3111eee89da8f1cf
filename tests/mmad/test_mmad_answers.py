"""parse_choice, the multiple-choice prompt, and MMAD's answers format end to end on the fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.data.mmad import read_mmad
from anomaly_rl.evaluation.mmad import (
    AVERAGE,
    answers_records,
    detection_choice,
    format_multiple_choice,
    parse_choice,
    read_answers,
    score_mmad,
    write_answers,
)
from tests.mmad.fixture import build_mmad_fixture

YN = {"A": "Yes", "B": "No"}
KINDS = {"A": "Crack", "B": "Scratch", "C": "Contamination", "D": "Missing part"}
SCRATCHES = {"A": "Scratch", "B": "Deep scratch", "C": "Crack"}


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("B", YN, "B"),
        ("b", YN, "B"),
        (" B. ", YN, "B"),
        ("(B)", YN, "B"),
        ("[a]", YN, "A"),
        ("<answer>B</answer>", YN, "B"),
        ("Answer: B", KINDS, "B"),
        ("answer: c.", KINDS, "C"),
        ("The correct answer is (C).", KINDS, "C"),
        ("Answer: B\nOn reflection, the answer is D.", KINDS, "D"),  # the last stated answer
        ("I think the answer is B, not A.", KINDS, "B"),
        ("B. No", YN, "B"),
        ("(A) Yes, there is a crack", YN, "A"),
        ("C: Contamination on the left", KINDS, "C"),
        ("No.", YN, "B"),
        ("yes", YN, "A"),
        ("Missing part", KINDS, "D"),
        ("Yes, there is a defect on the left.", YN, "A"),
        ("A scratch on the cap.", KINDS, "B"),  # "A" is the article here (MMAD's regex would say A)
        ("The answer is a scratch", KINDS, "B"),
        ("There is a deep scratch near the rim", SCRATCHES, "B"),  # the longer option wins
        ("It must be D", KINDS, "D"),
    ],
)
def test_parse_choice(text: str, options: dict[str, str], expected: str) -> None:
    assert parse_choice(text, options) == expected


@pytest.mark.parametrize(
    ("text", "options"),
    [
        ("F", KINDS),  # not an option
        ("", YN),
        ("   ", YN),
        (None, YN),
        ("Maybe", YN),
        ("Either A or B", KINDS),  # two letters named
        ("Yes and no", YN),  # two option texts
        ("B", {}),
        (42, YN),
    ],
)
def test_parse_choice_gives_none_when_unsure(text: object, options: dict[str, str]) -> None:
    assert parse_choice(text, options) is None  # type: ignore[arg-type]


def test_parse_choice_returns_the_key_as_spelt() -> None:
    assert parse_choice("B", {"a": "Yes", "b": "No"}) == "b"


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), st.text(max_size=60)),
    st.dictionaries(st.sampled_from("ABCDE"), st.text(max_size=12), max_size=5),
)
def test_parse_choice_never_raises_and_returns_an_option(text: str | None, options: dict[str, str]) -> None:
    choice = parse_choice(text, options)
    assert choice is None or choice in options


def test_format_multiple_choice() -> None:
    assert format_multiple_choice("  Is there any defect in the object? ", YN) == (
        "Is there any defect in the object?\nA. Yes\nB. No"
    )


def test_detection_choice_follows_the_option_text() -> None:
    assert detection_choice(True, {"A": "No", "B": "Yes"}) == "B"
    assert detection_choice(False, {"A": "No", "B": "Yes"}) == "A"
    assert detection_choice(True, {"A": "Yes.", "B": "No."}) == "A"
    assert detection_choice(None, YN) is None


def test_answers_round_trip_and_score_on_the_fixture(tmp_path: Path) -> None:
    items = read_mmad(build_mmad_fixture(tmp_path).root).items
    # every answer right except VisA's anomalous candle, where the model says "normal"
    choices = [i.answer for i in items]
    candle_ad = next(
        k for k, i in enumerate(items) if i.image_key == "VisA/candle/test/bad/000.JPG" and i.index == 0
    )
    choices[candle_ad] = detection_choice(False, items[candle_ad].options)
    responses = [f"Answer: {c}" for c in choices]
    records = answers_records(items, choices, responses)

    first = records[0]
    assert first == {
        "image": "DS-MVTec/bottle/image/broken_large/000.png",
        "question": {
            "type": "text",
            "text": "Is there any defect in the object?\nA. Yes.\nB. No.",
            "options": {"A": "Yes.", "B": "No."},
        },
        "question_type": "Anomaly Detection",
        "correct_answer": "A",
        "gpt_answer": "A",
        "response": "Answer: A",
    }
    assert records[candle_ad]["gpt_answer"] == "A"  # "A: No" in the reversed options
    path = write_answers(records, tmp_path / "run" / "answers.json")
    table = score_mmad(read_answers(path))
    # VisA detection: normal 1/1, anomalous 0/1 -> 50; VisA's DL and OA 100 -> Average 250/3
    assert table.value("VisA", "Anomaly Detection") == 50.0
    assert table.value("VisA", AVERAGE) == pytest.approx(250 / 3)
    assert table.value("DS-MVTec", AVERAGE) == 100.0 and table.value("MVTec-LOCO", AVERAGE) == 100.0
    # columns: DS-MVTec has all 7, LOCO AD/DC/DD/OC, VisA AD/DL/OA; overall = (100 + 250/3 + 100)/3
    assert table.overall == pytest.approx((200 + 250 / 3) / 3)
    assert table.value(AVERAGE, "Anomaly Detection") == pytest.approx(250 / 3)


def test_answers_records_length_mismatch(tmp_path: Path) -> None:
    items = read_mmad(build_mmad_fixture(tmp_path).root).items
    with pytest.raises(ValueError, match="22 questions but 21 choices"):
        answers_records(items, [None] * 21)
    with pytest.raises(ValueError, match="and 3 responses"):
        answers_records(items, [None] * 22, ["x"] * 3)


def test_read_answers_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="answers.json"):
        read_answers(tmp_path / "answers.json")
    (tmp_path / "answers.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_answers(tmp_path / "answers.json")
