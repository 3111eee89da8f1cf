"""Data parallel GRPO and SFT by hand: which prompts a process takes, and what it shares.

The modules call the policy directly (rollouts, chunked log-probs), never through DDP's forward,
and they need gradients weighted by their loss's denominator rather than DDP's plain mean; so
gradients are summed here explicitly, after backward and before clipping. Every process then
clips the same gradient and steps the same optimiser from the same weights, so the weights stay
identical without ever being broadcast again.

With one process (no process group) every function here is the identity or a no-op, so the
single-process loop keeps its exact numbers.

Two kinds of traffic:
- gradients go through the default process group (gloo on CPU, NCCL on GPU), on their device;
- the small things (loss weights, metric payloads, flags, barriers) go through a gloo group on
  the host, with a long timeout: rank 0 may evaluate a whole test split while the others wait.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

HOST_GROUP_TIMEOUT = datetime.timedelta(hours=12)
"""How long a process waits for the others at a host collective (evaluation runs on rank 0 only)."""

GRADIENT_BUCKET_NUMEL = 1 << 24
"""Gradients are flattened into buckets of at most this many elements: one collective per bucket
instead of one per tensor, without a second full copy of a large model's gradients."""

_host_group: Any = None


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank.

    Before the process group exists (the code a launched process runs before its first `fit`),
    read from the launcher's environment: `RANK` (torchrun, SLURM via Lightning), else Lightning's
    `LOCAL_RANK` on node `NODE_RANK`. A process on another node is never reported as rank 0.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK") or 0)
    node = int(os.environ.get("NODE_RANK") or 0)
    return local + node * max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def is_rank_zero() -> bool:
    return rank() == 0


def rank_seed(seed: int, process: int) -> int:
    """The seed of one process's sampling stream.

    Rank 0 keeps `seed` itself, so a one-process run draws exactly what it drew before data
    parallelism existed; other ranks get independent streams (SeedSequence mixes (seed, rank)).
    """
    if process == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, process]).generate_state(1)[0])


def check_divisible(prompts_per_step: int, mini_batches: int, processes: int, setting: str) -> None:
    """Each process must get whole groups of every mini-batch, and all the same number of them."""
    if processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {processes}")
    if prompts_per_step % (mini_batches * processes):
        raise ValueError(
            f"{setting}={prompts_per_step} is not divisible by mini-batches x processes = "
            f"{mini_batches} x {processes}: every process takes the same number of whole prompts "
            "(and so whole groups) from each mini-batch (change it or trainer.devices)"
        )


def rank_prompt_positions(prompts_per_step: int, mini_batches: int, process: int, processes: int) -> list[int]:
    """The positions, within one global batch of prompts, that `process` samples and trains on.

    The single-process loop splits a batch into `mini_batches` contiguous runs of prompts and
    takes one optimiser step per run. Here each run is split again into `processes` contiguous
    slices and a process takes its slice of every run, in order: its k-th local mini-batch is
    its part of the global k-th mini-batch, so the summed gradient of one distributed update is
    the gradient the single process would take on that same mini-batch. A prompt (and so its
    whole group of G completions) belongs to exactly one process.
    """
    check_divisible(prompts_per_step, mini_batches, processes, "prompts per step")
    if not 0 <= process < processes:
        raise ValueError(f"process {process} is not in [0, {processes})")
    run = prompts_per_step // mini_batches
    share = run // processes
    return [m * run + process * share + i for m in range(mini_batches) for i in range(share)]


def loss_weight(mask: torch.Tensor, loss_type: str) -> float:
    """This process's share of the denominator of the loss it computed over `mask` ([N, T]).

    The single-process loss over a mini-batch is a sum over its rows divided by a denominator
    that is itself a sum over rows; so the single-process gradient is sum_r w_r g_r / sum_r w_r,
    where g_r is the gradient of process r's local loss and w_r its local denominator:
        grpo    the number of completions with at least one token (mean of per-sequence means)
        dapo    the number of completion tokens (per-token mean); also the SFT loss
        dr_grpo the number of completions, provided every process divides by the same completion
                length (the module passes the widest rollout of all processes, as the single
                process would have padded to it)
    """
    if loss_type == "grpo":
        return float((mask.sum(dim=1) > 0).sum())
    if loss_type in {"dapo", "sft"}:
        return float(mask.sum())
    if loss_type == "dr_grpo":
        return float(mask.shape[0])
    raise ValueError(f"loss_type must be grpo, dapo, dr_grpo or sft, got {loss_type!r}")


def host_group() -> Any:
    """The gloo group for small host-side collectives (created on first use, by every rank alike)."""
    global _host_group
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo", timeout=HOST_GROUP_TIMEOUT)
    return _host_group


def reset_host_group() -> None:
    """Forget the host group (it belongs to a process group that has been destroyed)."""
    global _host_group
    _host_group = None


