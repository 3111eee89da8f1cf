"""Group advantages against a plain-Python re-implementation and hand-worked numbers."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.grpo.advantages import (
    group_advantages,
    zero_std_group_fraction,
    zero_variance_groups,
)


def reference_advantages(rewards: list[float], g: int, scale: str, eps: float) -> list[float]:
    """Loop version: statistics.stdev is the unbiased (n-1) estimator, the one TRL uses."""
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out: list[float] = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        if max(group) - min(group) <= 1e-6:
            out.extend([0.0] * g)
            continue
        mean = sum(group) / g
        for r in group:
            if scale == "none":
                out.append(r - mean)
            elif scale == "group":
                out.append((r - mean) / (statistics.stdev(group) + eps))
            else:
                out.append((r - mean) / (batch_std + eps))
    return out


def test_hand_worked_group() -> None:
    # mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 exactly
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001
    torch.testing.assert_close(adv, expected)


def test_hand_worked_batch_and_none() -> None:
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    # groups (1,0) and (3,1): centred (0.5,-0.5) and (1,-1); batch stdev of [1,0,3,1] = sqrt(11/6)
    batch_std = math.sqrt(((1 - 1.25) ** 2 + 1.25**2 + 1.75**2 + 0.25**2) / 3)
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale="batch"),
        torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64) / (batch_std + 1e-4),
    )
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_reference(scale: str, seed: int) -> None:
    rng = random.Random(seed)
    g = rng.choice([2, 3, 6, 8])
    b = rng.randint(1, 6)
    rewards = [rng.choice([0.0, 0.5, 1.0, rng.uniform(-2, 3)]) for _ in range(b * g)]
    # force one zero-variance group in most cases
    if b > 1:
        rewards[:g] = [0.1] * g
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), g, scale=scale)
    want = reference_advantages(rewards, g, scale, 1e-4)
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_is_exactly_zero(scale: str) -> None:
    # mean of three 0.1s is 0.10000000000000002 in float64: without the explicit zeroing the
    # group would get ~1e-13 / 1e-4 advantages.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.5], dtype=torch.float64)
    adv = group_advantages(rewards, 3, scale=scale)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(adv).all()
    assert adv[3:].abs().sum() > 0


def test_all_equal_batch_with_eps_zero_has_no_nan() -> None:
    for scale in ("group", "batch", "none"):
        adv = group_advantages(torch.full((6,), 0.7), 3, scale=scale, eps=0.0)
        assert adv.tolist() == [0.0] * 6


def test_zero_variance_helpers() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.3, 0.3 + 1e-9], dtype=torch.float64)
    mask = zero_variance_groups(rewards, 2)
    assert mask.tolist() == [True, False, True, True]
    assert zero_std_group_fraction(rewards, 2) == pytest.approx(0.75)
    assert zero_variance_groups(rewards, 2, tol=0.0).tolist() == [True, False, True, False]


def test_integer_rewards_are_accepted() -> None:
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), 2, scale="none")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_output_is_detached() -> None:
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not group_advantages(rewards, 2).requires_grad


@pytest.mark.parametrize(
    ("rewards", "g", "match"),
    [
        (torch.zeros(5), 2, "multiple of group_size"),
        (torch.zeros(4), 1, "group_size must be >= 2"),
        (torch.tensor([0.0, float("nan")]), 2, "non-finite"),
        (torch.tensor([0.0, float("inf")]), 2, "non-finite"),
        (torch.zeros(2, 2), 2, "1-D"),
        (torch.zeros(0), 2, "empty"),
    ],
)
def test_bad_input(rewards: torch.Tensor, g: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g)
    with pytest.raises(ValueError, match=match):
        zero_std_group_fraction(rewards, g)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


@settings(max_examples=60, deadline=None)
@given(
    g=st.integers(2, 8),
    b=st.integers(1, 5),
    data=st.data(),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_properties(g: int, b: int, data: st.DataObject, scale: str) -> None:
    values = data.draw(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=b * g, max_size=b * g)
    )
    rewards = torch.tensor(values, dtype=torch.float64)
    adv = group_advantages(rewards, g, scale=scale).view(b, g)
    assert torch.isfinite(adv).all()
    # Centred per group: advantages sum to zero within each group.
    assert torch.allclose(adv.sum(dim=1), torch.zeros(b, dtype=torch.float64), atol=1e-6)
    # Order within a group is preserved (advantage is monotone in reward).
    grouped = rewards.view(b, g)
    for i in range(b):
        for j in range(g):
            for k in range(g):
                if grouped[i, j] > grouped[i, k] + 1e-6:
                    assert adv[i, j] > adv[i, k]
    if scale == "group":
        # Unit scale up to eps: |A| <= (G-1)/sqrt(G) for the unbiased std.
        assert adv.abs().max() <= (g - 1) / math.sqrt(g) + 1e-9


def test_batch_baseline_hand_worked() -> None:
    """Two groups of 2: [1, 1] (flat) and [0, 0] (flat). The group baseline gives nothing; the batch
    baseline (mean 0.5, sample std 0.5774) pushes the first group up and the second down."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert group_advantages(rewards, 2).abs().sum() == 0
    batch = group_advantages(rewards, 2, scale="batch", eps=0.0, baseline="batch")
    torch.testing.assert_close(batch, torch.tensor([0.5, 0.5, -0.5, -0.5]) / (1 / 3) ** 0.5)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none", baseline="batch"),
                               torch.tensor([0.5, 0.5, -0.5, -0.5]))
    assert group_advantages(torch.ones(4), 2, scale="batch", baseline="batch").abs().sum() == 0
    with pytest.raises(ValueError, match="batch baseline"):
        group_advantages(rewards, 2, scale="group", baseline="batch")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(rewards, 2, baseline="prompt")
