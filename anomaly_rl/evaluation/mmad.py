"""MMAD scoring, computed as MMAD's own summary script computes it (helper/summary.py).

Per source dataset (the first component of the image path) and per question type: accuracy in
percent, with "Object Structure" and "Object Details" pooled into "Object Analysis", and
"Anomaly Detection" replaced by the mean of the accuracy on normal images (`good` in the path)
and on anomalous images. An "Average" column averages a dataset's question types; an "Average"
row averages the datasets, its Average cell being the mean of the datasets' Averages — the single
number papers quote (e.g. 72.19 for Qwen2.5-VL-7B, 1-shot).

One deliberate difference: MMAD drops answers whose letter is not valid (and, by removing from
the list it iterates over, also skips the record after each one). Here an unparseable answer is
kept, scored wrong and counted, so that a model cannot gain by refusing to answer.

The functions are pure: records in, a table out; only `write_*` / `read_answers` touch files.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
"""The letters MMAD accepts when a record does not carry its own options."""
SCORES_CSV = "mmad_scores.csv"
SCORES_MD = "mmad_scores.md"


class MmadAnswersError(ValueError):
    """An answers record lacks a field MMAD's format requires, or its correct answer is not a letter."""


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


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """An answers file written by `write_answers` or by MMAD's own query scripts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMAD answers file not found: {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MmadAnswersError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise MmadAnswersError(f"{path}: expected a JSON list of answer records")
    return records


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    correct: int = 0
    total: int = 0
    unparseable: int = 0  # included in total, never in correct

    def add(self, correct: bool, unparseable: bool) -> Tally:
        return Tally(self.correct + correct, self.total + 1, self.unparseable + unparseable)

    @property
    def accuracy(self) -> float:
        """Fraction correct; 0 for an empty tally, as MMAD does."""
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class ScoreTable:
    """MMAD's accuracy table (percent) with the counts behind every cell."""

    datasets: tuple[str, ...]  # rows, in order of first appearance (as MMAD)
    question_types: tuple[str, ...]  # columns, MMAD's order, object types merged
    cells: dict[str, dict[str, float]]  # dataset -> column -> percent; absent where nothing was asked
    dataset_average: dict[str, float]  # the "Average" column
    type_average: dict[str, float]  # the "Average" row, over the datasets that have the column
    overall: float  # the Average row's Average: mean of dataset_average
    tallies: dict[str, dict[str, Tally]]  # dataset -> column -> counts (plain, not balanced)
    detection: dict[str, tuple[Tally, Tally]]  # dataset -> (normal images, anomalous images)
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(t.total for row in self.tallies.values() for t in row.values())

    @property
    def unparseable(self) -> int:
        return sum(t.unparseable for row in self.tallies.values() for t in row.values())

    def value(self, dataset: str, column: str) -> float | None:
        """A cell of the printed table; `AVERAGE` names the extra row and column."""
        if dataset == AVERAGE:
            return self.overall if column == AVERAGE else self.type_average.get(column)
        if column == AVERAGE:
            return self.dataset_average.get(dataset)
        return self.cells.get(dataset, {}).get(column)

    def grid(self) -> list[tuple[str, list[float | None]]]:
        """Rows (name, values) of the printed table, Average row and column included."""
        columns = [*self.question_types, AVERAGE]
        return [(row, [self.value(row, c) for c in columns]) for row in [*self.datasets, AVERAGE]]


def _letters(record: Mapping[str, Any]) -> set[str]:
    question = record.get("question")
    options = question.get("options") if isinstance(question, Mapping) else None
    return set(options) if isinstance(options, Mapping) and options else set(MMAD_LETTERS)


def _checked(record: Any, index: int) -> tuple[str, str, str, Any, set[str]]:
    if not isinstance(record, Mapping):
        raise MmadAnswersError(f"answer record {index}: expected an object, got {type(record).__name__}")
    missing = [k for k in ("image", "question_type", "correct_answer", "gpt_answer") if k not in record]
    if missing:
        raise MmadAnswersError(f"answer record {index}: missing {missing}")
    image, qtype, correct = record["image"], record["question_type"], record["correct_answer"]
    if not isinstance(image, str) or not image or not isinstance(qtype, str):
        raise MmadAnswersError(f"answer record {index}: 'image' and 'question_type' must be strings")
    letters = _letters(record)
    if correct not in letters:
        raise MmadAnswersError(
            f"answer record {index} ({image}): correct_answer {correct!r} is not one of {sorted(letters)}"
        )
    return image, score_type(qtype), correct, record["gpt_answer"], letters


