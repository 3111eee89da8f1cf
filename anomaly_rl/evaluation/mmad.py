"""MMAD scoring of any answers file, in two conventions: ours and MMAD's own summary script's.

What MMAD does (read in its repository, jam-cc/MMAD, 2026-12: the query scripts
`evaluation/examples/*/*_query.py` and `evaluation/examples/GPT4/gpt4o.py` write the answers;
`evaluation/examples/helper/summary.py`, function `caculate_accuracy_mmad`, scores them; its
published tables are `all_result/answers_<k>_shot_<model>_accuracy.csv` — tables, not answers):

- The answers file is one JSON list (`json.dump(..., indent=4)`) of records
  `{"image": "<dataset>/<category>/.../<name>", "question": {"type": "text", "text": ...},
  "question_type": ..., "correct_answer": "A".., "gpt_answer": ...}`, one per question. When a
  response names no letter, its scripts store the raw response text as `gpt_answer`.
- Per source dataset (the image path's first component) and per question type: accuracy in
  percent, "Object Structure" and "Object Details" pooled into "Object Analysis", and
  "Anomaly Detection" replaced by the mean of the accuracy on normal images (`good` in the path)
  and on anomalous images (an empty side counts 0). An "Average" column averages a dataset's
  columns; an "Average" row averages the datasets; its Average cell is the number papers quote
  (e.g. 72.19 for Qwen2.5-VL-7B, 1-shot, in MMAD's `all_result` table).
- A record whose `gpt_answer` or `correct_answer` is not one of A-E is **dropped** (removed from
  the denominator), whatever the question's options. Because the script removes it from the
  list it is iterating over, the record right after each dropped one is never visited either:
  it is **skipped** (right or wrong). The result depends on the records' order.
- Every (dataset, question type) pair that occurs anywhere in the file gets a cell, 0 when no
  answer was counted in it, and that 0 enters the averages.

Two conventions here (`score_mmad(..., convention=...)`):

- `ours` (the default): an unparseable answer (not one of the record's option letters, or None)
  is kept, scored wrong and counted, so that a model cannot gain by refusing to answer; nothing is
  skipped, the order does not matter, a cell nobody was asked is absent (not 0).
- `mmad`: exactly what `caculate_accuracy_mmad` computes, dropping and skipping included, so
  that a number can be compared with a published one. The dropped and skipped answers are
  counted beside each cell.

The functions are pure: records in, a table out; only `write_*` / `read_answers*` touch files.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anomaly_rl.data.mmad import (
    ANOMALY_DETECTION,
    NORMAL_FLAG,
    QUESTION_TYPES,
    MmadQuestion,
    anomaly_detection_letters,
    score_type,
)

AVERAGE = "Average"
MMAD_LETTERS = ("A", "B", "C", "D", "E")
"""The letters MMAD's script accepts (and ours, when a record does not carry its own options)."""
OURS, MMAD = "ours", "mmad"
CONVENTIONS = (OURS, MMAD)
SCORES_CSV = "mmad_scores.csv"
"""Our convention's table, in the layout of MMAD's `_accuracy.csv` files."""
SCORES_MMAD_CSV = "mmad_scores_mmad.csv"
"""MMAD's convention's table, same layout: comparable with MMAD's published `_accuracy.csv`."""
COUNTS_CSV = "mmad_counts.csv"
"""Every cell of both tables, one row each, with its counts (correct, total, unparseable, skipped)."""
SCORES_MD = "mmad_scores.md"
SUMMARY_JSON = "mmad_summary.json"


class MmadAnswersError(ValueError):
    """An answers file or record is malformed; the message names the file and line (or the record)."""


# --- prompting and parsing ----------------------------------------------------------------------


def format_multiple_choice(question: str, options: Mapping[str, str]) -> str:
    """The question followed by one "A. option" line per option, in the file's order (as MMAD shows it)."""
    return "\n".join([question.strip(), *(f"{letter}. {text}" for letter, text in options.items())])


