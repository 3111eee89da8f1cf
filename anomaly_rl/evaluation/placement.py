"""Where evaluation runs: on the trainer's accelerator, at its precision, every process a shard.

Lightning moves a module to its device only inside `fit` (and back to the CPU when `fit` ends),
so an evaluation outside `fit` would otherwise run a bf16 multi-billion-parameter model on the
CPU. The trainer config that training uses is the one evaluation reads, so a run evaluates where
it trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig


def placement_trainer(trainer_cfg: DictConfig) -> L.Trainer:
    """A trainer built from `cfg.trainer` only to resolve the device and precision it would use."""
    return hydra.utils.instantiate(
        trainer_cfg,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@contextlib.contextmanager
def on_accelerator(model: torch.nn.Module, trainer: L.Trainer) -> Iterator[torch.device]:
    """Move `model` to the trainer's device (this process's, under DDP) and run the body under the
    trainer's precision (autocast for "bf16-mixed", the dtype context for "bf16-true")."""
    device = trainer.strategy.root_device
    model.to(device)
    with trainer.strategy.precision_plugin.forward_context():
        yield device


def shard(items: list[Any], process: int, processes: int) -> list[Any]:
    """Every `processes`-th item from `process` on: shards of equal size (+-1) that interleave."""
    return items[process::processes]


def unshard(shards: list[list[Any]]) -> list[Any]:
    """The items of `shard(items, r, n)` for r = 0..n-1 back in their original order."""
    total = sum(len(s) for s in shards)
    out: list[Any] = [None] * total
    for process, part in enumerate(shards):
        out[process :: len(shards)] = part
    return out
