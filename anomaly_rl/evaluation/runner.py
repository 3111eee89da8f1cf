"""Greedy evaluation of a policy on a data split: predictions, metrics and their files.

`p_anomalous` is read from the model's token probabilities at the answer slot (the position
right after `<answer>`), renormalised over the letters a and b — never from the sampled text —
so AUROC ranks images by the model's confidence. A response with no answer slot has no such
probability; it gets the text's decision (1, 0, or 0.5 without one) and is counted in
`p_from_text_rate`, so a reader sees how many AUROC inputs did not come from probabilities.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

from anomaly_rl.data.datamodule import load_prompt_batch
from anomaly_rl.data.records import Sample
from anomaly_rl.evaluation.metrics import best_match_iou, compute_metrics
from anomaly_rl.evaluation.placement import shard, unshard
from anomaly_rl.evaluation.report import write_evaluation
from anomaly_rl.models.processing import never_sampled_token_ids, stop_token_ids, unwrap_model
from anomaly_rl.rollout.base import RolloutBackend
from anomaly_rl.rollout.logprobs import answer_probabilities
from anomaly_rl.rollout.transformers_backend import TransformersBackend
from anomaly_rl.schemas.base import Schema
from anomaly_rl.training.distributed import (
    broadcast_from_zero,
    gather_objects,
    is_distributed,
    is_rank_zero,
    rank,
    world_size,
)
from anomaly_rl.training.prompts import parse_in_original_frame, prepare_prompts

ANSWER_OPEN = "<answer>"
log = logging.getLogger("anomaly_rl")


def letter_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Single-token spellings of "a" and "b" (with and without a leading space)."""
    def ids(letter: str) -> list[int]:
        found = []
        for spelling in (letter, " " + letter, letter.upper(), " " + letter.upper()):
            encoded = tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in found:
                found.append(encoded[0])
        return found

    a_ids, b_ids = ids("a"), ids("b")
    if not a_ids or not b_ids:
        raise ValueError("the tokenizer has no single token for the letters a and b")
    return a_ids, b_ids


def answer_slot(tokenizer: Any, completion: Sequence[int]) -> int | None:
    """Index of the first token after `<answer>` in a completion, or None when there is none."""
    for t in range(1, len(completion)):
        if tokenizer.decode(list(completion[:t]), skip_special_tokens=False).rstrip().endswith(ANSWER_OPEN):
            return t
    return None


def predict(
    model: torch.nn.Module,
    processor: Any,
    schema: Schema,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    progress: bool = True,
    description: str = "evaluating",
    backend: RolloutBackend | None = None,
) -> list[dict[str, Any]]:
    """One prediction record per sample (the fields of predictions.jsonl), decoded greedily by
    `backend` (default: the eager one; `static` replays a CUDA graph per token on a GPU and gives
    the same tokens)."""
    backend = backend or TransformersBackend()
    tokenizer = processor.tokenizer
    eos = stop_token_ids(processor)
    suppress = never_sampled_token_ids(processor, unwrap_model(model).get_output_embeddings().weight.shape[0], eos)
    a_ids, b_ids = letter_token_ids(tokenizer)
    starts = range(0, len(samples), batch_size)
    was_training = model.training
    model.eval()
    predictions: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            for start in track(starts, description=description, disable=not progress):
                batch = load_prompt_batch(samples[start : start + batch_size])
                prepared = prepare_prompts(
                    batch.samples, batch.images, batch.references, schema, processor, model
                )
                rollout = backend.sample(
                    model, prepared.encoded, 1, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                    eos_token_ids=eos, suppress_token_ids=suppress,
                )
                parsed = parse_in_original_frame(rollout.texts, prepared.frames, 1, schema)
                slots = [
                    answer_slot(tokenizer, rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist())
                    for i in range(len(parsed))
                ]
                # Rows without a slot are scored at position 0 and their value ignored: one
                # batched forward is cheaper than gathering the rows that have one.
                positions = torch.tensor([slot or 0 for slot in slots])
                letter_probs = answer_probabilities(
                    model, prepared.encoded, rollout.completion_ids, rollout.completion_mask,
                    positions, a_ids + b_ids,
                )
                p_letter_a = letter_probs[:, : len(a_ids)].sum(dim=1).tolist()
                for i, (sample, response) in enumerate(zip(prepared.samples, parsed, strict=True)):
                    if slots[i] is not None:
                        p_anomalous, source = float(p_letter_a[i]), "tokens"
                    else:
                        p_anomalous = {"a": 1.0, "b": 0.0}.get(response.answer or "", 0.5)
                        source = "text"
                    predictions.append(
                        {
                            "image_path": sample.image_path,
                            "category": sample.category,
                            "defect_type": sample.defect_type,
                            "label": sample.label,
                            "boxes": [list(b) for b in sample.boxes],
                            "image_size": list(sample.image_size),
                            "response": response.text,
                            "answer": response.answer,
                            "pred_boxes": [list(b) for b in response.boxes],
                            "p_anomalous": p_anomalous,
                            "p_source": source,
                            "follows_schema": response.follows_schema,
                        }
                    )
    finally:
        model.train(was_training)
    return predictions


