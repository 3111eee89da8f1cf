"""Group-relative advantages: how much better each response did than its siblings.

GRPO has no value network; the baseline for a response is the mean reward of the G responses
sampled for the same prompt. Rewards arrive flat, B*G long, with each prompt's group contiguous
(the order the rollout produces them in).

Std estimator: the unbiased sample std (``torch.std`` default, divisor G - 1), the same one
TRL's ``GRPOTrainer`` uses, so numbers match a TRL run with the same rewards; ``eps`` is added
to the std (not to the variance), again as TRL does.

A group whose rewards are all equal carries no learning signal. Its advantages are set to exactly
0: without that, floating-point error in the group mean (e.g. mean of three 0.1s is not 0.1)
divided by ``std + eps`` ~ 1e-4 would leak a tiny, meaningless signal.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]
SCALES: tuple[str, ...] = ("group", "batch", "none")
BASELINES: tuple[str, ...] = ("group", "batch")

ZERO_STD_TOL: float = 1e-6
"""Rewards within this range (max - min) of each other count as equal: the group is 'zero-std'."""


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Validate the flat reward vector and view it as [B, G]; every public function goes through here."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (a group of one has no baseline and no std), got {group_size}"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: no groups to compute advantages for")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}: "
            "groups must be contiguous and complete"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards contain non-finite values at indices {bad[:10]}")
    return rewards.detach().view(-1, group_size)


def zero_variance_groups(rewards: Tensor, group_size: int, tol: float = ZERO_STD_TOL) -> Tensor:
    """Bool mask [B], True where a group's rewards are all equal (max - min <= tol).

    The range test, rather than std <= tol, keeps the decision independent of G and of the
    std estimator. Dynamic sampling (DAPO) calls this on the classification reward to decide
    which groups to drop and resample.
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    grouped = _grouped(rewards, group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return spread <= tol


def zero_std_group_fraction(rewards: Tensor, group_size: int, tol: float = ZERO_STD_TOL) -> float:
    """Fraction of groups with no reward variance: the share of the batch that teaches nothing."""
    return float(zero_variance_groups(rewards, group_size, tol).float().mean().item())


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: Scale = "group",
    eps: float = 1e-4,
    *,
    zero_tol: float = ZERO_STD_TOL,
    baseline: str = "group",
) -> Tensor:
    """A_i = (r_i - mean of its group) / (std + eps), flat [B*G], detached.

    scale="group": std of the response's own group (DeepSeekMath GRPO, TRL default).
    scale="batch": std over the whole batch (mean still per group), which keeps groups with a
    small spread from being blown up to unit scale.
    scale="none": no division (Dr. GRPO), so the gradient keeps the reward's own scale.
    Groups flagged by ``zero_variance_groups(..., tol=zero_tol)`` get exactly 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "batch":
        return batch_centred_advantages(rewards, group_size, scale, eps)
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    zero = zero_variance_groups(rewards, group_size, zero_tol)

    if scale == "none":
        advantages = centred
    else:
        if scale == "group":
            std = grouped.std(dim=1, keepdim=True).expand_as(grouped)
        else:
            std = grouped.flatten().std().expand_as(grouped)
        denom = std + eps
        # Zero-variance groups are overwritten below; a safe denominator keeps eps=0 from
        # producing 0/0 there in the first place.
        denom = torch.where(zero.unsqueeze(1), torch.ones_like(denom), denom)
        advantages = centred / denom

    advantages = torch.where(zero.unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages.flatten()


def batch_centred_advantages(rewards: Tensor, group_size: int, scale: Scale = "batch", eps: float = 1e-4) -> Tensor:
    """A_i = (r_i - mean of the whole batch) / (batch std + eps): the baseline is the batch, not the group.

    A group whose G responses all earn the same reward still gets a signal when that reward differs
    from the rest of the batch's — the case where a confidently wrong start never samples the right
    answer within a group (experiments/adapt: every group of a normal image answers "defect").
    It is no longer an unbiased per-prompt baseline: prompts that are easy for other reasons are
    pushed too. `scale`: "batch" (default) or "none"; a per-group std is undefined for flat groups.
    """
    if scale == "group":
        raise ValueError("the batch baseline needs scale 'batch' or 'none' (a flat group has no std of its own)")
    _grouped(rewards, group_size)
    values = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    centred = values - values.mean()
    if scale == "none":
        return centred
    spread = values.max() - values.min() if values.numel() else values.new_tensor(0.0)
    if float(spread) <= ZERO_STD_TOL:
        return torch.zeros_like(centred)
    return centred / (values.std() + eps)
