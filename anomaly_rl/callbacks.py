"""Lightning callbacks for checkpointing what a crash or a Ctrl-C would otherwise lose."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer

from anomaly_rl.training.errors import NonFiniteWeightsError

log = logging.getLogger("anomaly_rl")


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity (frozen ones cannot change)."""
    return [
        name
        for name, parameter in module.named_parameters()
        if parameter.requires_grad and not bool(torch.isfinite(parameter.detach()).all())
    ]


class StepCheckpoint(L.Callback):
    """Save `last.ckpt` every `every` optimiser steps, at a pause, and on Ctrl-C.

    Written to a temporary name and renamed, so a crash while saving leaves the previous good
    checkpoint intact (the file a NaN-loss stop or a resume relies on).
    """

    def __init__(self, dirpath: str | Path, every: int, pause_after_steps: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.every = max(1, int(every))
        self.pause_after_steps = pause_after_steps
        self._steps_this_invocation = 0

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def save(self, trainer: L.Trainer) -> None:
        # The optimiser guard stops a run before a non-finite update; this is the last line of
        # defence for the file a resume relies on (weights changed outside the optimiser, say).
        broken = non_finite_parameters(trainer.lightning_module)
        if broken:
            raise NonFiniteWeightsError(
                f"not writing {self.last}: {len(broken)} trainable tensors hold NaN/inf "
                f"(first: {broken[0]}); the previous checkpoint is kept"
            )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / "last.ckpt.tmp"
        trainer.save_checkpoint(tmp)  # every process calls it; only rank 0 writes the file
        if trainer.is_global_zero:
            tmp.replace(self.last)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._steps_this_invocation += 1
        if self.pause_after_steps and self._steps_this_invocation >= self.pause_after_steps:
            self.save(trainer)
            log.info("pausing after %d steps; continue with resume=<run folder>", self._steps_this_invocation)
            trainer.should_stop = True
        elif self._steps_this_invocation % self.every == 0:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.save(trainer)
            log.warning("interrupted: checkpoint saved to %s", self.last)


UNBOUNDED_STEPS = 10**9
"""The step budget of a phase bounded by time alone (the SFT control): no bar should count to it."""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class PhaseProgressBar(RichProgressBar):
    """Rich's bar, plus the elapsed and remaining time of a phase with a time budget (`max_minutes`).

    A phase bounded by time alone shows its step count without a total ("408/--"), instead of a
    count towards a step limit it will never reach and an ETA of thousands of days.
    """

    def _timer(self) -> Timer | None:
        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer) and c._duration is not None]
        return timers[0] if timers else None

    @property
    def total_train_batches(self) -> int | float:
        if self._timer() is not None and (self.trainer.max_steps or 0) >= UNBOUNDED_STEPS:
            return float("inf")
        return super().total_train_batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        timer = self._timer()
        if timer is not None:
            metrics["elapsed"] = _clock(timer.time_elapsed("train"))
            metrics["left"] = _clock(timer.time_remaining("train") or 0.0)
        return metrics
