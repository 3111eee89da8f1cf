"""What one GRPO step logs, computed from the raw material of every process.

Metrics are computed from the gathered records rather than averaged afterwards, so a std, a maximum
or a zero-std group fraction means over the global batch what it means in one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anomaly_rl.data.records import Sample
from anomaly_rl.grpo.advantages import zero_std_group_fraction
from anomaly_rl.schemas.parsed import ParsedResponse


def box_areas(parsed: Sequence[ParsedResponse], samples: Sequence[Sample]) -> tuple[list[float], list[float]]:
    """Predicted and true box areas on defective images (original pixels)."""
    predicted = [(b[2] - b[0]) * (b[3] - b[1]) for p, s in zip(parsed, samples, strict=True) if s.is_anomalous for b in p.boxes]
    true = [(b[2] - b[0]) * (b[3] - b[1]) for s in samples if s.is_anomalous for b in s.boxes]
    return predicted, true


def _area_metrics(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    """Mean predicted against true box area on defective images (original pixels).

    A localisation reward can be gamed by ever larger boxes (findings.md: 9x in one prototype);
    this pair of curves shows it as it happens.
    """
    metrics = {}
    if predicted:
        metrics["train/box_area_pred_mean"] = float(np.mean(np.clip(predicted, -1e9, 1e9)))
    if true:
        metrics["train/box_area_true_mean"] = float(np.mean(true))
    return metrics


@dataclass
class StepRecord:
    """One process's raw material for a step's metrics: small, picklable, gathered across processes.

    Metrics are computed from the gathered records rather than averaged afterwards, so a std, a
    maximum or a zero-std group fraction means over the global batch what it means in one process.
    """

    rewards: dict[str, np.ndarray]
    lengths: torch.Tensor  # completion tokens per row
    truncated: torch.Tensor
    update_stats: list[dict[str, float]]
    dynamic_rounds: int
    rollout_seconds: float
    score_seconds: float
    update_seconds: float
    box_pred_areas: list[float]
    box_true_areas: list[float]


def step_metrics(
    records: Sequence[StepRecord],
    group_size: int,
    rollout_step: int,
    lr: float,
    classification_key: str | None,
) -> dict[str, float]:
    """The logged metrics of one step, over the rows of every record (rank order, whole groups).

    Reward, length and group statistics are computed over all rows; update statistics (loss,
    KL, clip fractions, entropy, grad norm) are the mean over processes and updates; the time
    split is the slowest process's (a step waits for it), and tokens per second counts every
    process's tokens.
    """
    rewards = {name: np.concatenate([r.rewards[name] for r in records]) for name in records[0].rewards}
    total = torch.as_tensor(rewards["total"], dtype=torch.float32)
    lengths = torch.cat([r.lengths for r in records]).float()
    truncated = torch.cat([r.truncated for r in records])
    rollout_seconds = max(r.rollout_seconds for r in records)
    score_seconds = max(r.score_seconds for r in records)
    update_seconds = max(r.update_seconds for r in records)
    metrics: dict[str, float] = {
        "train/rollout_step": float(rollout_step),  # an x-axis that no phase restarts
        "train/reward": float(total.mean()),
        "train/reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "train/zero_std_group_fraction": zero_std_group_fraction(total, group_size),
        "train/completion_length_mean": float(lengths.mean()),
        "train/completion_length_max": float(lengths.max()),
        "train/truncation_rate": float(truncated.float().mean()),
        "train/lr": float(lr),
        "train/dynamic_sampling_rounds": float(max(r.dynamic_rounds for r in records)),
        "time/rollout_s": rollout_seconds,
        "time/score_s": score_seconds,
        "time/update_s": update_seconds,
        "time/step_s": rollout_seconds + score_seconds + update_seconds,
        "time/tokens_per_s": float(lengths.sum()) / max(rollout_seconds, 1e-9),
    }
    if classification_key and classification_key in rewards:
        metrics["train/zero_std_group_fraction_cls"] = zero_std_group_fraction(
            torch.as_tensor(rewards[classification_key], dtype=torch.float32), group_size
        )
    for name, values in rewards.items():
        if name == "total":
            continue
        metrics[f"train/reward_{name}"] = float(np.mean(values))
        metrics[f"train/reward_{name}_std"] = float(np.std(values))
    update_stats = [u for r in records for u in r.update_stats]
    for name in update_stats[0] if update_stats else []:
        values = [u[name] for u in update_stats if name in u and math.isfinite(u[name])]
        if values:
            metrics[f"train/{name}"] = float(np.mean(values))
    metrics.update(
        _area_metrics(
            [a for r in records for a in r.box_pred_areas], [a for r in records for a in r.box_true_areas]
        )
    )
    return metrics
