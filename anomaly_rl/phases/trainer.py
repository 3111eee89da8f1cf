"""One Lightning trainer per phase, from the `trainer`, `logger` and `callbacks` groups."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from anomaly_rl.callbacks import StepCheckpoint
from anomaly_rl.training.distributed import is_distributed
from anomaly_rl.utils.instantiate import instantiate_callbacks, instantiate_loggers
from anomaly_rl.utils.task import job_config

log = logging.getLogger("anomaly_rl")


def phase_trainer(
    cfg: DictConfig,
    run_dir: Path,
    phase: str,
    max_optimizer_steps: int,
    max_minutes: float | None,
    checkpoint_every: int,
) -> tuple[L.Trainer, StepCheckpoint]:
    checkpoint = StepCheckpoint(
        run_dir / "checkpoints" / phase,
        every=checkpoint_every,
        pause_after_steps=cfg.get("pause_after_steps"),
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    hyperparameters = OmegaConf.to_container(job_config(cfg), resolve=True)
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.CSVLogger):
            logger._version = phase  # one CSV folder per phase: each phase's steps start again at 0
        logger.log_hyperparams(hyperparameters)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=max_optimizer_steps,
        max_epochs=-1,
        max_time=lightning_duration(max_minutes) if max_minutes else None,
        logger=loggers or False,
        callbacks=[*instantiate_callbacks(cfg.get("callbacks")), checkpoint],
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    return trainer, checkpoint


def expected_processes(trainer_cfg: DictConfig) -> int | None:
    """The number of training processes the trainer config asks for, None when only Lightning
    knows it ("auto", -1); then the per-process checks run when training starts instead."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices) * nodes if int(devices) > 0 else None
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    return None


def lightning_duration(minutes: float) -> str:
    """Lightning's "DD:HH:MM:SS" (a dict or timedelta would not survive Hydra's instantiate)."""
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days:02d}:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def fit_phase(module: L.LightningModule, trainer: L.Trainer, checkpoint: StepCheckpoint) -> float:
    ckpt_path = str(checkpoint.last) if checkpoint.last.is_file() else None
    if ckpt_path:
        log.info("resuming %s from %s", type(module).__name__, ckpt_path)
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=ckpt_path)
    return time.perf_counter() - start


def start_processes(placement: L.Trainer) -> None:
    """Start the data-parallel processes of `placement`'s strategy now instead of at the first
    `fit`, so that every phase — the evaluation of the start row too — runs in all of them (each
    evaluates its shard).

    Lightning's launcher re-runs this command for the other processes, as `fit` would; a later
    `fit` finds them started and the process group initialised, and starts nothing more.
    """
    if is_distributed():
        return
    strategy = placement.strategy
    if strategy.launcher is not None:
        strategy.launcher.launch(lambda: None)
    strategy.setup_environment()
