"""score_mmad against a table worked out by hand, plus properties MMAD's own script fails."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.evaluation.mmad import (
    AVERAGE,
    COUNTS_CSV,
    SCORES_CSV,
    SCORES_MD,
    SCORES_MMAD_CSV,
    MmadAnswersError,
    Tally,
    render_markdown,
    score_conventions,
    score_mmad,
    write_scores,
)

AD, DC, DL, OA = "Anomaly Detection", "Defect Classification", "Defect Localization", "Object Analysis"
ABCD = {"type": "text", "text": "What type?", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}}


def rec(image: str, qtype: str, correct: str, gpt: Any, question: Any = "q") -> dict[str, Any]:
    return {
        "image": image,
        "question": question,
        "question_type": qtype,
        "correct_answer": correct,
        "gpt_answer": gpt,
    }


DS = "DS-MVTec/bottle/image"
VISA = "VisA/candle/test"
ANSWERS = [
    # DS-MVTec, Anomaly Detection: normal 1/2 right, anomalous 2/3 right (one unparseable)
    rec(f"{DS}/good/000.png", AD, "B", "B"),
    rec(f"{DS}/good/001.png", AD, "B", "A"),
    rec(f"{DS}/broken_large/000.png", AD, "A", "A"),
    rec(f"{DS}/broken_large/001.png", AD, "A", "A"),
    rec(f"{DS}/broken_large/002.png", AD, "A", None),
    # DS-MVTec, Defect Classification (options A-D): 3 right, "F" is no option -> unparseable
    rec(f"{DS}/broken_large/000.png", DC, "A", "A", ABCD),
    rec(f"{DS}/broken_large/001.png", DC, "B", "B", ABCD),
    rec(f"{DS}/broken_large/002.png", DC, "C", "C", ABCD),
    rec(f"{DS}/broken_small/000.png", DC, "D", "F", ABCD),
    # DS-MVTec, Object Structure 3/3 and Object Details 0/1: pooled 3/4 (not the mean 50)
    rec(f"{DS}/good/000.png", "Object Structure", "A", "A"),
    rec(f"{DS}/good/001.png", "Object Structure", "B", "B"),
    rec(f"{DS}/broken_large/000.png", "Object Structure", "C", "C"),
    rec(f"{DS}/good/000.png", "Object Details", "A", "B"),
    # VisA, Anomaly Detection: normal 1/1, anomalous 0/1
    rec(f"{VISA}/good/000.JPG", AD, "B", "B"),
    rec(f"{VISA}/bad/000.JPG", AD, "A", "B"),
    # VisA, Defect Classification 1/2 ("b" is not MMAD's "B": unparseable), Defect Localization 1/1
    rec(f"{VISA}/bad/000.JPG", DC, "A", "A"),
    rec(f"{VISA}/bad/001.JPG", DC, "B", "b"),
    rec(f"{VISA}/bad/000.JPG", DL, "C", "C"),
]

# Worked by hand:
#   DS-MVTec  AD = (1/2 + 2/3)/2 = 7/12 -> 58.333  (plain accuracy would be 3/5 = 60)
#             DC = 3/4 -> 75;  OA = 3/4 -> 75;  Average = (175/3 + 75 + 75)/3 = 625/9 -> 69.444
#   VisA      AD = (1 + 0)/2 -> 50;  DC = 1/2 -> 50;  DL = 100;  Average = 200/3 -> 66.667
#   Average   AD = (175/3 + 50)/2 = 325/6 -> 54.167;  DC = 62.5;  DL = 100 (VisA only);
#             OA = 75 (DS-MVTec only);  Average = (625/9 + 200/3)/2 = 1225/18 -> 68.056
EXPECTED = {
    "DS-MVTec": {AD: 700 / 12, DC: 75.0, OA: 75.0, AVERAGE: 625 / 9},
    "VisA": {AD: 50.0, DC: 50.0, DL: 100.0, AVERAGE: 200 / 3},
    AVERAGE: {AD: 325 / 6, DC: 62.5, DL: 100.0, OA: 75.0, AVERAGE: 1225 / 18},
}


def test_hand_computed_table() -> None:
    table = score_mmad(ANSWERS)
    assert table.datasets == ("DS-MVTec", "VisA")
    assert table.question_types == (AD, DC, DL, OA)  # MMAD's column order, object types merged
    for row, cells in EXPECTED.items():
        for column in (AD, DC, DL, OA, AVERAGE):
            want = cells.get(column)
            got = table.value(row, column)
            assert (got is None) if want is None else got == pytest.approx(want), (row, column)
    assert table.overall == pytest.approx(1225 / 18)


def test_counts_behind_the_cells() -> None:
    table = score_mmad(ANSWERS)
    assert table.total == 18 and table.unparseable == 3  # None, "F", "b": kept and scored wrong
    assert table.tallies["DS-MVTec"][AD] == Tally(correct=3, total=5, unparseable=1)
    assert table.tallies["DS-MVTec"][DC] == Tally(correct=3, total=4, unparseable=1)
    assert table.tallies["DS-MVTec"][OA] == Tally(correct=3, total=4, unparseable=0)
    assert table.tallies["VisA"][DC] == Tally(correct=1, total=2, unparseable=1)
    assert table.detection["DS-MVTec"] == (Tally(1, 2, 0), Tally(2, 3, 1))
    assert table.detection["VisA"] == (Tally(1, 1, 0), Tally(0, 1, 0))
    assert table.notes == ()


def test_unparseable_answers_are_wrong_not_dropped() -> None:
    # MMAD would drop the "F" and score DS-MVTec's Defect Classification 3/3 = 100
    table = score_mmad(ANSWERS)
    assert table.value("DS-MVTec", DC) == 75.0
    only_bad = score_mmad([rec(f"{DS}/broken_large/000.png", DC, "A", None)])
    assert only_bad.value("DS-MVTec", DC) == 0.0 and only_bad.unparseable == 1


def test_a_missing_detection_side_counts_zero_as_in_mmad() -> None:
    table = score_mmad([rec(f"{DS}/broken_large/000.png", AD, "A", "A")])
    assert table.value("DS-MVTec", AD) == 50.0  # (0 + 1)/2: the normal side is empty
    assert len(table.notes) == 1 and "no normal images" in table.notes[0]


def test_normal_flag_decides_the_side() -> None:
    answers = [rec("X/c/ok/0.png", AD, "B", "B"), rec("X/c/bad/0.png", AD, "A", "B")]
    assert score_mmad(answers, normal_flag="ok").value("X", AD) == 50.0
    assert score_mmad(answers).value("X", AD) == 25.0  # nothing is "good": both count as anomalous


@pytest.mark.parametrize(
    ("records", "needle"),
    [
        ([], "no answer records"),
        (
            [{"image": f"{DS}/good/000.png", "question_type": AD, "correct_answer": "A"}],
            "missing ['gpt_answer']",
        ),
        ([rec(f"{DS}/good/000.png", AD, "Z", "A")], "correct_answer 'Z' is not one of"),
        ([rec(f"{DS}/good/000.png", DC, "E", "A", ABCD)], "record 0"),
        (["not a record"], "expected an object"),
    ],
)
def test_malformed_records(records: list, needle: str) -> None:
    with pytest.raises(MmadAnswersError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        score_mmad(records)


def test_write_scores(tmp_path: Path) -> None:
    tables = score_conventions(ANSWERS)
    paths = write_scores(tables, tmp_path / "out")
    assert [p.name for p in paths] == [SCORES_CSV, SCORES_MMAD_CSV, COUNTS_CSV, SCORES_MD]
    csv_path, md_path = tmp_path / "out" / SCORES_CSV, tmp_path / "out" / SCORES_MD
    rows = list(csv.reader(csv_path.open(encoding="utf-8")))
    assert rows[0] == ["", AD, DC, DL, OA, AVERAGE]
    assert [r[0] for r in rows[1:]] == ["DS-MVTec", "VisA", AVERAGE]
    assert rows[1][3] == ""  # DS-MVTec was asked no localisation question
    assert float(rows[1][1]) == pytest.approx(700 / 12) and float(rows[3][5]) == pytest.approx(1225 / 18)
    text = md_path.read_text(encoding="utf-8")
    # each cell: accuracy (unparseable answers in it); the Average row and column sum the counts
    assert "| DS-MVTec | 58.33 (1) | 75.00 (1) | – | 75.00 (0) | 69.44 (2) |" in text
    assert "| **Average** | 54.17 (1) | 62.50 (2) | 100.00 (0) | 75.00 (0) | 68.06 (3) |" in text
    assert "Unparseable answers (scored wrong, not dropped): 3 of 18." in text
    assert "| ours | DS-MVTec | 1/2 (50.00) | 2/3 (66.67) |" in text
    assert text == render_markdown(tables)


# --- properties -----------------------------------------------------------------------------------

records_strategy = st.lists(
    st.tuples(
        st.sampled_from(["DS-MVTec", "VisA", "GoodsAD"]),
        st.sampled_from([AD, DC, "Object Structure", "Object Details"]),
        st.booleans(),  # normal image?
        st.sampled_from(["A", "B"]),  # correct
        st.sampled_from(["A", "B", None, "Q"]),  # given
    ),
    min_size=1,
    max_size=40,
)


def _records(rows: list[tuple]) -> list[dict[str, Any]]:
    return [
        rec(f"{d}/cat/{'good' if normal else 'bad'}/{i}.png", t, c, g)
        for i, (d, t, normal, c, g) in enumerate(rows)
    ]


@settings(max_examples=60, deadline=None)
@given(records_strategy)
def test_matches_an_independent_reimplementation(rows: list[tuple]) -> None:
    table = score_mmad(_records(rows))
    for dataset in {r[0] for r in rows}:
        mine = [r for r in rows if r[0] == dataset]
        for column, members in ((AD, {AD}), (DC, {DC}), (OA, {"Object Structure", "Object Details"})):
            asked = [r for r in mine if r[1] in members]
            if not asked:
                assert table.value(dataset, column) is None
                continue
            if column == AD:
                sides = [[r[3] == r[4] for r in asked if r[2] is normal] for normal in (True, False)]
                want = 100 * sum(sum(s) / len(s) if s else 0 for s in sides) / 2
            else:
                want = 100 * sum(r[3] == r[4] for r in asked) / len(asked)
            assert table.value(dataset, column) == pytest.approx(want)
    assert table.unparseable == sum(r[4] not in ("A", "B", "C", "D", "E") for r in rows)
    assert table.total == len(rows)


@settings(max_examples=40, deadline=None)
@given(records_strategy, st.randoms(use_true_random=False))
def test_order_does_not_matter(rows: list[tuple], rng: random.Random) -> None:
    # MMAD's script removes from the list it iterates over, which makes its result order-dependent
    records = _records(rows)
    shuffled = records[:]
    rng.shuffle(shuffled)
    a, b = score_mmad(records), score_mmad(shuffled)
    assert set(a.datasets) == set(b.datasets) and a.question_types == b.question_types
    for dataset in a.datasets:
        for column in (*a.question_types, AVERAGE):
            assert a.value(dataset, column) == pytest.approx(b.value(dataset, column))
    assert a.overall == pytest.approx(b.overall)


@settings(max_examples=40, deadline=None)
@given(records_strategy)
def test_making_a_wrong_answer_unparseable_changes_only_the_count(rows: list[tuple]) -> None:
    wrong = [i for i, r in enumerate(rows) if r[4] in ("A", "B") and r[4] != r[3]]
    if not wrong:
        return
    records = _records(rows)
    changed = [dict(r) for r in records]
    changed[wrong[0]]["gpt_answer"] = None
    a, b = score_mmad(records), score_mmad(changed)
    assert b.unparseable == a.unparseable + 1 and b.total == a.total
    assert b.overall == pytest.approx(a.overall)
