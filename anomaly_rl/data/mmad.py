"""Reader for the MMAD benchmark (jam-cc/MMAD): multiple-choice questions about industrial images.

`mmad.json` maps each query image (path relative to the data root, first component = source
dataset, e.g. `DS-MVTec/bottle/image/broken_large/000.png`) to its mask, its normal templates and
a conversation of questions. Every question becomes an `MmadQuestion` for evaluation; every image
with an "Anomaly Detection" question also becomes a `Sample`, so the benchmark's images can feed
GRPO training and the image-level metrics like any other dataset.

Paths are resolved and checked here, once, so that a missing file is reported by name before any
model runs, not half-way through a benchmark.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from anomaly_rl.data.boxes import BoxConfig, boxes_from_mask
from anomaly_rl.data.errors import DataError, ErrorPolicy
from anomaly_rl.data.files import image_size, read_sample_mask
from anomaly_rl.data.records import ANOMALOUS, NORMAL, Box, Sample

log = logging.getLogger(__name__)

MMAD_JSON = "mmad.json"
ANOMALY_DETECTION = "Anomaly Detection"
OBJECT_ANALYSIS = "Object Analysis"
OBJECT_ANALYSIS_PARTS = ("Object Structure", "Object Details")
QUESTION_TYPES = (
    ANOMALY_DETECTION,
    "Defect Classification",
    "Defect Localization",
    "Defect Description",
    "Defect Analysis",
    "Object Classification",
    *OBJECT_ANALYSIS_PARTS,
)
NORMAL_FLAG = "good"
"""MMAD calls an image normal when this string occurs in its path (its `normal_flag`)."""

TemplateSource = Literal["similar", "random"]


class MmadError(DataError):
    """Something in an MMAD data folder or in the reader's settings is wrong."""


class MmadFileNotFoundError(MmadError, FileNotFoundError):
    """mmad.json, a query image, a template or a mask is missing."""


class MmadFormatError(MmadError):
    """An entry of mmad.json (or a file it names) does not have the documented shape."""


class MmadFilterError(MmadError):
    """A requested source dataset or question type does not occur in mmad.json."""


@dataclass(frozen=True)
class MmadQuestion:
    """One multiple-choice question about one query image."""

    image_key: str  # the mmad.json key: path relative to the root; MMAD's answers call it "image"
    image_path: str  # absolute
    dataset: str  # source dataset, the key's first component (DS-MVTec, VisA, ...)
    category: str  # the key's second component (bottle, candle, ...)
    question: str
    options: dict[str, str]  # letter -> option text, in the file's order, lettered A, B, C... as MMAD does
    answer: str  # the right letter, a key of `options`
    question_type: str
    reference_paths: tuple[str, ...]  # absolute paths of the normal templates shown beside the query
    index: int  # position in the image's conversation
    mask_path: str | None = None  # absolute; None when mmad.json gives none

    @property
    def is_normal(self) -> bool:
        """MMAD's own rule (substring of the path), so that scoring agrees with its tables."""
        return NORMAL_FLAG in self.image_key

    @property
    def score_type(self) -> str:
        """The column MMAD scores this question in: the two object types are merged."""
        return score_type(self.question_type)


@dataclass
class MmadData:
    """Everything read from one MMAD root under one set of filters."""

    root: str
    items: list[MmadQuestion]
    samples: list[Sample]  # one per image with an "Anomaly Detection" question
    skipped_errors: list[DataError] = field(default_factory=list)  # entries passed over (on_error="skip")

    @property
    def skipped(self) -> int:
        return len(self.skipped_errors)

    @property
    def skip_reasons(self) -> list[str]:
        return [str(error) for error in self.skipped_errors]

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(item.dataset for item in self.items))

    @property
    def question_types(self) -> list[str]:
        return list(dict.fromkeys(item.question_type for item in self.items))


def score_type(question_type: str) -> str:
    return OBJECT_ANALYSIS if question_type in OBJECT_ANALYSIS_PARTS else question_type


# --- the anomaly-detection options -------------------------------------------------------------

_POSITIVE_WORDS = {"yes", "anomalous", "abnormal", "defective", "anomaly", "defect", "defects", "damaged"}
_NEGATIVE_FIRST = {"no", "normal", "good", "non-defective", "nondefective", "intact", "flawless", "ok"}
_NEGATIONS = {"no", "not", "without", "none", "free"}


