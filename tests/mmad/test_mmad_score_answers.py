"""Scoring any MMAD answers file: a hand-made file in both conventions, the CLI, malformed files.

The hand-made file has right, wrong and unparseable answers in every question type. MMAD's
convention is worked out by hand from what its summary script does (anomaly_rl.evaluation.mmad's
docstring): an answer that is not a letter A-E is dropped, and the record right after each dropped
one is never visited (skipped); a cell with no counted answer is 0 and is averaged in.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.evaluation.mmad import (
    AVERAGE,
    COUNTS_CSV,
    MMAD,
    OURS,
    SCORES_CSV,
    SCORES_MD,
    SCORES_MMAD_CSV,
    SUMMARY_JSON,
    MmadAnswersError,
    Tally,
    read_answers_file,
    score_and_write,
    score_conventions,
    score_mmad,
)

AD, DC, DL, DD, DA, OC, OA = (
    "Anomaly Detection", "Defect Classification", "Defect Localization", "Defect Description",
    "Defect Analysis", "Object Classification", "Object Analysis",
)
COLUMNS = (AD, DC, DL, DD, DA, OC, OA)
YES_NO = {"A": "Yes.", "B": "No."}
ABCD = {"A": "w", "B": "x", "C": "y", "D": "z"}
DS, V = "DS-MVTec/bottle/image", "VisA/candle/test"


def rec(image: str, qtype: str, correct: str, given: Any, options: dict[str, str] = ABCD) -> dict[str, Any]:
    text = "Question?\\n" + "\\n".join(f"{k}. {v}" for k, v in options.items())
    return {"image": image, "question": {"type": "text", "text": text, "options": options},
            "question_type": qtype, "correct_answer": correct, "gpt_answer": given}


# R right, W wrong, U unparseable (both conventions), u unparseable for us only ("E" is no option of
# this question, but a letter MMAD's script accepts). "drop" / "skip": what MMAD's script does.
HAND = [
    rec(f"{DS}/good/000.png", AD, "B", "B", YES_NO),  # 1  R normal
    rec(f"{DS}/good/001.png", AD, "B", "A", YES_NO),  # 2  W normal
    rec(f"{DS}/broken/000.png", AD, "A", "A", YES_NO),  # 3  R anomalous
    rec(f"{DS}/broken/001.png", AD, "A", None, YES_NO),  # 4  U anomalous   drop
    rec(f"{DS}/broken/002.png", AD, "A", "A", YES_NO),  # 5  R anomalous   skip
    rec(f"{DS}/broken/003.png", AD, "A", "A", YES_NO),  # 6  R anomalous
    rec(f"{DS}/broken/000.png", DC, "A", "A"),  # 7  R
    rec(f"{DS}/broken/001.png", DC, "B", "C"),  # 8  W
    rec(f"{DS}/broken/002.png", DC, "C", "E"),  # 9  u (MMAD: W)
    rec(f"{DS}/broken/003.png", DC, "D", "The answer is D"),  # 10 U   drop (MMAD stores unparsed text)
    rec(f"{DS}/broken/000.png", "Defect Localization", "A", "A"),  # 11 R   skip
    rec(f"{DS}/broken/001.png", DL, "B", "A"),  # 12 W
    rec(f"{DS}/broken/002.png", DL, "C", ""),  # 13 U   drop
    rec(f"{DS}/broken/003.png", DL, "D", "A"),  # 14 W   skip
    rec(f"{DS}/broken/000.png", DD, "A", "A"),  # 15 R
    rec(f"{DS}/broken/001.png", DD, "B", "B"),  # 16 R
    rec(f"{DS}/broken/002.png", DD, "C", "D"),  # 17 W
    rec(f"{DS}/broken/003.png", DD, "D", "d"),  # 18 U   drop
    rec(f"{DS}/broken/000.png", DA, "A", "B"),  # 19 W   skip
    rec(f"{DS}/broken/001.png", DA, "B", "B"),  # 20 R
    rec(f"{DS}/broken/002.png", DA, "C", None),  # 21 U   drop
    rec(f"{DS}/good/000.png", OC, "A", "A"),  # 22 R   skip
    rec(f"{DS}/good/001.png", OC, "B", "C"),  # 23 W
    rec(f"{DS}/broken/000.png", OC, "C", "F"),  # 24 U   drop
    rec(f"{DS}/good/000.png", "Object Structure", "A", "A"),  # 25 R   skip
    rec(f"{DS}/good/001.png", "Object Structure", "B", "B"),  # 26 R
    rec(f"{DS}/good/000.png", "Object Details", "C", "C"),  # 27 R
    rec(f"{DS}/broken/000.png", "Object Details", "D", None),  # 28 U   drop
    rec(f"{V}/good/000.JPG", AD, "B", "B", YES_NO),  # 29 R normal     skip
    rec(f"{V}/bad/000.JPG", AD, "A", "B", YES_NO),  # 30 W anomalous
    rec(f"{V}/bad/001.JPG", AD, "A", "A", YES_NO),  # 31 R anomalous
    rec(f"{V}/good/001.JPG", AD, "B", "yes", YES_NO),  # 32 U normal     drop
    rec(f"{V}/bad/000.JPG", DC, "A", "A"),  # 33 R   skip
    rec(f"{V}/bad/001.JPG", DC, "B", "A"),  # 34 W
    rec(f"{V}/bad/000.JPG", "Object Structure", "A", "A"),  # 35 R
]

# Ours, by hand (every answer counted; unparseable = wrong):
#   DS-MVTec  AD: normal 1/2, anomalous 3/4 -> (50 + 75)/2 = 62.5;  DC 1/4 = 25;  DL 1/4 = 25;  DD 2/4 = 50
#             DA 1/3;  OC 1/3;  OA (Structure + Details) 3/4 = 75;  Average = 1825/42
#   VisA      AD: normal 1/2, anomalous 1/2 -> 50;  DC 1/2 = 50;  OA 1/1 = 100;  (no DL/DD/DA/OC: absent)
#             Average = 200/3
#   Average   AD 56.25, DC 37.5, DL 25, DD 50, DA 100/3, OC 100/3, OA 87.5;  overall (1825/42 + 200/3)/2
OURS_EXPECTED = {
    "DS-MVTec": {AD: 62.5, DC: 25.0, DL: 25.0, DD: 50.0, DA: 100 / 3, OC: 100 / 3, OA: 75.0, AVERAGE: 1825 / 42},
    "VisA": {AD: 50.0, DC: 50.0, OA: 100.0, AVERAGE: 200 / 3},
    AVERAGE: {AD: 56.25, DC: 37.5, DL: 25.0, DD: 50.0, DA: 100 / 3, OC: 100 / 3, OA: 87.5,
              AVERAGE: (1825 / 42 + 200 / 3) / 2},
}
OURS_COUNTS = {  # (correct, total, unparseable)
    "DS-MVTec": {AD: (4, 6, 1), DC: (1, 4, 2), DL: (1, 4, 1), DD: (2, 4, 1), DA: (1, 3, 1), OC: (1, 3, 1),
                 OA: (3, 4, 1)},
    "VisA": {AD: (2, 4, 1), DC: (1, 2, 0), OA: (1, 1, 0)},
}
# MMAD's, by hand (dropped: 4 10 13 18 21 24 28 32; skipped: 5 11 14 19 22 25 29 33; 9 is a wrong "E"):
#   DS-MVTec  AD: normal {1 R, 2 W} 1/2, anomalous {3 R, 6 R} 2/2 -> 75;  DC {7 R, 8 W, 9 W} 1/3
#             DL {12 W} 0/1 = 0;  DD {15 R, 16 R, 17 W} 2/3;  DA {20 R} 100;  OC {23 W} 0;  OA {26 R, 27 R} 100
#             Average = (75 + 100/3 + 0 + 200/3 + 100 + 0 + 100)/7 = 375/7
#   VisA      AD: normal {} -> 0, anomalous {30 W, 31 R} 1/2 -> (0 + 50)/2 = 25;  DC {34 W} 0;  OA {35 R} 100
#             DL, DD, DA, OC: no counted answer -> 0;  Average = (25 + 100)/7 = 125/7
#   Average   AD 50, DC 50/3, DL 0, DD 100/3, DA 50, OC 0, OA 100;  overall (375/7 + 125/7)/2 = 250/7
MMAD_EXPECTED = {
    "DS-MVTec": {AD: 75.0, DC: 100 / 3, DL: 0.0, DD: 200 / 3, DA: 100.0, OC: 0.0, OA: 100.0, AVERAGE: 375 / 7},
    "VisA": {AD: 25.0, DC: 0.0, DL: 0.0, DD: 0.0, DA: 0.0, OC: 0.0, OA: 100.0, AVERAGE: 125 / 7},
    AVERAGE: {AD: 50.0, DC: 50 / 3, DL: 0.0, DD: 100 / 3, DA: 50.0, OC: 0.0, OA: 100.0, AVERAGE: 250 / 7},
}
MMAD_COUNTS = {  # (correct, total, dropped, skipped)
    "DS-MVTec": {AD: (3, 4, 1, 1), DC: (1, 3, 1, 0), DL: (0, 1, 1, 2), DD: (2, 3, 1, 0), DA: (1, 1, 1, 1),
                 OC: (0, 1, 1, 1), OA: (2, 2, 1, 1)},
    "VisA": {AD: (1, 2, 1, 1), DC: (0, 1, 0, 1), OA: (1, 1, 0, 0)},
}


def check_table(table: Any, expected: dict[str, dict[str, float]]) -> None:
    assert table.datasets == ("DS-MVTec", "VisA") and table.question_types == COLUMNS
    for row in ("DS-MVTec", "VisA", AVERAGE):
        for column in (*COLUMNS, AVERAGE):
            want, got = expected[row].get(column), table.value(row, column)
            assert (got is None) if want is None else got == pytest.approx(want), (table.convention, row, column)


def test_hand_made_file_in_our_convention() -> None:
    table = score_mmad(HAND)
    check_table(table, OURS_EXPECTED)
    for dataset, cells in OURS_COUNTS.items():
        for column, (correct, total, unparseable) in cells.items():
            assert table.tallies[dataset][column] == Tally(correct, total, unparseable, 0), (dataset, column)
    assert (table.records, table.total, table.unparseable, table.skipped) == (35, 35, 9, 0)


def test_hand_made_file_in_mmads_convention() -> None:
    table = score_mmad(HAND, convention=MMAD)
    check_table(table, MMAD_EXPECTED)
    for dataset, cells in MMAD_COUNTS.items():
        for column, (correct, total, dropped, skipped) in cells.items():
            assert table.tallies[dataset][column] == Tally(correct, total, dropped, skipped), (dataset, column)
    assert (table.records, table.total, table.unparseable, table.skipped) == (35, 19, 8, 8)
    assert table.detection["VisA"] == (Tally(0, 0, 1, 1), Tally(1, 2, 0, 0))
    assert any("VisA: no counted Defect Localization answer" in note for note in table.notes)


def test_mmads_convention_depends_on_the_order_as_its_script_does() -> None:
    # Reversed, other records follow the dropped ones and are skipped: another number.
    forward, backward = score_mmad(HAND, convention=MMAD), score_mmad(HAND[::-1], convention=MMAD)
    assert forward.overall != pytest.approx(backward.overall)
    assert score_mmad(HAND).overall == pytest.approx(score_mmad(HAND[::-1]).overall)  # ours does not


def test_cli_writes_both_conventions(tmp_path: Path) -> None:
    answers = tmp_path / "answers_1_shot_model.json"
    answers.write_text(json.dumps(HAND, indent=4), encoding="utf-8")  # as MMAD's query scripts write it
    env = {**os.environ, "ANOMALY_RL_ROOT": str(tmp_path), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_rl.score", "mmad", f"answers={answers}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = [p.parent for p in (tmp_path / "logs" / "score_mmad").rglob(SCORES_CSV)]
    for name, expected in ((SCORES_CSV, OURS_EXPECTED), (SCORES_MMAD_CSV, MMAD_EXPECTED)):
        rows = list(csv.reader((run_dir / name).open(encoding="utf-8")))
        assert rows[0] == ["", *COLUMNS, AVERAGE]
        for row in rows[1:]:
            for column, value in zip(rows[0][1:], row[1:], strict=True):
                want = expected[row[0]].get(column)
                assert (value == "") if want is None else float(value) == pytest.approx(want), (name, row[0], column)
    counts = {(r["convention"], r["dataset"], r["question_type"]): r
              for r in csv.DictReader((run_dir / COUNTS_CSV).open(encoding="utf-8"))}
    assert {k: (int(v["correct"]), int(v["total"]), int(v["unparseable"])) for k, v in counts.items()
            if k[0] == OURS and k[1] != AVERAGE and k[2] != AVERAGE} == {
        (OURS, d, c): n for d, cells in OURS_COUNTS.items() for c, n in cells.items()}
    assert {k: (int(v["correct"]), int(v["total"]), int(v["unparseable"]), int(v["skipped"]))
            for k, v in counts.items() if k[0] == MMAD and k[1] != AVERAGE and k[2] != AVERAGE} == {
        (MMAD, d, c): MMAD_COUNTS.get(d, {}).get(c, (0, 0, 0, 0)) for d in ("DS-MVTec", "VisA") for c in COLUMNS}
    assert counts[(OURS, AVERAGE, AVERAGE)]["unparseable"] == "9"
    assert counts[(MMAD, AVERAGE, AVERAGE)]["unparseable"] == "8" and counts[(MMAD, AVERAGE, AVERAGE)]["skipped"] == "8"
    markdown = (run_dir / SCORES_MD).read_text(encoding="utf-8")
    assert f"35 answer records from {answers}." in markdown
    assert "| DS-MVTec | 62.50 (1) | 25.00 (2) | 25.00 (1) | 50.00 (1) | 33.33 (1) | 33.33 (1) | 75.00 (1) | 43.45 (8) |" in markdown
    assert "| VisA | 25.00 (1; 1 skipped) | 0.00 (0; 1 skipped) | 0.00 (0) |" in markdown
    assert "| **Average** | 50.00 (2; 2 skipped) |" in markdown
    summary = json.loads((run_dir / SUMMARY_JSON).read_text(encoding="utf-8"))
    assert summary["overall"] == pytest.approx((1825 / 42 + 200 / 3) / 2)
    assert summary[MMAD]["overall"] == pytest.approx(250 / 7)
    assert (summary["unparseable"], summary[MMAD]["unparseable"], summary[MMAD]["skipped"]) == (9, 8, 8)
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["overall_mmad"] == pytest.approx(250 / 7)


def test_score_and_write_reads_json_lines_too(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in HAND) + "\n", encoding="utf-8")
    scores = score_and_write(read_answers_file(path), tmp_path / "out")
    check_table(scores.tables[OURS], OURS_EXPECTED)
    check_table(scores.tables[MMAD], MMAD_EXPECTED)


# --- malformed files: the error names the file and the line ------------------------------------------


GOOD = {"image": f"{DS}/good/000.png", "question_type": AD, "correct_answer": "B", "gpt_answer": "B"}


def write(tmp_path: Path, text: str, name: str = "answers.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def score_file(path: Path) -> Any:
    answers = read_answers_file(path)
    return score_conventions(answers.records, locations=answers.locations)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        # the second record of an indented list starts on line 8 ("[", "{", 4 keys, "},", "{")
        (json.dumps([GOOD, {k: v for k, v in GOOD.items() if k != "gpt_answer"}], indent=4), 8,
         "missing ['gpt_answer']"),
        (json.dumps([GOOD, {**GOOD, "correct_answer": "Z"}], indent=4), 8, "correct_answer 'Z' is not one of"),
        (json.dumps([GOOD, "text"], indent=4), 8, "expected an object"),
        (json.dumps([GOOD, {**GOOD, "image": 3}], indent=4), 8, "'image' and 'question_type' must be strings"),
        ('[\n  {"image": "a/b/c.png",\n   "question_type": "x"\n   "gpt_answer": "A"}\n]', 4, "not valid JSON"),
        (f"[\n{json.dumps(GOOD)},\n{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n]", 4, "expected ',' or ']'"),
        (json.dumps([GOOD]) + "\n\n[]", 3, "unexpected text after the list"),
        (json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{oops\n", 3, "not valid JSON"),
        (json.dumps({"DS-MVTec/bottle/image/good/000.png": {"conversation": []}}, indent=2), 1,
         "expected a JSON list of answer records"),
        ("\n\n  42", 3, "expected a JSON list of answer records or one record per line"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MmadAnswersError) as error:
        score_file(path)
    assert f"{path}, line {line}" in str(error.value) and reason in str(error.value), str(error.value)


def test_empty_files(tmp_path: Path) -> None:
    with pytest.raises(MmadAnswersError, match="empty file"):
        score_file(write(tmp_path, "  \n"))
    with pytest.raises(MmadAnswersError, match="no answer records to score"):
        score_file(write(tmp_path, "[\n]\n"))


def test_cli_names_the_malformed_line(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps([GOOD, GOOD, {**GOOD, "gpt_answer": None, "image": None}], indent=4))
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_rl.score", "mmad", f"answers={path}"],
        cwd=tmp_path, env={**os.environ, "ANOMALY_RL_ROOT": str(tmp_path)}, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"{path}, line 14: 'image' and 'question_type' must be strings" in result.stderr


# --- MMAD's convention against an independent re-enactment of its script ------------------------------


def mmad_reenacted(records: list[dict[str, Any]], normal_flag: str = "good") -> dict[str, dict[str, float]]:
    """What MMAD's summary script computes, re-enacted from its documented behaviour: it iterates over
    the list and removes each invalid record from that same list while iterating (so Python's list
    iterator passes over the next one), then tabulates every (dataset, type) pair seen in the file."""
    records = list(records)
    merged = {"Object Structure": OA, "Object Details": OA}
    datasets = list(dict.fromkeys(r["image"].split("/")[0] for r in records))
    types = list(dict.fromkeys(merged.get(r["question_type"], r["question_type"]) for r in records))
    counts = {(d, t): [0, 0] for d in datasets for t in types}
    sides = {(d, s): [0, 0] for d in datasets for s in ("normal", "anomalous")}
    letters = ["A", "B", "C", "D", "E"]
    for record in records:
        if record["correct_answer"] not in letters or record["gpt_answer"] not in letters:
            records.remove(record)
            continue
        dataset, qtype = record["image"].split("/")[0], merged.get(record["question_type"], record["question_type"])
        right = record["correct_answer"] == record["gpt_answer"]
        counts[(dataset, qtype)][0] += right
        counts[(dataset, qtype)][1] += 1
        if qtype == AD:
            side = sides[(dataset, "normal" if normal_flag in record["image"] else "anomalous")]
            side[0] += right
            side[1] += 1
    table = {d: {t: 100 * c / n if n else 0.0 for t in types for c, n in [counts[(d, t)]]} for d in datasets}
    for d in datasets:
        if AD in types:
            accuracy = [c / n if n else 0.0 for c, n in (sides[(d, "normal")], sides[(d, "anomalous")])]
            table[d][AD] = 100 * sum(accuracy) / 2
        table[d][AVERAGE] = sum(table[d][t] for t in types) / len(types)
    table[AVERAGE] = {t: sum(table[d][t] for d in datasets) / len(datasets) for t in [*types, AVERAGE]}
    return table


answer_rows = st.lists(
    st.tuples(
        st.sampled_from(["DS-MVTec", "VisA", "GoodsAD"]),
        st.sampled_from([AD, DC, "Object Structure", "Object Details", DL]),
        st.booleans(),  # normal image?
        st.sampled_from(["A", "B", "C", "D"]),  # correct
        st.sampled_from(["A", "B", "C", "D", "E", None, "b", "", "The answer is A"]),  # given
        st.integers(0, 2),  # image number: small, so that equal records occur
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(answer_rows)
def test_mmads_convention_matches_a_reenactment_of_its_script(rows: list[tuple]) -> None:
    records = [
        {"image": f"{d}/cat/{'good' if normal else 'bad'}/{n}.png", "question_type": t, "correct_answer": c,
         "gpt_answer": g}
        for d, t, normal, c, g, n in rows
    ]
    table = score_mmad(records, convention=MMAD)
    want = mmad_reenacted(records)
    for row, cells in want.items():
        for column, value in cells.items():
            assert table.value(row, column) == pytest.approx(value), (row, column)
    assert table.total + table.unparseable + table.skipped == len(records)
