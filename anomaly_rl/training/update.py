"""One optimiser update, the same for SFT and GRPO: backward, gradient all-reduce, clip, finite
guard, step.

The guard exists because `clip_grad_norm_` does not raise on a NaN norm and `optimizer.step()`
happily writes NaN weights: a finite loss can still carry a non-finite gradient (a term whose value
is 0 and whose derivative is not), and the next periodic checkpoint would then overwrite the last
good one. Every process takes the same decision (`any_rank`), so none is left waiting in a
collective while the others stop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from anomaly_rl.training.distributed import (
    all_reduce_gradients,
    any_rank,
    no_backward_sync,
    reduces_gradients_here,
)
from anomaly_rl.training.errors import NonFiniteGradientError, NonFiniteLossError
from anomaly_rl.training.schedule import LR_SCHEDULES, lr_factor

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
"""What `_partial_: true` optimiser configs instantiate to: parameters -> optimiser."""


def optimizer_checks(optimizer: Any) -> list[tuple[bool, str]]:
    """The learning rate of a `_partial_` optimiser (a functools.partial), when it names one."""
    lr = getattr(optimizer, "keywords", {}).get("lr")
    if lr is None:
        return []
    return [(float(lr) > 0, f"optimizer.lr must be > 0, got {lr}")]


def phase_checks(settings: Any) -> list[tuple[bool, str]]:
    """The range checks every phase's settings share (step and time budgets, schedule, clipping,
    checkpoints, learning rate), as (ok, message) pairs without the `algo.` / `warm_start.` prefix."""
    s = settings
    return [
        (s.max_steps >= 1, f"max_steps must be >= 1, got {s.max_steps}"),
        (s.max_minutes is None or s.max_minutes > 0, f"max_minutes must be null or > 0, got {s.max_minutes}"),
        (s.warmup_steps >= 0, f"warmup_steps must be >= 0, got {s.warmup_steps}"),
        (s.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {s.lr_schedule!r}"),
        (0 <= s.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}"),
        (s.max_grad_norm > 0, f"max_grad_norm must be > 0, got {s.max_grad_norm}"),
        (s.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {s.checkpoint_every}"),
        *optimizer_checks(s.optimizer),
    ]


def check_finite_loss(loss: torch.Tensor, where: str) -> None:
    """Raise on every process when the loss of any process is NaN or infinite."""
    if any_rank(not bool(torch.isfinite(loss.detach()).all())):
        raise NonFiniteLossError(
            f"non-finite loss at {where} (this process's loss: {float(loss.detach())}); "
            "no update was made and the last checkpoint in the run folder holds the last good weights"
        )


def optimizer_update(
    module: Any,
    optimizer: Any,
    scheduler: Any,
    loss: torch.Tensor,
    trainable: Sequence[torch.nn.Parameter],
    weight: float,
    max_grad_norm: float,
    where: str,
) -> float:
    """Backward `loss`, combine the gradients of every process with `weight` (the loss's own
    denominator), clip, and step, unless the gradient is non-finite on any process.

    Returns the gradient norm before clipping. `where` names the step in error messages
    ("GRPO step 3, update 2").
    """
    check_finite_loss(loss, where)
    optimizer.zero_grad(set_to_none=True)
    with no_backward_sync(module.trainer):
        module.manual_backward(loss)
    if reduces_gradients_here(module.trainer):
        all_reduce_gradients(trainable, weight)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    if any_rank(not bool(torch.isfinite(grad_norm))):
        optimizer.zero_grad(set_to_none=True)  # nothing non-finite is left for a later step to apply
        raise NonFiniteGradientError(
            f"non-finite gradient at {where} (this process's gradient norm: {float(grad_norm)}, loss "
            f"{float(loss.detach())}); no update was made and the last checkpoint in the run folder "
            "holds the last good weights"
        )
    optimizer.step()
    scheduler.step()
    return float(grad_norm)


def optimizer_and_schedule(
    policy: torch.nn.Module,
    optimizer: OptimizerFactory,
    warmup_updates: int,
    total_updates: int,
    lr_schedule: str,
    min_lr_ratio: float,
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` answer for a phase: the optimiser over the trainable
    parameters and its warm-up + decay schedule, stepped once per optimiser update."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (check model.finetune / model.lora)")
    built = optimizer(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        built, lr_factor(warmup_updates, total_updates, lr_schedule, min_lr_ratio)
    )
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