def _column_order(present: Sequence[str]) -> tuple[str, ...]:
    known = list(dict.fromkeys(score_type(t) for t in QUESTION_TYPES))
    return tuple([t for t in known if t in present] + [t for t in present if t not in known])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def score_mmad(answers: Sequence[Mapping[str, Any]], *, normal_flag: str = NORMAL_FLAG) -> ScoreTable:
    """MMAD's accuracy table from answer records (see the module docstring for the rules)."""
    if not answers:
        raise MmadAnswersError("no answer records to score")
    tallies: dict[str, dict[str, Tally]] = {}
    detection: dict[str, list[Tally]] = {}
    types_seen: list[str] = []
    for index, record in enumerate(answers):
        image, column, correct, given, letters = _checked(record, index)
        dataset = image.split("/")[0]
        unparseable = not isinstance(given, str) or given not in letters
        right = not unparseable and given == correct
        row = tallies.setdefault(dataset, {})
        row[column] = row.get(column, Tally()).add(right, unparseable)
        if column not in types_seen:
            types_seen.append(column)
        if column == ANOMALY_DETECTION:
            sides = detection.setdefault(dataset, [Tally(), Tally()])
            side = 0 if normal_flag in image else 1
            sides[side] = sides[side].add(right, unparseable)

    datasets = tuple(tallies)
    columns = _column_order(types_seen)
    notes: list[str] = []
    cells: dict[str, dict[str, float]] = {}
    for dataset in datasets:
        cells[dataset] = {c: 100 * t.accuracy for c, t in tallies[dataset].items()}
        if dataset in detection:
            normal, anomalous = detection[dataset]
            cells[dataset][ANOMALY_DETECTION] = 100 * (normal.accuracy + anomalous.accuracy) / 2
            for name, side in (("normal", normal), ("anomalous", anomalous)):
                if side.total == 0:
                    notes.append(
                        f"{dataset}: no {name} images among the {ANOMALY_DETECTION} answers; "
                        f"as in MMAD, that side counts as 0% in the balanced accuracy"
                    )
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
        notes=tuple(notes),
    )


# --- writing ------------------------------------------------------------------------------------


def write_scores(table: ScoreTable, out_dir: str | Path) -> tuple[Path, Path]:
    """`mmad_scores.csv` (MMAD's `_accuracy.csv` layout) and `mmad_scores.md` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [*table.question_types, AVERAGE]
    csv_path = out / SCORES_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", *columns])
        for row, values in table.grid():
            writer.writerow([row, *("" if v is None else repr(v) for v in values)])
    md_path = out / SCORES_MD
    md_path.write_text(render_markdown(table), encoding="utf-8")
    return csv_path, md_path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_markdown(table: ScoreTable) -> str:
    columns = [*table.question_types, AVERAGE]
    lines = [
        "# MMAD accuracy (%)",
        "",
        "| Dataset | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row, values in table.grid():
        name = f"**{row}**" if row == AVERAGE else row
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |")
    lines += [
        "",
        f"{ANOMALY_DETECTION} is the mean of the accuracy on normal and on anomalous images; "
        "Object Analysis pools Object Structure and Object Details.",
        f"Unparseable answers (scored wrong, not dropped): {table.unparseable} of {table.total}.",
        "",
        "## Counts: correct / total (unparseable)",
        "",
        "| Dataset | " + " | ".join(table.question_types) + " |",
        "|---|" + "---:|" * len(table.question_types),
    ]
    for dataset in table.datasets:
        row = table.tallies[dataset]
        cells = [
            f"{t.correct}/{t.total} ({t.unparseable})" if (t := row.get(c)) is not None else "–"
            for c in table.question_types
        ]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    if table.detection:
        lines += [
            "",
            f"## {ANOMALY_DETECTION}: accuracy on normal / anomalous images",
            "",
            "| Dataset | normal | anomalous |",
            "|---|---:|---:|",
        ]
        for dataset, (normal, anomalous) in table.detection.items():
            lines.append(
                f"| {dataset} | {normal.correct}/{normal.total} ({100 * normal.accuracy:.2f}) "
                f"| {anomalous.correct}/{anomalous.total} ({100 * anomalous.accuracy:.2f}) |"
            )
    if table.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in table.notes)]
    return "\n".join(lines) + "\n"
