"""A run folder's progress: which phases are done, the evaluation rows, pausing and resuming."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from anomaly_rl.training.distributed import broadcast_from_zero, is_rank_zero
from anomaly_rl.utils.task import write_json


class RunState:
    """Which phases of a run are finished, and the evaluation rows so far (`state.json`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = {"completed": [], "rows": {}, "seconds": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def done(self, phase: str) -> bool:
        return phase in self.data["completed"]

    def finish(self, phase: str, seconds: float | None = None) -> None:
        if phase not in self.data["completed"]:
            self.data["completed"].append(phase)
        if seconds is not None:
            self.data["seconds"][phase] = seconds
        self._write()

    def add_row(self, name: str, metrics: dict[str, Any]) -> None:
        self.data["rows"][name] = metrics
        self._write()

    def _write(self) -> None:
        # Every process keeps the state in memory (they take the same branches); rank 0 writes it.
        if is_rank_zero():
            write_json(self.path, self.data)


def resolve_run_dir(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """A resumed run continues in its own folder, under the config it was started with."""
    if not cfg.get("resume"):
        return cfg, Path(cfg.paths.output_dir)
    run_dir = Path(cfg.resume).expanduser().resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no config.yaml there — not a run folder of anomaly_rl.train")
    resumed = OmegaConf.load(saved)
    with open_dict(resumed):
        resumed.resume = str(run_dir)
        if cfg.get("pause_after_steps") is not None:
            resumed.pause_after_steps = cfg.pause_after_steps
        else:
            resumed.pause_after_steps = None
    return resumed, run_dir


class Paused(Exception):
    """A phase stopped before its step budget (pause_after_steps): not a failure, resume later."""

    def __init__(self, phase: str, step: int) -> None:
        super().__init__(f"phase {phase} paused at step {step}; continue with resume=<run folder>")


def stopped_early(step: int, max_steps: int, trainer: L.Trainer) -> bool:
    """A pause (not the step budget, not the time budget); rank 0's verdict, so that every process
    takes the same branch (each one's own clock could disagree about the time budget)."""
    return bool(broadcast_from_zero(step < max_steps and not timed_out(trainer)))


def timed_out(trainer: L.Trainer) -> bool:
    """True when the phase ended on its `max_minutes` budget (Lightning's Timer callback)."""
    timers = [c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer)]
    return any((t.time_remaining() or 0.0) <= 0 for t in timers)
