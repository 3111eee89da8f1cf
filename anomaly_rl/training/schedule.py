"""Learning-rate schedules as LambdaLR factors: linear warm-up, then cosine decay or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def lr_factor(
    warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.1
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimiser step `step`.

    Cosine decays to `min_ratio` (not 0) because box placement keeps improving in a long
    low-learning-rate tail (findings.md), which a decay to zero would cut off.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
