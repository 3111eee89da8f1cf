"""Run-level plumbing shared by the entry points: the task wrapper, loggers, run-folder files."""

from __future__ import annotations

import functools
import json
import logging
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("anomaly_rl")

T = TypeVar("T")


def close_loggers() -> None:
    """Finish any W&B run, so the next job of a multirun starts a fresh one and files are flushed."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:  # wandb is a dependency, but closing must never be the thing that fails
        pass


def task_wrapper(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Always close loggers and write the failure into the run folder before re-raising.

    Hydra's multirun records a failed job and moves on to the next one; writing the traceback
    to `failure.txt` lets the sweep's aggregation tell failed jobs from unfinished ones.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> T:
        try:
            return task(cfg)
        except BaseException as error:
            output_dir = cfg.get("paths", {}).get("output_dir") if isinstance(cfg, DictConfig) else None
            if output_dir:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "failure.txt").write_text(
                    "".join(traceback.format_exception(error)), encoding="utf-8"
                )
            log.exception("Task %s failed: %s", getattr(task, "__name__", "task"), error)
            raise
        finally:
            close_loggers()

    return wrapped


def job_config(cfg: DictConfig) -> DictConfig:
    """The job's own settings, without Hydra's node (present under the compose API), whose
    sweep-only fields cannot resolve outside a multirun."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """The resolved config beside the outputs, so a run folder explains itself."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(job_config(cfg), resolve=True), encoding="utf-8")
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (temp file then rename): an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False), encoding="utf-8")
    tmp.replace(path)
    return path
