"""`python -m anomaly_rl.evaluate data=mmad`: answer every selected MMAD question and score the answers.

"Anomaly Detection" questions go through our reasoning schema (`runner.predict`, greedy), because
that is the task the policy is trained on: its a/b decision is turned into the question's letter
with `detection_choice`. Every other question is asked as plain multiple choice (query image first,
then the references, then the lettered options) and the letter is read from the greedy answer with
`parse_choice`. An answer naming no option is recorded as None: scored wrong in our convention
(the default), never dropped, so that refusing to answer cannot raise a score; the table in MMAD's
own convention (which drops it) is written beside it (`anomaly_rl.evaluation.mmad.score_and_write`,
the function `python -m anomaly_rl.score mmad answers=FILE` uses too).

Before any question is asked, the selected query images are compared by content with the training
images of the run evaluated (`ckpt`; `anomaly_rl.data.leakage`, settings `data.leakage.*`): MMAD is
built from MVTec AD and VisA, so a model trained on those may have seen its images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from anomaly_rl.data.files import load_rgb
from anomaly_rl.data.leakage import LeakageSettings, check_against_run
from anomaly_rl.data.mmad import ANOMALY_DETECTION, MmadData, MmadError, MmadQuestion
from anomaly_rl.data.records import Sample
from anomaly_rl.evaluation.mmad import (
    MMAD,
    OURS,
    answers_records,
    detection_choice,
    format_multiple_choice,
    parse_choice,
    score_and_write,
    write_answers,
)
from anomaly_rl.evaluation.runner import predict
from anomaly_rl.models.processing import encode_prompts, never_sampled_token_ids, stop_token_ids, unwrap_model
from anomaly_rl.rollout.transformers_backend import sample as sample_responses
from anomaly_rl.schemas.base import Schema

log = logging.getLogger("anomaly_rl")

ANSWERS_JSON = "answers.json"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""MMAD's own instruction for its multiple-choice queries."""


def choice_messages(question: MmadQuestion) -> list[dict[str, Any]]:
    """The chat asking one multiple-choice question: query image, reference images, question, options.

    The query comes first, as in our schema's prompts, so that a model trained with references
    sees them in the order it learned.
    """
    refs = len(question.reference_paths)
    lines = []
    if refs:
        lines.append(
            f"The first image is the query image; the other {refs} show normal {question.category} "
            f"samples, for comparison."
        )
    lines += [format_multiple_choice(question.question, question.options), CHOICE_INSTRUCTION]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(1 + refs)]
    content.append({"type": "text", "text": "\n".join(lines)})
    return [{"role": "user", "content": content}]


def answer_choices(
    model: torch.nn.Module,
    processor: Any,
    questions: Sequence[MmadQuestion],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
) -> list[tuple[str | None, str]]:
    """(picked letter or None, response text) for each question, asked as plain multiple choice."""
    eos = stop_token_ids(processor)
    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    suppress = never_sampled_token_ids(processor, vocab, eos)
    answers: list[tuple[str | None, str]] = []
    starts = range(0, len(questions), batch_size)
    with torch.no_grad():  # encode_prompts keeps the vision tower's graph when it is trainable
        for start in track(starts, description="MMAD multiple choice", disable=not progress):
            batch = questions[start : start + batch_size]
            texts = [
                processor.apply_chat_template(choice_messages(q), add_generation_prompt=True, tokenize=False)
                for q in batch
            ]
            images = [[load_rgb(q.image_path), *(load_rgb(p) for p in q.reference_paths)] for q in batch]
            encoded = encode_prompts(model, processor, texts, images)
            rollout = sample_responses(
                model, encoded, 1, max_new_tokens=max_new_tokens, temperature=0.0,
                eos_token_ids=eos, suppress_token_ids=suppress,
            )
            answers += [(parse_choice(text, q.options), text) for q, text in zip(batch, rollout.texts, strict=True)]
    return answers


def answer_detections(
    model: torch.nn.Module,
    processor: Any,
    schema: Schema,
    questions: Sequence[MmadQuestion],
    samples: Sequence[Sample],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
) -> list[tuple[str | None, str]]:
    """(picked letter or None, response text) for each Anomaly Detection question, via our schema.

    Each image is predicted once even if several of its questions are detection questions.
    """
    by_image = {s.image_path: s for s in samples}
    missing = sorted({q.image_key for q in questions if q.image_path not in by_image})
    if missing:
        raise MmadError(f"no anomaly-detection sample was read for {missing[:3]} ({len(missing)} images)")
    needed = list(dict.fromkeys(q.image_path for q in questions))
    predictions = predict(
        model, processor, schema, [by_image[p] for p in needed], batch_size=batch_size,
        max_new_tokens=max_new_tokens, progress=progress, description="MMAD anomaly detection",
    )
    decided = {p: pred for p, pred in zip(needed, predictions, strict=True)}
    answers = []
    for q in questions:
        pred = decided[q.image_path]
        letter = pred["answer"] if pred["answer"] in ("a", "b") else None
        choice = detection_choice(None if letter is None else letter == "a", q.options)
        answers.append((choice, str(pred["response"])))
    return answers


