"""GRPO's settings, instantiated from `conf/algo/grpo.yaml` (`_target_`); SFT's are in sft/settings.py.

The yaml files are the one place where each value is written: the dataclasses here declare the
fields and their types and have no defaults, so a knob can neither drift between two places nor
exist without reaching the object it configures (tests/test_settings_reach.py walks every leaf).
Validation names each setting as the user writes it (`algo.eps_low`), and runs at start, before
any data or weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anomaly_rl.grpo.advantages import BASELINES, SCALES
from anomaly_rl.grpo.loss import LOSS_TYPES
from anomaly_rl.rollout.backends import ROLLOUT_BACKENDS
from anomaly_rl.training.distributed import check_divisible
from anomaly_rl.training.update import OptimizerFactory, phase_checks


@dataclass
class DynamicSampling:
    """DAPO's dynamic sampling: groups whose classification reward is flat are sampled again."""

    enabled: bool
    max_rounds: int


@dataclass
class GRPOSettings:
    """`conf/algo/grpo.yaml`: one field per key, documented there."""

    name: str
    group_size: int
    prompts_per_step: int
    temperature: float
    top_p: float
    max_new_tokens: int
    beta: float
    eps_low: float
    eps_high: float
    loss_type: str
    scale_rewards: str
    advantage_eps: float
    advantage_baseline: str
    num_iterations: int
    mini_batches: int
    max_grad_norm: float
    max_steps: int
    max_minutes: float | None
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    logprob_chunk_size: int
    rollout_backend: str
    dynamic_sampling: DynamicSampling
    train_vision: bool
    log_samples_every: int
    checkpoint_every: int
    optimizer: OptimizerFactory = field(repr=False)

    def problems(self, min_new_tokens: int, prefix: str = "algo") -> list[str]:
        """Every out-of-range setting, one message each (all of them at once, not one per run)."""
        checks: list[tuple[bool, str]] = [
            (self.group_size >= 2, f"group_size must be >= 2 (GRPO compares responses), got {self.group_size}"),
            (self.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {self.prompts_per_step}"),
            (self.mini_batches >= 1, f"mini_batches must be >= 1, got {self.mini_batches}"),
            (
                self.mini_batches < 1 or self.prompts_per_step % self.mini_batches == 0,
                f"prompts_per_step={self.prompts_per_step} is not divisible by {prefix}.mini_batches="
                f"{self.mini_batches}: a group must never span mini-batches",
            ),
            (
                self.max_new_tokens >= min_new_tokens,
                f"max_new_tokens={self.max_new_tokens} is too few for the schema, whose shortest valid "
                f"response needs about {min_new_tokens} tokens",
            ),
            (
                self.temperature > 0,
                f"temperature must be > 0, got {self.temperature}: greedy decoding gives a group G "
                "identical responses and so no advantage",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.eps_low < 1, f"eps_low must be in [0, 1), got {self.eps_low}"),
            (self.eps_high >= 0, f"eps_high must be >= 0, got {self.eps_high}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"),
            (
                self.scale_rewards in SCALES,
                f"scale_rewards must be one of {', '.join(SCALES)}, got {self.scale_rewards!r}",
            ),
            (self.advantage_eps >= 0, f"advantage_eps must be >= 0, got {self.advantage_eps}"),
            (
                self.advantage_baseline in BASELINES,
                f"advantage_baseline must be one of {', '.join(BASELINES)}, got {self.advantage_baseline!r}",
            ),
            (
                self.advantage_baseline != "batch" or self.scale_rewards != "group",
                f"advantage_baseline=batch needs {prefix}.scale_rewards=batch or none (a flat group has no std)",
            ),
            (self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}"),
            (self.logprob_chunk_size >= 1, f"logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}"),
            (
                self.rollout_backend in ROLLOUT_BACKENDS,
                f"rollout_backend must be one of {', '.join(sorted(ROLLOUT_BACKENDS))}, got {self.rollout_backend!r}",
            ),
            (
                self.dynamic_sampling.max_rounds >= 0,
                f"dynamic_sampling.max_rounds must be >= 0, got {self.dynamic_sampling.max_rounds}",
            ),
            (
                self.log_samples_every >= 0,
                f"log_samples_every must be >= 0 (0: never), got {self.log_samples_every}",
            ),
            *phase_checks(self),
        ]
        return [f"{prefix}.{message}" for ok, message in checks if not ok]

    def validate(self, min_new_tokens: int, processes: int = 1, prefix: str = "algo") -> None:
        """Raise ValueError listing every problem; `processes` share the prompts of a step."""
        problems = self.problems(min_new_tokens, prefix)
        if problems:
            raise ValueError("; ".join(problems))
        if processes > 1:
            check_divisible(self.prompts_per_step, self.mini_batches, processes, f"{prefix}.prompts_per_step")
