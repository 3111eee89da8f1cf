"""The clipped GRPO surrogate with a k3 KL penalty, and the three ways to average it.

Everything here is per-token tensor maths with no model inside, so each number can be checked by
hand. Shapes: N completions (B*G), T completion tokens (right-padded width).

Per token t of completion i (method.md section 4):
    rho  = exp(logp - old_logp)
    L_t  = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
    KL_t = exp(ref - logp) - (ref - logp) - 1        (k3: unbiased for KL(pi||ref), always >= 0)

Aggregations differ in how much weight a long completion gets:
    grpo    mean over each sequence's tokens, then over sequences (long answers are diluted)
    dapo    sum over all tokens / tokens in the batch (every token weighs the same)
    dr_grpo sum / (N * max_completion_length) (a constant divisor: no length bias at all)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossType = Literal["grpo", "dapo", "dr_grpo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "dapo", "dr_grpo")


def _check_inputs(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
) -> None:
    """Fail loudly on shape or setting mistakes; a silent broadcast here trains the wrong thing."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logp shape {tuple(logp.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(
            f"advantages must be [N] = [{logp.shape[0]}] (one per completion), got {tuple(advantages.shape)}"
        )
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if beta < 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if ref_logp is None and beta > 0.0:
        raise ValueError(f"ref_logp is None but beta={beta} > 0: the KL penalty needs reference log-probs")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: LossType,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss to minimise and detached stats for logging.

    ``old_logp=None`` means mu = 1 (one update per generated batch): old = logp.detach(), so the
    ratio is 1 and the gradient is the plain -A * grad(logp). ``ref_logp`` may be None only when
    beta == 0; the "kl" stat is then absent rather than a made-up 0. ``max_completion_length``
    sets dr_grpo's divisor (default: the tensor width T); it is ignored by the other types.

    Positions where mask == 0 are replaced by 0 before any arithmetic, so padding holding -inf or
    NaN log-probs cannot poison the loss or its gradient. Sequences with no completion tokens
    are skipped by "grpo" (instead of contributing 0/0) and add nothing to the others.
    """
    _check_inputs(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type)
    n_seq, width = logp.shape
    keep = mask.bool()
    weight = keep.to(logp.dtype)

    def clean(t: Tensor) -> Tensor:
        return torch.where(keep, t, torch.zeros_like(t))

    logp_c = clean(logp)
    old_c = logp_c.detach() if old_logp is None else clean(old_logp.to(logp.dtype)).detach()
    adv = advantages.to(logp.dtype).detach().unsqueeze(1)

    ratio = torch.exp(logp_c - old_c)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg_token = -torch.minimum(ratio * adv, clipped * adv)

    kl_token: Tensor | None = None
    if ref_logp is not None:
        delta = clean(ref_logp.to(logp.dtype)).detach() - logp_c
        kl_token = torch.exp(delta) - delta - 1.0
    token_loss = pg_token if kl_token is None or beta == 0.0 else pg_token + beta * kl_token

    tokens_per_seq = weight.sum(dim=1)
    n_tokens = tokens_per_seq.sum()
    dr_grpo_len = width if max_completion_length is None else max_completion_length
    if max_completion_length is not None:
        longest = int(tokens_per_seq.max().item()) if n_seq else 0
        if max_completion_length < max(longest, 1):
            raise ValueError(
                f"max_completion_length={max_completion_length} is shorter than a completion "
                f"in the batch ({longest} tokens)"
            )

    def aggregate(per_token: Tensor) -> Tensor:
        masked = per_token * weight
        if loss_type == "grpo":
            has_tokens = tokens_per_seq > 0
            per_seq = masked.sum(dim=1) / tokens_per_seq.clamp(min=1.0)
            # Sum (not mean) over an empty selection keeps the graph alive and gives exactly 0.
            return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
        if loss_type == "dapo":
            return masked.sum() / n_tokens.clamp(min=1.0)
        return masked.sum() / max(n_seq * dr_grpo_len, 1)

    loss = aggregate(token_loss)

    with torch.no_grad():
        denom = n_tokens.clamp(min=1.0)
        low = (adv < 0) & (ratio < 1.0 - eps_low) & keep
        high = (adv > 0) & (ratio > 1.0 + eps_high) & keep
        ratio_on_tokens = ratio[keep]
        stats: dict[str, Tensor] = {
            "pg_loss": aggregate(pg_token).detach(),
            "clip_low_fraction": low.sum() / denom,
            "clip_high_fraction": high.sum() / denom,
            "clip_fraction": (low | high).sum() / denom,
            "ratio_mean": (ratio * weight).sum() / denom,
            "ratio_min": ratio_on_tokens.min() if ratio_on_tokens.numel() else ratio.new_tensor(1.0),
            "ratio_max": ratio_on_tokens.max() if ratio_on_tokens.numel() else ratio.new_tensor(1.0),
            "n_tokens": n_tokens.detach(),
            "completion_length_mean": tokens_per_seq.mean() if n_seq else n_tokens.new_tensor(0.0),
            "advantage_mean": adv.mean() if n_seq else adv.new_tensor(0.0),
            "advantage_abs_mean": adv.abs().mean() if n_seq else adv.new_tensor(0.0),
        }
        if kl_token is not None:
            stats["kl"] = (kl_token * weight).sum() / denom
    return loss, {k: v.detach() for k, v in stats.items()}