_TAG = re.compile(r"</?[A-Za-z_]+>")
_BARE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?")
# "Answer: B", "the correct option is (C)", "answer: b." — a lower-case letter only when nothing
# follows it, so that "the answer is a scratch" is not read as option a.
_STATED = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)\s*(?i:is|would\s+be|should\s+be|will\s+be)?\s*[:：]?\s*[(\[]?\s*"
    r"(?:([A-Z])(?![A-Za-z])|([a-z])(?=\s*(?:[.)\],:;!]|$)))"
)
_LEADING = re.compile(r"\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])\s*[.:)](?!\d))")
_STANDALONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
# "A" and "I" are also English words: followed by a lower-case word they are not option letters,
# unless that word is one that follows a letter naming an option ("A or B", "A is right").
_WORD_AFTER = re.compile(r"\s+([a-z]+)")
_AFTER_A_LETTER = frozenset("or and nor is was seems looks because since as would should".split())


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _is_word(text: str, end: int) -> bool:
    after = _WORD_AFTER.match(text, end)
    return after is not None and after.group(1) not in _AFTER_A_LETTER


def parse_choice(text: str | None, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None when it picks none or several. Never raises.

    Tried in order: the letter alone ("B", "(b)", "B."), a stated answer ("Answer: B", "the option is
    C"), a leading option marker ("B. No", "(B) No"), the option's text alone ("No."), a single
    capital option letter anywhere, then a single option text contained in the answer. Returns the
    key as spelt in `options`.
    """
    if not isinstance(text, str) or not isinstance(options, Mapping) or not options:
        return None
    letters = {str(k).strip().upper(): k for k in options if len(str(k).strip()) == 1}
    answer = _TAG.sub(" ", text).strip()
    if not answer:
        return None

    bare = _BARE.fullmatch(answer)
    if bare:
        return letters.get(bare.group(1).upper())

    stated = [(m.group(1) or m.group(2)).upper() for m in _STATED.finditer(answer)]
    stated = [letter for letter in stated if letter in letters]
    if stated:
        return letters[stated[-1]]  # a model that corrects itself states its final answer last

    leading = _LEADING.match(answer)
    if leading:
        letter = next(g for g in leading.groups() if g).upper()
        if letter in letters:
            return letters[letter]

    normalised = _norm(answer)
    texts = {key: _norm(str(value)) for key, value in options.items()}
    exact = [key for key, value in texts.items() if value and value == normalised]
    if len(exact) == 1:
        return exact[0]

    standalone = {
        m.group(1)
        for m in _STANDALONE.finditer(answer)
        if m.group(1) in letters and not (m.group(1) in ("A", "I") and _is_word(answer, m.end()))
    }
    if len(standalone) == 1:
        return letters[standalone.pop()]
    if standalone:
        return None  # several letters named: ambiguous, whatever the text says

    padded = f" {normalised} "
    contained = sorted(
        (key for key, value in texts.items() if value and f" {value} " in padded),
        key=lambda key: len(texts[key]),
        reverse=True,
    )
    if contained and all(f" {texts[k]} " in f" {texts[contained[0]]} " for k in contained[1:]):
        return contained[0]  # one option, or one whose text includes the others' ("deep scratch")
    return None


def detection_choice(is_anomalous: bool | None, options: Mapping[str, str]) -> str | None:
    """MMAD's letter for a yes/no decision on an Anomaly Detection question (None stays None).

    Lets a model answering in its own schema (a = anomalous, b = normal) be scored on MMAD.
    """
    if is_anomalous is None:
        return None
    anomalous, normal = anomaly_detection_letters(options)
    return anomalous if is_anomalous else normal


# --- MMAD's answers format ----------------------------------------------------------------------


def answers_records(
    items: Sequence[MmadQuestion],
    choices: Sequence[str | None],
    responses: Sequence[str | None] | None = None,
) -> list[dict[str, Any]]:
    """Records in MMAD's answers format, one per question, ready for `score_mmad` or MMAD's script.

    `choices` are the picked letters (None when the response picked none); `responses`, if given,
    are kept as an extra "response" field so that a wrong or unparseable answer can be read later.
    """
    if len(choices) != len(items) or (responses is not None and len(responses) != len(items)):
        raise ValueError(
            f"answers_records: {len(items)} questions but {len(choices)} choices"
            + ("" if responses is None else f" and {len(responses)} responses")
        )
    records = []
    for i, (item, choice) in enumerate(zip(items, choices, strict=True)):
        record: dict[str, Any] = {
            "image": item.image_key,
            "question": {
                "type": "text",
                "text": format_multiple_choice(item.question, item.options),
                "options": dict(item.options),
            },
            "question_type": item.question_type,
            "correct_answer": item.answer,
            "gpt_answer": choice,
        }
        if responses is not None:
            record["response"] = responses[i]
        records.append(record)
    return records


def write_answers(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), indent=2, ensure_ascii=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class AnswersFile:
    """The records of an answers file with the line each one starts on (for error messages)."""

    path: Path
    records: list[Any]
    lines: list[int]  # 1-based

    @property
    def locations(self) -> list[str]:
        return [f"{self.path}, line {line}" for line in self.lines]


_JSON_SPACE = " \t\n\r"


class _Lines:
    """Line numbers of text positions, for positions met in increasing order (linear overall)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_SPACE:
        pos += 1
    return pos


def _json_list(text: str, start: int, path: Path) -> tuple[list[Any], list[int]]:
    decoder, line_of = json.JSONDecoder(), _Lines(text)
    records: list[Any] = []
    lines: list[int] = []
    pos = _skip_space(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as error:
                raise MmadAnswersError(
                    f"{path}, line {error.lineno} column {error.colno}: not valid JSON ({error.msg})"
                ) from error
            records.append(record)
            lines.append(line_of(pos))
            pos = _skip_space(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_space(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            found = "the end of the file" if pos >= len(text) else repr(text[pos])
            raise MmadAnswersError(
                f"{path}, line {line_of(pos)}: expected ',' or ']' after an answer record, found {found}"
            )
    pos = _skip_space(text, pos)
    if pos < len(text):
        raise MmadAnswersError(f"{path}, line {line_of(pos)}: unexpected text after the list of answer records")
    return records, lines


def _json_lines(text: str, path: Path) -> tuple[list[Any], list[int]]:
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):  # one object: a one-record file, or not an answers file at all
        if "gpt_answer" in whole:
            return [whole], [1 + text[: len(text) - len(text.lstrip(_JSON_SPACE))].count("\n")]
        raise MmadAnswersError(
            f"{path}, line 1: expected a JSON list of answer records (or one record per line), got one JSON "
            f"object without 'gpt_answer' (is it mmad.json, the questions? An answers file holds "
            f"{{\"image\", \"question_type\", \"correct_answer\", \"gpt_answer\"}} records)"
        )
    records: list[Any] = []
    lines: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as error:
            raise MmadAnswersError(
                f"{path}, line {number} column {error.colno}: not valid JSON ({error.msg}; "
                f"a file of JSON lines holds one answer record per line)"
            ) from error
        lines.append(number)
    return records, lines


def read_answers_file(path: str | Path) -> AnswersFile:
    """An answers file: MMAD's JSON list (its query scripts, `write_answers`) or JSON lines.

    Syntax errors name the file and line; the records themselves are checked by `score_mmad`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMAD answers file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise MmadAnswersError(f"{path}: not UTF-8 text ({error})") from error
    start = _skip_space(text, 0)
    if start == len(text):
        raise MmadAnswersError(f"{path}: empty file, no answer records")
    if text[start] == "[":
        records, lines = _json_list(text, start, path)
    elif text[start] == "{":
        records, lines = _json_lines(text, path)
    else:
        raise MmadAnswersError(
            f"{path}, line {_Lines(text)(start)}: expected a JSON list of answer records or one record per line, "
            f"found {text[start]!r}"
        )
    return AnswersFile(path, records, lines)


def read_answers(path: str | Path) -> list[Any]:
    """The records of an answers file (see `read_answers_file`)."""
    return read_answers_file(path).records


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    correct: int = 0
    total: int = 0  # answers in the denominator
    unparseable: int = 0  # ours: inside total, scored wrong; MMAD's: dropped, outside total
    skipped: int = 0  # MMAD's only: answers its script never visits (the one after each dropped one)

    def add(self, correct: bool, unparseable: bool) -> Tally:
        """One answer, counted (our convention: an unparseable one is counted, and wrong)."""
        return replace(self, correct=self.correct + correct, total=self.total + 1,
                       unparseable=self.unparseable + unparseable)

    def drop(self) -> Tally:
        return replace(self, unparseable=self.unparseable + 1)

    def skip(self) -> Tally:
        return replace(self, skipped=self.skipped + 1)

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.correct + other.correct, self.total + other.total,
                     self.unparseable + other.unparseable, self.skipped + other.skipped)

    @property
    def accuracy(self) -> float:
        """Fraction correct; 0 for an empty tally, as MMAD does."""
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class ScoreTable:
    """MMAD's accuracy table (percent) in one convention, with the counts behind every cell."""

    datasets: tuple[str, ...]  # rows, in order of first appearance (as MMAD)
    question_types: tuple[str, ...]  # columns, MMAD's order, object types merged
    cells: dict[str, dict[str, float]]  # dataset -> column -> percent; ours: absent where nothing was asked
    dataset_average: dict[str, float]  # the "Average" column
    type_average: dict[str, float]  # the "Average" row, over the datasets that have the column
    overall: float  # the Average row's Average: mean of dataset_average
    tallies: dict[str, dict[str, Tally]]  # dataset -> column -> counts (plain, not balanced)
    detection: dict[str, tuple[Tally, Tally]]  # dataset -> (normal images, anomalous images)
    notes: tuple[str, ...] = field(default=())
    convention: str = OURS
    records: int = 0  # answer records read

    @property
    def total(self) -> int:
        """Answers in the denominators (ours: every record; MMAD's: neither dropped nor skipped)."""
        return sum(t.total for row in self.tallies.values() for t in row.values())

    @property
    def unparseable(self) -> int:
        return sum(t.unparseable for row in self.tallies.values() for t in row.values())

    @property
    def skipped(self) -> int:
        return sum(t.skipped for row in self.tallies.values() for t in row.values())

    def value(self, dataset: str, column: str) -> float | None:
        """A cell of the printed table; `AVERAGE` names the extra row and column."""
        if dataset == AVERAGE:
            return self.overall if column == AVERAGE else self.type_average.get(column)
        if column == AVERAGE:
            return self.dataset_average.get(dataset)
        return self.cells.get(dataset, {}).get(column)

    def counts(self, dataset: str, column: str) -> Tally:
        """The counts behind a cell; for an Average row or column, the sum of the cells it averages."""
        rows = self.datasets if dataset == AVERAGE else (dataset,)
        columns = self.question_types if column == AVERAGE else (column,)
        total = Tally()
        for row in rows:
            for col in columns:
                total = total + self.tallies.get(row, {}).get(col, Tally())
        return total

    def grid(self) -> list[tuple[str, list[float | None]]]:
        """Rows (name, values) of the printed table, Average row and column included."""
        columns = [*self.question_types, AVERAGE]
        return [(row, [self.value(row, c) for c in columns]) for row in [*self.datasets, AVERAGE]]


def _letters(record: Mapping[str, Any]) -> set[str]:
    question = record.get("question")
    options = question.get("options") if isinstance(question, Mapping) else None
    return set(options) if isinstance(options, Mapping) and options else set(MMAD_LETTERS)


def _checked(record: Any, where: str) -> tuple[str, str, str, Any, set[str]]:
    if not isinstance(record, Mapping):
        raise MmadAnswersError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in ("image", "question_type", "correct_answer", "gpt_answer") if k not in record]
    if missing:
        raise MmadAnswersError(f"{where}: missing {missing}")
    image, qtype, correct = record["image"], record["question_type"], record["correct_answer"]
    if not isinstance(image, str) or not image or not isinstance(qtype, str):
        raise MmadAnswersError(f"{where}: 'image' and 'question_type' must be strings")
    letters = _letters(record)
    if correct not in letters:
        raise MmadAnswersError(f"{where} ({image}): correct_answer {correct!r} is not one of {sorted(letters)}")
    return image, score_type(qtype), correct, record["gpt_answer"], letters


def _column_order(present: Sequence[str]) -> tuple[str, ...]:
    known = list(dict.fromkeys(score_type(t) for t in QUESTION_TYPES))
    return tuple([t for t in known if t in present] + [t for t in present if t not in known])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _is_letter(value: Any, letters: Sequence[str] | set[str]) -> bool:
    return isinstance(value, str) and value in letters


def score_mmad(
    answers: Sequence[Any],
    *,
    normal_flag: str = NORMAL_FLAG,
    convention: str = OURS,
    locations: Sequence[str] | None = None,
) -> ScoreTable:
    """MMAD's accuracy table from answer records in one convention (see the module docstring).

    `locations` name the records in error messages (e.g. "answers.json, line 12"); by default
    "answer record <index>". Every record is checked before anything is scored.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not answers:
        raise MmadAnswersError("no answer records to score")
    if locations is not None and len(locations) != len(answers):
        raise ValueError(f"{len(answers)} answer records but {len(locations)} locations")
    where = locations or [f"answer record {i}" for i in range(len(answers))]
    checked = [_checked(record, where[i]) for i, record in enumerate(answers)]

    tallies: dict[str, dict[str, Tally]] = {}
    detection: dict[str, list[Tally]] = {}
    types_seen: list[str] = []

    def update(index: int, how: str, right: bool = False, unparseable: bool = False) -> None:
        step = {"add": lambda t: t.add(right, unparseable), "drop": Tally.drop, "skip": Tally.skip}[how]
        image, column, *_ = checked[index]
        dataset = image.split("/")[0]
        row = tallies.setdefault(dataset, {})
        row[column] = step(row.get(column, Tally()))
        if column not in types_seen:
            types_seen.append(column)
        if column == ANOMALY_DETECTION:
            sides = detection.setdefault(dataset, [Tally(), Tally()])
            side = 0 if normal_flag in image else 1
            sides[side] = step(sides[side])

    if convention == OURS:
        for index, (_, _, correct, given, letters) in enumerate(checked):
            unparseable = not _is_letter(given, letters)
            update(index, "add", right=not unparseable and given == correct, unparseable=unparseable)
    else:
        index = 0
        while index < len(checked):
            _, _, correct, given, _ = checked[index]
            if not (_is_letter(correct, MMAD_LETTERS) and _is_letter(given, MMAD_LETTERS)):
                update(index, "drop")
                if index + 1 < len(checked):
                    update(index + 1, "skip")  # removed from the list being iterated: the next one is passed over
                index += 2
                continue
            update(index, "add", right=given == correct)
            index += 1

    datasets = tuple(tallies)
    columns = _column_order(types_seen)
    notes: list[str] = []
    cells: dict[str, dict[str, float]] = {}
    for dataset in datasets:
        present = columns if convention == MMAD else tuple(tallies[dataset])
        cells[dataset] = {c: 100 * tallies[dataset].get(c, Tally()).accuracy for c in present}
        if ANOMALY_DETECTION in cells[dataset]:
            normal, anomalous = detection.get(dataset, (Tally(), Tally()))
            cells[dataset][ANOMALY_DETECTION] = 100 * (normal.accuracy + anomalous.accuracy) / 2
            for name, side in (("normal", normal), ("anomalous", anomalous)):
                if side.total == 0:
                    notes.append(
                        f"{dataset}: no {name} images among the counted {ANOMALY_DETECTION} answers; "
                        f"as in MMAD, that side counts as 0% in the balanced accuracy"
                    )
        if convention == MMAD:
            for column in columns:
                if tallies[dataset].get(column, Tally()).total == 0:
                    notes.append(f"{dataset}: no counted {column} answer; as MMAD's script does, the cell is 0 "
                                 f"and enters the averages")
    dataset_average = {d: _mean(list(cells[d].values())) for d in datasets}
    type_average = {c: _mean([cells[d][c] for d in datasets if c in cells[d]]) for c in columns}
    return ScoreTable(
        datasets=datasets,
        question_types=columns,
        cells=cells,
        dataset_average=dataset_average,
        type_average=type_average,
        overall=_mean(list(dataset_average.values())),
        tallies=tallies,
        detection={d: (sides[0], sides[1]) for d, sides in detection.items()},
        notes=tuple(dict.fromkeys(notes)),
        convention=convention,
        records=len(answers),
    )


def score_conventions(
    answers: Sequence[Any], *, normal_flag: str = NORMAL_FLAG, locations: Sequence[str] | None = None
) -> dict[str, ScoreTable]:
    """{"ours": ..., "mmad": ...}: the same answers in both conventions."""
    return {c: score_mmad(answers, normal_flag=normal_flag, convention=c, locations=locations) for c in CONVENTIONS}


def table_summary(table: ScoreTable) -> dict[str, Any]:
    """The numbers of one table, for JSON."""
    return {
        "overall": table.overall,
        "dataset_average": dict(table.dataset_average),
        "type_average": dict(table.type_average),
        "cells": {d: dict(row) for d, row in table.cells.items()},
        "records": table.records,
        "total": table.total,
        "unparseable": table.unparseable,
        "skipped": table.skipped,
        "notes": list(table.notes),
    }


# --- writing ------------------------------------------------------------------------------------

TITLES = {
    OURS: "Unparseable answers counted wrong (anomaly_rl's convention, the default)",
    MMAD: "Unparseable answers dropped (MMAD's summary script: how MMAD's published numbers are computed)",
}


def _write_grid(table: ScoreTable, path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", *table.question_types, AVERAGE])
        for row, values in table.grid():
            writer.writerow([row, *("" if v is None else repr(v) for v in values)])
    return path


def write_scores(tables: Mapping[str, ScoreTable], out_dir: str | Path, source: str | None = None) -> list[Path]:
    """`mmad_scores.csv` (ours) and `mmad_scores_mmad.csv` (MMAD's) in MMAD's `_accuracy.csv`
    layout, `mmad_counts.csv` (every cell of both, with its counts) and `mmad_scores.md` (both
    tables, each cell with its count of unparseable answers) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for convention, name in ((OURS, SCORES_CSV), (MMAD, SCORES_MMAD_CSV)):
        if convention in tables:
            paths.append(_write_grid(tables[convention], out / name))
    counts = out / COUNTS_CSV
    with counts.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["convention", "dataset", "question_type", "accuracy", "correct", "total", "unparseable",
                         "skipped"])
        for convention, table in tables.items():
            for dataset in [*table.datasets, AVERAGE]:
                for column in [*table.question_types, AVERAGE]:
                    value = table.value(dataset, column)
                    if value is None:
                        continue
                    tally = table.counts(dataset, column)
                    writer.writerow([convention, dataset, column, repr(value), tally.correct, tally.total,
                                     tally.unparseable, tally.skipped])
    paths.append(counts)
    md_path = out / SCORES_MD
    md_path.write_text(render_markdown(tables, source), encoding="utf-8")
    paths.append(md_path)
    return paths


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _cell(table: ScoreTable, dataset: str, column: str) -> str:
    value = table.value(dataset, column)
    if value is None:
        return "–"
    tally = table.counts(dataset, column)
    skipped = f"; {tally.skipped} skipped" if tally.skipped else ""
    return f"{value:.2f} ({tally.unparseable}{skipped})"


def _table_lines(table: ScoreTable) -> list[str]:
    columns = [*table.question_types, AVERAGE]
    lines = ["| Dataset | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in [*table.datasets, AVERAGE]:
        name = f"**{row}**" if row == AVERAGE else row
        lines.append(f"| {name} | " + " | ".join(_cell(table, row, c) for c in columns) + " |")
    return lines


def render_markdown(tables: Mapping[str, ScoreTable] | ScoreTable, source: str | None = None) -> str:
    """Both conventions' tables (each cell: accuracy (unparseable answers in it)), counts, notes."""
    if isinstance(tables, ScoreTable):
        tables = {tables.convention: tables}
    first = next(iter(tables.values()))
    lines = [
        "# MMAD accuracy (%)",
        "",
        f"{first.records} answer records{f' from {source}' if source else ''}. Each cell: accuracy "
        "(unparseable answers in it). Anomaly Detection is the mean of the accuracy on normal and on "
        "anomalous images; Object Analysis pools Object Structure and Object Details.",
    ]
    for convention, table in tables.items():
        lines += ["", f"## {TITLES[convention]}", "", *_table_lines(table), ""]
        if convention == OURS:
            lines.append(f"Unparseable answers (scored wrong, not dropped): {table.unparseable} of {table.records}.")
        else:
            lines.append(
                f"Dropped as unparseable (not a letter A-E): {table.unparseable} of {table.records}; skipped (the "
                f"record after each dropped one, which MMAD's script never visits): {table.skipped}; accuracy is "
                f"over the other {table.total}. A question type a dataset has no counted answer for scores 0."
            )
    lines += [
        "",
        "## Counts: correct / total (unparseable: ours scores them wrong, MMAD's drops them)",
        "",
        "| Convention | Dataset | " + " | ".join(first.question_types) + " |",
        "|---|---|" + "---:|" * len(first.question_types),
    ]
    for convention, table in tables.items():
        for dataset in table.datasets:
            row = table.tallies[dataset]
            cells = [
                f"{t.correct}/{t.total} ({t.unparseable}{f'; {t.skipped} skipped' if t.skipped else ''})"
                if (t := row.get(c)) is not None else "–"
                for c in first.question_types
            ]
            lines.append(f"| {convention} | {dataset} | " + " | ".join(cells) + " |")
    if any(table.detection for table in tables.values()):
        lines += [
            "",
            f"## {ANOMALY_DETECTION}: correct / total (accuracy) on normal and anomalous images",
            "",
            "| Convention | Dataset | normal | anomalous |",
            "|---|---|---:|---:|",
        ]
        for convention, table in tables.items():
            for dataset, (normal, anomalous) in table.detection.items():
                lines.append(
                    f"| {convention} | {dataset} | {normal.correct}/{normal.total} ({100 * normal.accuracy:.2f}) "
                    f"| {anomalous.correct}/{anomalous.total} ({100 * anomalous.accuracy:.2f}) |"
                )
    notes = [f"{convention}: {note}" for convention, table in tables.items() for note in table.notes]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class MmadScores:
    """What `score_and_write` produced."""

    tables: dict[str, ScoreTable]
    files: list[Path]
    markdown: str

    def summary(self) -> dict[str, Any]:
        """Our convention's numbers at the top level (the default), MMAD's under "mmad"."""
        return {**table_summary(self.tables[OURS]), MMAD: table_summary(self.tables[MMAD]),
                "files": [str(p) for p in self.files]}


def score_and_write(
    answers: Sequence[Any] | AnswersFile,
    out_dir: str | Path,
    *,
    normal_flag: str = NORMAL_FLAG,
) -> MmadScores:
    """Score answers (records, or a file read by `read_answers_file`) in both conventions and
    write the tables and `mmad_summary.json` into `out_dir`. The one function behind
    `python -m anomaly_rl.score mmad` and `python -m anomaly_rl.evaluate data=mmad`."""
    source = None
    locations = None
    if isinstance(answers, AnswersFile):
        source, locations, answers = str(answers.path), answers.locations, answers.records
    tables = score_conventions(answers, normal_flag=normal_flag, locations=locations)
    files = write_scores(tables, out_dir, source)
    summary_path = Path(out_dir) / SUMMARY_JSON
    scores = MmadScores(tables, [*files, summary_path], render_markdown(tables, source))
    summary_path.write_text(json.dumps({"answers": source, **scores.summary()}, indent=2) + "\n", encoding="utf-8")
    return scores