def _polarity(text: str) -> bool | None:
    """True if an option text asserts a defect, False if it denies one, None if it says neither.

    MMAD's options are "Yes"/"No" in some form; other phrasings are read by their first word, then by
    negated or plain defect words, so that "There is no defect." and "Yes, it has one." both work.
    """
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())
    if not words:
        return None
    if words[0] in _NEGATIVE_FIRST:
        return False
    if words[0] in _POSITIVE_WORDS:
        return True
    has_defect_word = any(w in _POSITIVE_WORDS for w in words)
    if has_defect_word and any(w in _NEGATIONS for w in words):
        return False
    if "normal" in words:
        return False
    return True if has_defect_word else None


def anomaly_detection_letters(options: Mapping[str, str]) -> tuple[str, str]:
    """(letter meaning "anomalous", letter meaning "normal") of an Anomaly Detection question.

    Also lets the evaluator turn a model's own a/b decision into MMAD's letter.
    Raises MmadFormatError unless exactly one option says yes and exactly one says no.
    """
    positive = [k for k, v in options.items() if _polarity(str(v)) is True]
    negative = [k for k, v in options.items() if _polarity(str(v)) is False]
    if len(positive) != 1 or len(negative) != 1:
        raise MmadFormatError(
            f"cannot tell which option means 'anomalous' and which 'normal' in {dict(options)!r}"
        )
    return positive[0], negative[0]


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    keep_types: set[str]
    num_references: int
    template_source: str
    boxes: BoxConfig | None  # None: masks are not read
    split: str


def read_mmad(
    root: str | Path,
    *,
    datasets: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
    num_references: int = 1,
    template_source: TemplateSource = "random",
    boxes_cfg: BoxConfig | Mapping[str, int] | None = None,
    load_boxes: bool = True,
    on_error: str = "raise",
    split: str = "test",
    json_name: str = MMAD_JSON,
) -> MmadData:
    """Read `<root>/<json_name>` into questions and anomaly-detection samples.

    `datasets` / `question_types` keep only those source datasets / question types (None = all;
    "Object Analysis" stands for both object types). `num_references` templates are taken from the
    head of the entry's `similar_templates` or `random_templates` list, as MMAD's scripts do (its
    published 1-shot numbers use random templates). `load_boxes=False` skips reading masks, which
    pure evaluation does not need. `on_error="skip"` passes over an unusable entry (missing file,
    malformed question) and counts it instead of raising; settings and filters always raise.
    """
    root = Path(root).expanduser().resolve()
    json_path = root / json_name
    boxes = BoxConfig.from_any(boxes_cfg)
    data = MmadData(root=str(root), items=[], samples=[])
    policy = ErrorPolicy(on_error, data.skipped_errors)
    if template_source not in ("similar", "random"):
        raise MmadError(f"template_source must be 'similar' or 'random', got {template_source!r}")
    if isinstance(num_references, bool) or not isinstance(num_references, int) or num_references < 0:
        raise MmadError(f"num_references must be an integer >= 0, got {num_references!r}")

    entries = _load_json(json_path)
    keep_datasets = _select(datasets, _available_datasets(entries), "dataset", json_path)
    available_types = _available_types(entries)
    wanted_types = _expand_object_analysis(question_types, available_types)
    keep_types = _select(wanted_types, available_types, "question type", json_path)
    settings = _Settings(keep_types, num_references, template_source, boxes if load_boxes else None, split)

    for key, entry in entries.items():
        if key.split("/")[0] not in keep_datasets:
            continue
        try:
            questions, sample = _read_entry(root, f"{json_path} entry {key!r}", key, entry, settings)
        except MmadError as error:
            policy.handle(error)  # raises under on_error="raise", else logs and records it
            continue
        data.items.extend(questions)
        if sample is not None:
            data.samples.append(sample)
    policy.report(f"read_mmad({json_path})")
    return data


