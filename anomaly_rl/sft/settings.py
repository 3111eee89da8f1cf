"""SFT's settings, instantiated from `conf/algo/sft.yaml` (`_target_`): the warm start, an SFT run
(algo=sft) and the SFT control. As for GRPO (grpo/settings.py), the yaml holds every value."""

from __future__ import annotations

from dataclasses import dataclass, field

from anomaly_rl.training.update import OptimizerFactory, phase_checks


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
            (self.box_grid >= 1, f"box_grid must be >= 1, got {self.box_grid}"),
            *phase_checks(self),
        ]
        return [f"{prefix}.{message}" for ok, message in checks if not ok]