def answer_mmad(
    model: torch.nn.Module,
    processor: Any,
    schema: Schema,
    data: MmadData,
    *,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[list[MmadQuestion], list[str | None], list[str]]:
    """(questions, picked letters, responses), in the reader's order; `limit` keeps the first questions."""
    items = list(data.items[: int(limit)] if limit else data.items)
    if not items:
        raise MmadError(f"no MMAD questions selected from {data.root} (check data.datasets / data.question_types)")
    detection = [i for i, q in enumerate(items) if q.question_type == ANOMALY_DETECTION]
    choice = [i for i, q in enumerate(items) if q.question_type != ANOMALY_DETECTION]
    was_training = model.training
    model.eval()
    answered: dict[int, tuple[str | None, str]] = {}
    try:
        if detection:
            answered.update(zip(detection, answer_detections(
                model, processor, schema, [items[i] for i in detection], data.samples,
                batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
            ), strict=True))
        if choice:
            answered.update(zip(choice, answer_choices(
                model, processor, [items[i] for i in choice],
                batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
            ), strict=True))
    finally:
        model.train(was_training)
    return items, [answered[i][0] for i in range(len(items))], [answered[i][1] for i in range(len(items))]


LEAKAGE_KEY = "leakage"
"""The data config's leakage settings: read here, not passed to read_mmad."""


def split_data_config(data_cfg: DictConfig | Mapping[str, Any]) -> tuple[dict[str, Any], LeakageSettings]:
    """(read_mmad's config, the leakage settings) from `cfg.data` of `data=mmad`."""
    plain = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    settings = LeakageSettings.from_any(plain.pop(LEAKAGE_KEY, None))  # type: ignore[union-attr]
    return plain, settings  # type: ignore[return-value]


def prepare_mmad(cfg: DictConfig | Mapping[str, Any], out_dir: str | Path) -> MmadData:
    """Read the MMAD questions `cfg.data` selects and check their query images for leakage.

    They are compared with the training images of `cfg.ckpt` (or of `data.leakage.training_images`):
    an overlap raises LeakageError naming both files unless `data.leakage.allow=true`; the
    comparison is written to `<out_dir>/leakage.json`.
    """
    reader_cfg, leakage = split_data_config(cfg["data"])
    data = hydra.utils.instantiate(reader_cfg)
    if not isinstance(data, MmadData):
        raise MmadError(f"data config {reader_cfg.get('_target_')!r} did not produce MmadData")
    limit = cfg["eval"].get("limit")
    selected = data.items[: int(limit)] if limit else data.items
    check_against_run(
        list(dict.fromkeys(q.image_path for q in selected)), cfg.get("ckpt"), leakage, "MMAD query images", out_dir
    )
    return data


def evaluate_mmad(
    model: torch.nn.Module,
    processor: Any,
    schema: Schema,
    cfg: DictConfig | Mapping[str, Any],
    out_dir: str | Path,
    data: MmadData | None = None,
) -> dict[str, Any]:
    """Answer the MMAD questions `cfg.data` selects; write answers.json and the score tables; return the summary.

    `data` is `prepare_mmad`'s (read and checked for leakage); None reads and checks it here.
    """
    out = Path(out_dir)
    if data is None:
        data = prepare_mmad(cfg, out)
    evaluation = cfg["eval"]
    limit = evaluation.get("limit")
    items, choices, responses = answer_mmad(
        model, processor, schema, data,
        batch_size=int(evaluation["batch_size"]), max_new_tokens=int(evaluation["max_new_tokens"]),
        limit=limit,
    )
    records = answers_records(items, choices, responses)
    answers_path = write_answers(records, out / ANSWERS_JSON)
    scores = score_and_write(records, out)
    print(scores.markdown)
    ours = scores.tables[OURS]
    log.info(
        "MMAD: %d questions, %d unparseable, average %.2f (MMAD's convention: %.2f); written to %s",
        ours.total, ours.unparseable, ours.overall, scores.tables[MMAD].overall, out,
    )
    return {**scores.summary(), "answers": str(answers_path)}