def _load_json(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise MmadFileNotFoundError(
            f"MMAD questions file not found: {json_path} (the data root must hold mmad.json)"
        )
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MmadFormatError(f"{json_path}: not valid JSON ({error})") from error
    if not isinstance(entries, dict):
        raise MmadFormatError(
            f"{json_path}: expected a JSON object keyed by image path, got {type(entries).__name__}"
        )
    return entries


def _available_datasets(entries: Mapping[str, Any]) -> list[str]:
    return sorted({key.split("/")[0] for key in entries})


def _available_types(entries: Mapping[str, Any]) -> list[str]:
    # Collected leniently: a malformed entry is reported later, by the entry, with its name.
    found: set[str] = set()
    for entry in entries.values():
        conversation = entry.get("conversation") if isinstance(entry, dict) else None
        for question in conversation if isinstance(conversation, list) else ():
            if isinstance(question, dict) and isinstance(question.get("type"), str):
                found.add(question["type"])
    known = [t for t in QUESTION_TYPES if t in found]
    return known + sorted(found - set(known))


def _expand_object_analysis(wanted: Sequence[str] | None, available: list[str]) -> Sequence[str] | None:
    """Let "Object Analysis" (MMAD's merged score column) select whichever object types exist."""
    if wanted is None or isinstance(wanted, str):
        return wanted
    parts = [p for p in OBJECT_ANALYSIS_PARTS if p in available]
    expanded: list[str] = []
    for name in wanted:
        expanded.extend(parts if name == OBJECT_ANALYSIS and parts else [name])
    return expanded


def _select(wanted: Sequence[str] | None, available: list[str], what: str, json_path: Path) -> set[str]:
    if wanted is None:
        return set(available)
    if isinstance(wanted, str):
        raise MmadFilterError(f"the {what} filter must be a list of names, got the string {wanted!r}")
    if len(wanted) == 0:
        raise MmadFilterError(f"empty {what} filter: give at least one name, or null for all")
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise MmadFilterError(f"unknown {what}(s) {unknown} in {json_path}; available: {available}")
    return set(wanted)


def _read_entry(
    root: Path, where: str, key: str, entry: Any, settings: _Settings
) -> tuple[list[MmadQuestion], Sample | None]:
    parts = key.split("/")
    if len(parts) < 3 or posixpath.isabs(key) or ".." in parts or "" in parts:
        raise MmadFormatError(f"{where}: the key must be a relative path 'dataset/category/.../image'")
    if not isinstance(entry, dict):
        raise MmadFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    conversation = entry.get("conversation")
    if not isinstance(conversation, list):
        raise MmadFormatError(f"{where}: 'conversation' must be a list of questions")

    parsed = [_parse_question(q, i, where) for i, q in enumerate(conversation)]
    selected = [(i, q) for i, q in enumerate(parsed) if q["type"] in settings.keep_types]
    if not selected:
        return [], None  # nothing is asked of this image: its files need not exist

    image = _existing(root / key, where, "query image")
    references = _references(root, entry, settings, where)
    mask = _mask_path(root, key, entry.get("mask_path"), where)
    questions = [
        MmadQuestion(
            image_key=key,
            image_path=str(image),
            dataset=parts[0],
            category=parts[1],
            question=q["Question"],
            options=q["Options"],
            answer=q["Answer"],
            question_type=q["type"],
            reference_paths=references,
            index=i,
            mask_path=None if mask is None else str(mask),
        )
        for i, q in selected
    ]
    detection = next((q for q in questions if q.question_type == ANOMALY_DETECTION), None)
    if detection is None:
        return questions, None
    return questions, _sample(detection, image, mask, references, settings, where)


def _sample(
    detection: MmadQuestion,
    image: Path,
    mask: Path | None,
    references: tuple[str, ...],
    settings: _Settings,
    where: str,
) -> Sample:
    """The image as a training/metric sample, labelled by the answer of its detection question."""
    try:
        anomalous_letter, _ = anomaly_detection_letters(detection.options)
    except MmadFormatError as error:
        raise MmadFormatError(f"{where}: question {detection.index}: {error}") from error
    anomalous = detection.answer == anomalous_letter
    try:
        size = image_size(image)
    except DataError as error:
        raise MmadFormatError(f"{where}: {error}") from error
    boxes: tuple[Box, ...] = ()
    if anomalous and mask is not None and settings.boxes is not None:
        boxes = _boxes_from_mask_file(mask, size, settings.boxes, where)
    return Sample(
        image_path=str(image),
        label=ANOMALOUS if anomalous else NORMAL,
        category=detection.category,
        defect_type=Path(detection.image_key).parent.name if anomalous else "good",
        mask_path=str(mask) if anomalous and mask is not None else None,
        boxes=boxes,
        image_size=size,
        split=settings.split,
        reference_paths=references,
    )


def _parse_question(question: Any, index: int, where: str) -> dict[str, Any]:
    def bad(message: str) -> MmadFormatError:
        return MmadFormatError(f"{where}: question {index}: {message}")

    if not isinstance(question, dict):
        raise bad(f"expected an object, got {type(question).__name__}")
    missing = [k for k in ("Question", "Options", "Answer", "type") if k not in question]
    if missing:
        raise bad(f"missing {missing}")
    text, options, answer, qtype = (question[k] for k in ("Question", "Options", "Answer", "type"))
    if not isinstance(text, str) or not isinstance(qtype, str):
        raise bad("'Question' and 'type' must be strings")
    if not isinstance(options, dict) or not options:
        raise bad("'Options' must be a non-empty object letter -> text")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
        raise bad("'Options' letters and texts must be strings")
    if answer not in options:
        raise bad(f"'Answer' {answer!r} is not one of the options {list(options)}")
    # MMAD's query scripts re-letter the options A, B, C... in file order and map the answer with
    # them, so prompts, answers and scores here do the same (a no-op for keys already A, B, C...).
    letters = [chr(ord("A") + i) for i in range(len(options))]
    relettered = dict(zip(letters, options.values(), strict=True))
    return {
        "Question": text,
        "Options": relettered,
        "Answer": letters[list(options).index(answer)],
        "type": qtype,
    }


def _existing(path: Path, where: str, what: str) -> Path:
    if not path.exists():
        raise MmadFileNotFoundError(f"{where}: {what} not found: {path}")
    return path


def _references(root: Path, entry: dict[str, Any], settings: _Settings, where: str) -> tuple[str, ...]:
    if settings.num_references == 0:
        return ()
    name = f"{settings.template_source}_templates"
    templates = entry.get(name)
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise MmadFormatError(f"{where}: '{name}' must be a list of paths")
    if len(templates) < settings.num_references:
        raise MmadFormatError(
            f"{where}: '{name}' has {len(templates)} template(s), {settings.num_references} requested"
        )
    chosen = templates[: settings.num_references]
    return tuple(str(_existing(root / t, where, "template image")) for t in chosen)


def _mask_path(root: Path, key: str, mask: Any, where: str) -> Path | None:
    """mmad.json gives masks relative to the key's first three components (MMAD joins them as text).

    Some copies write them relative to `dataset/category` instead; that reading is used only when
    the documented one names no file and it does.
    """
    if mask is None or mask == "":
        return None
    if not isinstance(mask, str):
        raise MmadFormatError(f"{where}: 'mask_path' must be a string")
    parts = key.split("/")
    documented = posixpath.normpath(posixpath.join(*parts[:3], mask))
    if posixpath.isabs(documented) or documented.split("/")[0] == "..":
        raise MmadFormatError(f"{where}: 'mask_path' {mask!r} points outside the data root")
    alternative = posixpath.normpath(posixpath.join(*parts[:2], mask))
    if (
        not (root / documented).exists()
        and alternative.split("/")[0] != ".."
        and (root / alternative).exists()
    ):
        return root / alternative
    return root / documented


def _boxes_from_mask_file(mask: Path, size: tuple[int, int], cfg: BoxConfig, where: str) -> tuple[Box, ...]:
    _existing(mask, where, "mask")
    try:
        # A folder of masks (MVTec LOCO keeps one file per defect region) counts as their union.
        binary = read_sample_mask(mask)
    except DataError as error:
        raise MmadFormatError(f"{where}: {error}") from error
    mask_size = (int(binary.shape[1]), int(binary.shape[0]))
    if mask_size != size:
        raise MmadFormatError(
            f"{where}: mask {mask} is {mask_size[0]}x{mask_size[1]} but the image is {size[0]}x{size[1]}"
        )
    boxes = boxes_from_mask(binary, cfg.dilation, cfg.min_area)
    if not boxes:
        # Kept (the label is still right), but worth a look: an empty mask or a min_area too large.
        log.warning(
            "%s: no box left from mask %s (empty, or all parts < min_area=%d)", where, mask, cfg.min_area
        )
    return tuple(boxes)


def read_mmad_samples(
    root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    boxes: BoxConfig | Mapping[str, int] | None = None,
    on_error: str = "raise",
    skipped: list[DataError] | None = None,
    datasets: Sequence[str] | None = None,
    num_references: int = 0,
    template_source: TemplateSource = "random",
) -> list[Sample]:
    """MMAD's detection images as samples, with the signature of the other readers (data.readers).

    Only the "Anomaly Detection" questions are read, so the files of other questions need not exist.
    `categories` keeps those object categories (unknown names are an error listing the available ones).
    """
    data = read_mmad(
        root,
        datasets=datasets,
        question_types=[ANOMALY_DETECTION],
        num_references=num_references,
        template_source=template_source,
        boxes_cfg=boxes,
        on_error=on_error,
    )
    if skipped is not None:
        skipped.extend(data.skipped_errors)
    if categories is None:
        return data.samples
    wanted = [categories] if isinstance(categories, str) else list(categories)
    available = sorted({s.category for s in data.samples})
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise MmadFilterError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in {root}; "
            f"available: {available}"
        )
    return [s for s in data.samples if s.category in wanted]
