"""Finding the trained weights of a run folder, for evaluation, prediction and `init_from`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.weights import load_policy_weights

log = logging.getLogger("anomaly_rl")

WEIGHT_FOLDERS = ("final", "sft")


def weights_folder(run_dir: str | Path) -> Path:
    """The folder holding a run's last trained weights: `final/`, else `sft/`, else the folder itself."""
    folder = Path(run_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    for sub in WEIGHT_FOLDERS:
        if (folder / sub / "weights.pt").is_file():
            return folder / sub
    if (folder / "weights.pt").is_file():
        return folder
    raise FileNotFoundError(
        f"{folder}: no trained weights (looked for final/weights.pt, sft/weights.pt and weights.pt); "
        "give the folder of an anomaly_rl.train run"
    )


def run_model_config(run_dir: str | Path, fallback: DictConfig) -> DictConfig:
    """The `model` config a run was trained with, so its weights load into the same architecture."""
    saved = Path(run_dir).expanduser() / "config.yaml"
    if saved.is_file():
        return OmegaConf.load(saved).model
    return fallback


def load_trained_policy(model_cfg: DictConfig, ckpt: str | Path | None) -> tuple[Any, Any]:
    """The model and processor of `model_cfg`, with a run's trained weights when `ckpt` is given.

    The weights are checked against the processor's tokenizer, as `init_from` does in training.
    """
    model, processor = load_model_and_processor(model_cfg)
    if ckpt:
        folder = weights_folder(ckpt)
        log.info("loaded %d tensors from %s", load_policy_weights(model, folder, processor), folder)
    return model, processor
