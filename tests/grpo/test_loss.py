"""The GRPO loss against a token-by-token Python loop, hand-made clip cases and finite differences."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.grpo.advantages import group_advantages
from anomaly_rl.grpo.loss import policy_loss

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def loop_loss(
    logp: list[list[float]],
    old: list[list[float]],
    ref: list[list[float]] | None,
    adv: list[float],
    mask: list[list[int]],
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    max_len: int | None = None,
) -> tuple[float, float]:
    """Scalar-by-scalar loss and mean token KL, written without any tensor maths."""
    n, width = len(logp), len(logp[0])
    per_seq_sums: list[float] = []
    per_seq_counts: list[int] = []
    kl_sum, count = 0.0, 0
    for i in range(n):
        s, c = 0.0, 0
        for t in range(width):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            token = -min(rho * adv[i], clipped * adv[i])
            if ref is not None:
                d = ref[i][t] - logp[i][t]
                kl = math.exp(d) - d - 1
                kl_sum += kl
                token += beta * kl
            s += token
            c += 1
        per_seq_sums.append(s)
        per_seq_counts.append(c)
        count += c
    if loss_type == "grpo":
        means = [s / c for s, c in zip(per_seq_sums, per_seq_counts, strict=True) if c > 0]
        loss = sum(means) / len(means) if means else 0.0
    elif loss_type == "dapo":
        loss = sum(per_seq_sums) / max(count, 1)
    else:
        loss = sum(per_seq_sums) / (n * (max_len if max_len is not None else width))
    return loss, kl_sum / max(count, 1)


def random_batch(seed: int, n: int = 6, width: int = 7, empty_row: bool = False):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, width, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(n, width, generator=gen, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(n, width, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    if empty_row:
        lengths[1] = 0
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return logp, old, ref, adv, mask


def as_lists(*tensors: torch.Tensor):
    return [t.tolist() for t in tensors]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_loop(loss_type: str, seed: int, beta: float) -> None:
    logp, old, ref, adv, mask = random_batch(seed, empty_row=seed % 2 == 1)
    loss, stats = policy_loss(
        logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=beta, loss_type=loss_type
    )
    want, want_kl = loop_loss(*as_lists(logp, old, ref, adv, mask), 0.2, 0.28, beta, loss_type)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert stats["kl"].item() == pytest.approx(want_kl, rel=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_rewards_to_loss_end_to_end(loss_type: str, scale: str) -> None:
    """Advantages from each scale, fed to each aggregation, against the loops."""
    rng = random.Random(7)
    rewards = [rng.choice([0.0, 1.0, 1.5]) for _ in range(12)]
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale=scale)
    logp, old, ref, _, mask = random_batch(3, n=12, width=5)
    loss, _ = policy_loss(
        logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.04, loss_type=loss_type
    )
    want, _ = loop_loss(*as_lists(logp, old, ref, adv, mask), 0.2, 0.2, 0.04, loss_type)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_dr_grpo_explicit_max_length() -> None:
    logp, old, ref, adv, mask = random_batch(11, width=5)
    loss, _ = policy_loss(
        logp,
        old,
        ref,
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.1,
        loss_type="dr_grpo",
        max_completion_length=9,
    )
    want, _ = loop_loss(*as_lists(logp, old, ref, adv, mask), 0.2, 0.2, 0.1, "dr_grpo", max_len=9)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(
            logp,
            old,
            ref,
            adv,
            mask,
            eps_low=0.2,
            eps_high=0.2,
            beta=0.1,
            loss_type="dr_grpo",
            max_completion_length=2,
        )


def test_aggregations_weight_length_differently() -> None:
    # One short sequence with loss 1/token, one long with 0/token: the types must disagree.
    logp = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([-1.0, 0.0], dtype=torch.float64)  # rho = 1 -> token loss = -A
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0)
    grpo, _ = policy_loss(logp, None, None, adv, mask, loss_type="grpo", **kw)
    dapo, _ = policy_loss(logp, None, None, adv, mask, loss_type="dapo", **kw)
    dr, _ = policy_loss(logp, None, None, adv, mask, loss_type="dr_grpo", **kw)
    assert grpo.item() == pytest.approx(0.5)  # (1/1 + 0/4) / 2
    assert dapo.item() == pytest.approx(0.2)  # 1 / 5 tokens
    assert dr.item() == pytest.approx(0.125)  # 1 / (2 * 4)


def test_kl_zero_when_policy_is_reference() -> None:
    logp, old, _, adv, mask = random_batch(5)
    loss_kl, stats = policy_loss(
        logp, old, logp.clone(), adv, mask, eps_low=0.2, eps_high=0.2, beta=0.5, loss_type="dapo"
    )
    loss_no, _ = policy_loss(
        logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_type="dapo"
    )
    assert stats["kl"].item() == 0.0
    assert loss_kl.item() == pytest.approx(loss_no.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mu_one_gradient_is_minus_advantage(loss_type: str) -> None:
    base, _, _, adv, mask = random_batch(2, empty_row=True)
    n, width = base.shape
    logp = base.clone().requires_grad_(True)
    loss, stats = policy_loss(
        logp, logp.detach(), None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_type=loss_type
    )
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["clip_fraction"].item() == 0.0
    loss.backward()

    lengths = mask.sum(1).tolist()
    expected = torch.zeros(n, width, dtype=torch.float64)
    for i in range(n):
        for t in range(width):
            if not mask[i, t]:
                continue
            if loss_type == "grpo":
                norm = sum(1 for x in lengths if x > 0) * lengths[i]
            elif loss_type == "dapo":
                norm = sum(lengths)
            else:
                norm = n * width
            expected[i, t] = -adv[i].item() / norm
    torch.testing.assert_close(logp.grad, expected)

    # Finite differences, with old_logp held at the unperturbed values.
    old = base.clone()
    h = 1e-6
    for i, t in [(0, 0), (2, 0), (1, 0), (n - 1, width - 1)]:
        plus, minus = base.clone(), base.clone()
        plus[i, t] += h
        minus[i, t] -= h
        kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0, loss_type=loss_type)
        lp, _ = policy_loss(plus, old, None, adv, mask, **kw)
        lm, _ = policy_loss(minus, old, None, adv, mask, **kw)
        assert ((lp - lm) / (2 * h)).item() == pytest.approx(expected[i, t].item(), abs=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_gradient_gradcheck(loss_type: str) -> None:
    logp, old, ref, adv, mask = random_batch(9, n=4, width=5, empty_row=True)
    logp = logp.requires_grad_(True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return policy_loss(x, old, ref, adv, mask, eps_low=0.2, eps_high=0.3, beta=0.1, loss_type=loss_type)[
            0
        ]

    assert torch.autograd.gradcheck(fn, (logp,))


def test_clip_fractions_hand_made() -> None:
    ratios = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.1]], dtype=torch.float64)
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(
        logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_type="dapo"
    )
    # token (0,0): A>0, rho 1.5 > 1.2 -> high clip. token (1,0): A<0, rho 0.5 < 0.8 -> low clip.
    # (0,1) A>0 rho 0.5 and (1,1) A<0 rho 1.5 are NOT clipped: min() keeps the unclipped term.
    assert stats["clip_high_fraction"].item() == pytest.approx(1 / 5)
    assert stats["clip_low_fraction"].item() == pytest.approx(1 / 5)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 0.5 + 1.5) / 5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["n_tokens"].item() == 5
    # per token -min(rho*A, clip(rho)*A): -1.2, -0.5, -1.0 for A=+1; +0.8, +1.5 for A=-1
    tokens = [-1.2, -0.5, -1.0, 0.8, 1.5]
    assert loss.item() == pytest.approx(sum(tokens) / 5)
    loss.backward()
    grad = logp.grad
    assert grad[0, 0].item() == 0.0 and grad[1, 0].item() == 0.0  # clipped: no gradient
    assert grad[1, 2].item() == 0.0  # masked
    assert grad[0, 1].item() == pytest.approx(-0.5 / 5)  # d(-rho*A)/dlogp = -rho*A


def test_padding_garbage_does_not_leak() -> None:
    logp, old, ref, adv, mask = random_batch(4, empty_row=True)
    pad = mask == 0
    dirty = logp.clone()
    dirty[pad] = float("-inf")
    old_d, ref_d = old.clone(), ref.clone()
    old_d[pad] = float("nan")
    ref_d[pad] = float("inf")
    dirty.requires_grad_(True)
    for loss_type in LOSS_TYPES:
        kw = dict(eps_low=0.2, eps_high=0.2, beta=0.04, loss_type=loss_type)
        loss, stats = policy_loss(dirty, old_d, ref_d, adv, mask, **kw)
        clean_loss, _ = policy_loss(logp, old, ref, adv, mask, **kw)
        assert loss.item() == pytest.approx(clean_loss.item(), rel=1e-12)
        assert all(torch.isfinite(v).all() for v in stats.values())
        (grad,) = torch.autograd.grad(loss, dirty)
        assert torch.isfinite(grad).all()
        assert (grad[pad] == 0).all()


def test_all_sequences_empty() -> None:
    logp = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4)
    for loss_type in LOSS_TYPES:
        loss, stats = policy_loss(
            logp,
            None,
            logp.detach() * 0,
            torch.ones(3),
            mask,
            eps_low=0.2,
            eps_high=0.2,
            beta=0.1,
            loss_type=loss_type,
        )
        assert loss.item() == 0.0
        assert all(torch.isfinite(v).all() for v in stats.values())
        loss.backward()
        assert (logp.grad == 0).all()
        logp.grad = None


def test_stats_are_detached() -> None:
    logp, old, ref, adv, mask = random_batch(1)
    logp.requires_grad_(True)
    _, stats = policy_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.04, loss_type="grpo")
    assert not any(v.requires_grad for v in stats.values())
    assert {"kl", "clip_low_fraction", "clip_high_fraction", "clip_fraction", "ratio_mean", "pg_loss"} <= set(
        stats
    )


def test_bad_input() -> None:
    logp, old, ref, adv, mask = random_batch(0)
    kw = dict(eps_low=0.2, eps_high=0.2, loss_type="grpo")
    with pytest.raises(ValueError, match="ref_logp is None"):
        policy_loss(logp, old, None, adv, mask, beta=0.04, **kw)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, ref, adv[:-1], mask, beta=0.0, **kw)
    with pytest.raises(ValueError, match="mask shape"):
        policy_loss(logp, old, ref, adv, mask[:, :-1], beta=0.0, **kw)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, old, ref, adv, mask, beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="ppo")
    with pytest.raises(ValueError, match="eps_low"):
        policy_loss(logp, old, ref, adv, mask, beta=0.0, eps_low=1.0, eps_high=0.2, loss_type="grpo")
    with pytest.raises(ValueError, match="beta"):
        policy_loss(logp, old, ref, adv, mask, beta=-0.1, **kw)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        policy_loss(logp[0], old[0], ref[0], adv, mask[0], beta=0.0, **kw)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    width=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.0, 8.0),
    beta=st.floats(0.0, 1.0),
    loss_type=st.sampled_from(LOSS_TYPES),
)
def test_properties(n: int, width: int, seed: int, spread: float, beta: float, loss_type: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, width, generator=gen) * 20
    old = logp + torch.randn(n, width, generator=gen) * spread
    ref = logp + torch.randn(n, width, generator=gen) * spread
    adv = torch.randn(n, generator=gen) * 3
    mask = torch.rand(n, width, generator=gen) > 0.3  # ragged, not even left-aligned
    loss, stats = policy_loss(
        logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=beta, loss_type=loss_type
    )
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in stats.values())
    # k3 = exp(d) - d - 1 >= 0 exactly; in float32 it rounds to about -1e-8 where d is ~1e-4.
    assert stats["kl"].item() >= -1e-6
    assert 0.0 <= stats["clip_fraction"].item() <= 1.0
    assert stats["clip_fraction"].item() == pytest.approx(
        stats["clip_low_fraction"].item() + stats["clip_high_fraction"].item()
    )
