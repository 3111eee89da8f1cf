"""The data-parallel helpers: prompt sharding, loss weights, gradient and metric reduction.

The pure parts are checked by hand and by property; the collectives run in two real gloo
processes (this file run as a script, below), which check against single-process arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.grpo.loss import policy_loss
from anomaly_rl.training import distributed as D
from anomaly_rl.training.batches import ResumableBatches

REPO = Path(__file__).resolve().parents[2]
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


# ----------------------------------------------------------------------------- prompt sharding
@pytest.mark.parametrize(
    ("prompts", "mini", "rank", "world", "expected"),
    [
        (4, 1, 0, 2, [0, 1]),
        (4, 1, 1, 2, [2, 3]),
        # two mini-batches [0..3], [4..7]: rank 1 takes the second half of each
        (8, 2, 1, 2, [2, 3, 6, 7]),
        (8, 2, 0, 2, [0, 1, 4, 5]),
        (6, 1, 2, 3, [4, 5]),
        (3, 3, 0, 1, [0, 1, 2]),
    ],
)
def test_rank_prompt_positions_by_hand(prompts: int, mini: int, rank: int, world: int, expected: list[int]) -> None:
    assert D.rank_prompt_positions(prompts, mini, rank, world) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_rank_positions_partition_every_mini_batch(mini: int, world: int, per: int) -> None:
    prompts = mini * world * per
    run = prompts // mini
    shares = [D.rank_prompt_positions(prompts, mini, r, world) for r in range(world)]
    assert sorted(p for share in shares for p in share) == list(range(prompts))  # disjoint, complete
    for share in shares:
        assert len(share) == prompts // world
        for m in range(mini):  # the m-th local mini-batch lies inside the m-th global one
            assert all(m * run <= p < (m + 1) * run for p in share[m * per : (m + 1) * per])


def test_indivisible_batches_fail_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"algo\.prompts_per_step=6 .* 2 x 2"):
        D.check_divisible(6, 2, 2, "algo.prompts_per_step")
    with pytest.raises(ValueError, match="not in"):
        D.rank_prompt_positions(4, 1, 2, 2)


def test_sharded_batches_make_up_the_single_process_batch() -> None:
    samples = [f"s{i}" for i in range(10)]
    whole = ResumableBatches(samples, 4, seed=3, collate=list)  # type: ignore[arg-type]
    shards = [ResumableBatches(samples, 4, seed=3, collate=list) for _ in range(2)]  # type: ignore[arg-type]
    for rank, shard in enumerate(shards):
        shard.shard(rank, 2, mini_batches=2)
    for index in range(5):  # crosses an epoch boundary (2 batches per epoch)
        parts = [shard.local_samples_at(index) for shard in shards]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(whole.samples_at(index))
    whole.shard(0, 1, mini_batches=2)  # one process: unchanged
    assert next(iter(whole)) == whole.samples_at(0)


# ----------------------------------------------------------------------------- loss weights
def test_loss_weight_by_hand() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert D.loss_weight(mask, "grpo") == 2  # completions with tokens
    assert D.loss_weight(mask, "dapo") == 4  # tokens
    assert D.loss_weight(mask, "sft") == 4
    assert D.loss_weight(mask, "dr_grpo") == 3  # completions, empty ones included
    with pytest.raises(ValueError, match="loss_type"):
        D.loss_weight(mask, "ppo")


def _batch(seed: int, rows: int = 12, width: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, width, generator=g)
    old = base + 0.1 * torch.randn(rows, width, generator=g)
    ref = base + 0.1 * torch.randn(rows, width, generator=g)
    adv = torch.randn(rows, generator=g)
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[0] = width  # the batch's widest completion
    lengths[5] = 0  # an empty completion
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return base, old, ref, adv, mask


def _loss_grad(theta: torch.Tensor, rows: slice, batch: tuple, loss_type: str, width: int | None) -> torch.Tensor:
    """d loss / d theta for logp = base + theta, over `rows` trimmed to their own widest completion
    (as a process's rollout is), with dr_grpo dividing by `width` when given."""
    base, old, ref, adv, mask = batch
    own = int(mask[rows].sum(dim=1).max().clamp(min=1))
    theta = theta.detach().requires_grad_(True)
    columns = slice(0, own)
    loss, _ = policy_loss(
        base[rows, columns] + theta[columns], old[rows, columns], ref[rows, columns], adv[rows], mask[rows, columns],
        eps_low=0.2, eps_high=0.2, beta=0.04, loss_type=loss_type, max_completion_length=width,
    )  # fmt: skip
    loss.backward()
    return theta.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_weighted_shard_gradients_equal_the_single_process_gradient(loss_type: str) -> None:
    """sum_r w_r g_r / sum_r w_r over whole-group shards == the gradient on the whole batch."""
    batch = _batch(0)
    mask = batch[4]
    width = mask.shape[1]
    theta = torch.zeros(width)
    whole = _loss_grad(theta, slice(0, 12), batch, loss_type, None)
    shards = [slice(0, 6), slice(6, 12)]  # G = 3: two whole groups each; shard 1 is narrower
    grads = [_loss_grad(theta, s, batch, loss_type, width if loss_type == "dr_grpo" else None) for s in shards]
    weights = [D.loss_weight(mask[s], loss_type) for s in shards]
    combined = torch.zeros(width)
    for g, w in zip(grads, weights, strict=True):
        combined[: g.numel()] += w * g
    combined /= sum(weights)
    torch.testing.assert_close(combined, whole, rtol=1e-5, atol=1e-7)
    if loss_type == "dapo":  # the test can tell: a plain mean of the shard gradients is wrong here
        plain = torch.zeros(width)
        for g in grads:
            plain[: g.numel()] += g / 2
        assert not torch.allclose(plain, whole, atol=1e-4)


# ----------------------------------------------------------------------------- one process
def test_without_a_process_group_everything_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    assert D.all_reduce_gradients([param], 5.0) == 5.0
    assert torch.equal(param.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert D.world_size() == 1 and D.rank() == 0 and D.is_rank_zero() and not D.is_distributed()
    assert D.any_rank(True) and not D.any_rank(False)
    assert D.gather_objects({"a": 1}) == [{"a": 1}]
    assert D.broadcast_from_zero(7) == 7
    assert D.weighted_mean_over_ranks(0.5, 3.0) == 0.5
    D.barrier()
    assert not D.reduces_gradients_here(None)


def test_rank_before_the_group_exists_comes_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's re-launched second process
    assert D.rank() == 1 and not D.is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of another node is not rank 0
    assert not D.is_rank_zero()
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank wins
    assert D.is_rank_zero()


def test_rank_seeds() -> None:
    assert D.rank_seed(123, 0) == 123  # one process keeps its stream
    seeds = {D.rank_seed(123, r) for r in range(4)}
    assert len(seeds) == 4
    assert D.rank_seed(123, 1) == D.rank_seed(123, 1) != D.rank_seed(124, 1)


def test_own_state_picks_this_rank_or_none() -> None:
    saved = {"x": 0, "per_rank": [{"x": 0}, {"x": 1}]}
    assert D.own_state(saved, 1, 2) == {"x": 1}
    assert D.own_state(saved, 0, 3) is None  # another number of processes
    assert D.own_state({"x": 0}, 1, 2) is None  # a one-process checkpoint


# ----------------------------------------------------------------------------- metrics
def _record(total: list[float], lengths: list[int], stats: list[dict[str, float]], rollout_s: float) -> Any:
    # Imported here, not at the top: the two-process workers import this file, and lightly.
    from anomaly_rl.grpo.metrics import StepRecord

    total_a = np.asarray(total)
    return StepRecord(
        rewards={"cls": (total_a > 0.5).astype(float), "total": total_a},
        lengths=torch.tensor(lengths),
        truncated=torch.tensor([n >= 4 for n in lengths]),
        update_stats=stats,
        dynamic_rounds=1,
        rollout_seconds=rollout_s,
        score_seconds=0.5,
        update_seconds=1.0,
        box_pred_areas=[10.0],
        box_true_areas=[],
    )


def test_step_metrics_over_two_processes_are_those_of_their_rows() -> None:
    from anomaly_rl.grpo.metrics import step_metrics

    a = _record([1.0, 1.0, 0.0, 0.2], [4, 2, 1, 3], [{"kl": 0.1, "loss": 1.0}], rollout_s=2.0)
    b = _record([0.5, 0.5, 1.0, 0.0], [1, 1, 4, 2], [{"kl": 0.3, "loss": float("nan")}], rollout_s=3.0)
    m = step_metrics([a, b], group_size=2, rollout_step=7, lr=1e-3, classification_key="cls")
    rows = [1.0, 1.0, 0.0, 0.2, 0.5, 0.5, 1.0, 0.0]
    assert m["train/reward"] == pytest.approx(np.mean(rows))
    assert m["train/reward_std"] == pytest.approx(np.std(rows, ddof=1))
    assert m["train/zero_std_group_fraction"] == pytest.approx(2 / 4)  # (1,1) and (.5,.5)
    assert m["train/zero_std_group_fraction_cls"] == pytest.approx(3 / 4)  # cls: (1,1) (0,0) (0,0) (1,0)
    assert m["train/completion_length_max"] == 4 and m["train/completion_length_mean"] == pytest.approx(18 / 8)
    assert m["train/truncation_rate"] == pytest.approx(2 / 8)
    assert m["train/kl"] == pytest.approx(0.2) and m["train/loss"] == pytest.approx(1.0)  # NaN skipped
    assert m["time/rollout_s"] == 3.0 and m["time/tokens_per_s"] == pytest.approx(18 / 3.0)
    assert m["train/box_area_pred_mean"] == 10.0 and "train/box_area_true_mean" not in m
    assert m["train/rollout_step"] == 7 and m["train/lr"] == 1e-3
    single = step_metrics([a], group_size=2, rollout_step=7, lr=1e-3, classification_key="cls")
    assert single["train/reward"] == pytest.approx(np.mean(rows[:4]))


# ----------------------------------------------------------------------------- two gloo processes
def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two processes: runs every collective and writes what it got."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    result: dict[str, object] = {}
    # Gradients: a tensor both have, one only rank 0 has, one nobody has.
    both = torch.nn.Parameter(torch.zeros(3))
    only0 = torch.nn.Parameter(torch.zeros(2))
    nobody = torch.nn.Parameter(torch.zeros(1))
    both.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    if rank == 0:
        only0.grad = torch.tensor([4.0, 8.0])
    weight = [1.0, 3.0][rank]
    result["total_weight"] = D.all_reduce_gradients([both, only0, nobody], weight)
    result["both"] = both.grad.tolist()
    result["only0"] = only0.grad.tolist()
    result["nobody"] = nobody.grad is None
    # The real loss, split by whole groups: the combined gradient is the single-process one.
    for loss_type in LOSS_TYPES:
        batch = _batch(1)
        width = batch[4].shape[1]
        theta = torch.zeros(width, requires_grad=True)
        rows = slice(6 * rank, 6 * rank + 6)
        # dr_grpo divides by the run's constant (max_new_tokens), the same on every process.
        local = _loss_grad(theta, rows, batch, loss_type, width if loss_type == "dr_grpo" else None)
        param = torch.nn.Parameter(torch.zeros(width))
        param.grad = torch.zeros(width)
        param.grad[: local.numel()] = local
        D.all_reduce_gradients([param], D.loss_weight(batch[4][rows], loss_type))
        whole = _loss_grad(theta, slice(0, 12), batch, loss_type, None)
        result[f"gap_{loss_type}"] = float((param.grad - whole).abs().max())
        result[f"grad_{loss_type}"] = param.grad.tolist()
    result["gathered"] = D.gather_objects({"rank": rank})
    result["any"] = [D.any_rank(rank == 1), D.any_rank(False)]
    result["broadcast"] = D.broadcast_from_zero(f"from {rank}")
    result["weighted_mean"] = D.weighted_mean_over_ranks([1.0, 2.0][rank], [1.0, 3.0][rank])
    D.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    dist.destroy_process_group()


def test_collectives_in_two_gloo_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(var, None)
    init = tmp_path / "init"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.training.test_distributed", str(r), str(init), str(tmp_path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in (0, 1)
    ]  # fmt: skip
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for key in r0:  # bitwise the same on both: each process steps its optimiser on these
        if key not in {"gathered", "any"}:
            assert r0[key] == r1[key], key
    assert r0["total_weight"] == 4.0
    # weights 1 and 3: (1*[1,2,3] + 3*[2,4,6]) / 4
    assert r0["both"] == pytest.approx([7 / 4, 14 / 4, 21 / 4])
    assert r0["only0"] == pytest.approx([1.0, 2.0])  # rank 1 counts as zero: (1*[4,8] + 3*0) / 4
    assert r0["nobody"] is True  # no gradient anywhere stays None
    for loss_type in LOSS_TYPES:
        assert r0[f"gap_{loss_type}"] < 1e-6, loss_type
    assert r0["gathered"] == r1["gathered"] == [{"rank": 0}, {"rank": 1}]
    assert r0["any"] == r1["any"] == [True, False]
    assert r0["broadcast"] == "from 0"
    assert r0["weighted_mean"] == pytest.approx((1 * 1 + 2 * 3) / 4)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