def split_samples(datamodule: Any, split: str) -> list[Sample]:
    attribute = f"{split}_samples"
    if not hasattr(datamodule, attribute):
        raise ValueError(f"eval.split={split!r}: the data module has no {attribute} (use train, val or test)")
    return list(getattr(datamodule, attribute))


def evaluate_to_folder(
    model: torch.nn.Module,
    processor: Any,
    schema: Schema,
    datamodule: Any,
    out_dir: str | Path,
    *,
    split: str = "test",
    batch_size: int = 32,
    max_new_tokens: int = 64,
    limit: int | None = None,
    backend: RolloutBackend | None = None,
) -> dict[str, Any]:
    """Predict a split, compute the metrics and write predictions.jsonl, metrics.json, metrics.md.

    Under data parallelism every process predicts its own shard of the split and the predictions
    are gathered in the split's order: rank 0 computes the metrics (the same as one process's) and
    writes the files, and every process returns them. Call it on every process, or on one when
    no process group exists.
    """
    samples = split_samples(datamodule, split)
    if limit:
        samples = samples[: int(limit)]
    if not samples:
        raise ValueError(f"eval.split={split!r} holds no samples")
    mine = samples
    if is_distributed():
        mine = shard(samples, rank(), world_size())
        log.info("evaluation %s: process %d of %d predicts %d of %d samples", Path(out_dir).name, rank(), world_size(),
                 len(mine), len(samples))
    predictions = predict(
        model, processor, schema, mine, batch_size=batch_size, max_new_tokens=max_new_tokens,
        description=f"evaluating {Path(out_dir).name}", progress=is_rank_zero(), backend=backend,
    )
    if is_distributed():
        predictions = unshard(gather_objects(predictions))
    metrics = None
    if is_rank_zero():
        metrics = compute_metrics(predictions)
        metrics["overall"]["p_from_text_rate"] = sum(p["p_source"] == "text" for p in predictions) / len(predictions)
        write_evaluation(out_dir, predictions, metrics)
    return broadcast_from_zero(metrics)


def median_box_baseline(train_samples: Sequence[Sample], test_samples: Sequence[Sample]) -> float:
    """Mean best-match IoU on defective test images of always predicting the training median box.

    The floor any localisation result must clear: a model that ignores the image scores this.
    """
    train_boxes = [b for s in train_samples if s.is_anomalous for b in s.boxes]
    scored = [s for s in test_samples if s.is_anomalous and s.boxes]
    if not train_boxes or not scored:
        return float("nan")
    median = tuple(statistics.median(b[k] for b in train_boxes) for k in range(4))
    return statistics.fmean(best_match_iou(s.boxes, [median]) for s in scored)
