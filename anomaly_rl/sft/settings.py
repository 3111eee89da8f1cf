"""SFT's settings, instantiated from `conf/algo/sft.yaml` (`_target_`): the warm start, an SFT run
(algo=sft) and the SFT control. As for GRPO (grpo/settings.py), the yaml holds every value."""

from __future__ import annotations

from dataclasses import dataclass, field

from anomaly_rl.training.schedule import LR_SCHEDULES
from anomaly_rl.training.update import OptimizerFactory, optimizer_checks


@dataclass
class SFTSettings:
    """`conf/algo/sft.yaml` (the warm start, an SFT run, and the SFT control)."""

    name: str
    batch_size: int
    max_steps: int
    max_minutes: float | None
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    max_grad_norm: float
    box_grid: int
    checkpoint_every: int
    optimizer: OptimizerFactory = field(repr=False)

    def problems(self, prefix: str) -> list[str]:
        checks: list[tuple[bool, str]] = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (
                self.max_minutes is None or self.max_minutes > 0,
                f"max_minutes must be null or > 0, got {self.max_minutes}",
            ),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
            ),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}"),
            (self.box_grid >= 1, f"box_grid must be >= 1, got {self.box_grid}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            *optimizer_checks(self.optimizer),
        ]
        return [f"{prefix}.{message}" for ok, message in checks if not ok]