def _host_all_reduce(values: torch.Tensor, op: Any = None) -> torch.Tensor:
    values = values.detach().to("cpu", torch.float64).clone()
    dist.all_reduce(values, op=op or dist.ReduceOp.SUM, group=host_group())
    return values


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], weight: float) -> float:
    """Replace every gradient by the `weight`-weighted mean of that gradient over processes.

    Call after backward and before clipping. `weight` is this process's `loss_weight`. A
    parameter without a gradient on some processes counts as zero there; one without a gradient
    on every process keeps `grad=None`, as it would in one process (AdamW skips it entirely,
    where a zero gradient would still decay its moments). Returns the summed weight.
    """
    params = list(params)
    if not is_distributed():
        return weight
    meta = _host_all_reduce(torch.tensor([weight, *[float(p.grad is not None) for p in params]]))
    total = float(meta[0])
    # All local losses empty (every weight 0): their gradients are all zero; any mean will do.
    scale = weight / total if total > 0 else 1.0 / world_size()
    grads = []
    for param, present in zip(params, meta[1:].tolist(), strict=True):
        if present == 0:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    for bucket in _buckets(grads):
        # Summed in float32 at least: bf16 gradients would lose bits in the sum.
        dtype = torch.promote_types(bucket[0].dtype, torch.float32)
        flat = torch.cat([g.reshape(-1).to(dtype) for g in bucket]).mul_(scale)
        dist.all_reduce(flat)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    return total


def _buckets(grads: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        same_kind = not bucket or (grad.device == bucket[0].device and grad.dtype == bucket[0].dtype)
        if bucket and (size + grad.numel() > GRADIENT_BUCKET_NUMEL or not same_kind):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


def any_rank(flag: bool) -> bool:
    """True if `flag` is True on any process: a decision every process must take together
    (a non-finite loss on one process stops all of them rather than leaving the others waiting)."""
    if not is_distributed():
        return bool(flag)
    return bool(_host_all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX)[0] > 0)


def weighted_mean_over_ranks(value: float, weight: float) -> float:
    """sum_r w_r v_r / sum_r w_r: a per-token (or per-row) mean over every process's items."""
    if not is_distributed():
        return float(value)
    total = _host_all_reduce(torch.tensor([float(value) * weight, float(weight)]))
    return float(total[0] / total[1]) if total[1] > 0 else float(value)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (small picklable payloads: rewards, metric inputs)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=host_group())
    return out


def broadcast_from_zero(obj: Any) -> Any:
    """Rank 0's `obj` on every process: one decision (pause, time out) for all of them."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def barrier() -> None:
    """Wait for every process (a no-op with one process or before the group exists)."""
    if is_distributed():
        dist.barrier(group=host_group())


def reduces_gradients_here(trainer: Any) -> bool:
    """True when this module must combine the gradients itself: several processes under a DDP
    strategy. Sharding strategies (FSDP, DeepSpeed) reduce (and shard) gradients themselves; a
    second reduction over their shards would add unrelated pieces together."""
    from torch.nn.parallel import DistributedDataParallel

    return is_distributed() and isinstance(getattr(getattr(trainer, "strategy", None), "model", None), DistributedDataParallel)


def no_backward_sync(trainer: Any) -> contextlib.AbstractContextManager[Any]:
    """Keep Lightning's DDP wrapper from averaging gradients itself during `manual_backward`.

    Lightning prepares DDP's reducer before a manual backward, and the reducer would take a plain
    mean across processes; the modules reduce with the right weights instead (`all_reduce_gradients`).
    """
    strategy = getattr(trainer, "strategy", None)
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def own_state(saved: dict[str, Any], process: int, processes: int) -> dict[str, Any] | None:
    """This process's entry of a checkpoint's per-rank random states, or None when the checkpoint
    was written by a different number of processes (or by one, which stores no list)."""
    per_rank = saved.get("per_rank")
    if not per_rank or len(per_rank) != processes:
        return None
    return per_rank[process]


def process_states(state: dict[str, Any]) -> dict[str, Any]:
    """A phase's checkpoint entry: this process's random state, plus every process's under data
    parallelism (only rank 0 writes the checkpoint, so it must carry the others' streams)."""
    if is_distributed():
        return {**state, "per_rank": gather_objects(dict(state))}
    return state


def own_process_state(saved: dict[str, Any]) -> dict[str, Any] | None:
    """The state this process saved, to continue its random streams exactly.

    One policy for every phase when the number of processes changed between save and resume:
    rank 0 continues rank 0's streams, every other process keeps the fresh streams it seeded
    itself (None); the prompts are shared out anew anyway.
    """
    processes, me = world_size(), rank()
    if processes == 1:
        return saved
    state = own_state(saved, me, processes)
    if state is None:
        logging.getLogger("anomaly_rl").warning(
            "resuming on %d processes from a checkpoint written by another number of them", processes
        )
        return saved if me == 0 else None
    return state


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the body first, then the others: for work that fills a shared cache on disk
    (the synthetic dataset, the tiny model, image fingerprints), which the others then only read."""
    if not is_distributed():
        yield
        return
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()
