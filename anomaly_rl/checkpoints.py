"""Finding the trained weights of a run folder, for evaluation, prediction, export and `init_from`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.weights import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    WEIGHTS_FILE,
    has_trained_weights,
    load_policy_weights,
)

log = logging.getLogger("anomaly_rl")

WEIGHT_FOLDERS = ("final", "sft")


def weights_folder(run_dir: str | Path) -> Path:
    """The folder holding a run's last trained weights: `final/`, else `sft/`, else the folder itself.

    Either weight format counts (a PEFT adapter folder or weights.pt, see models/weights.py).
    """
    folder = Path(run_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    for sub in WEIGHT_FOLDERS:
        if has_trained_weights(folder / sub):
            return folder / sub
    if has_trained_weights(folder):
        return folder
    hint = "give the folder of an anomaly_rl.train run"
    if (folder / "config.yaml").is_file():
        # A run folder whose phases never finished (it failed or was paused before the first one).
        hint = f"the run in {folder} has not finished a training phase yet; continue it with resume={folder}"
    raise FileNotFoundError(
        f"{folder}: no trained weights (looked in final/, sft/ and the folder itself for "
        f"{ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE} or {WEIGHTS_FILE}); {hint}"
    )


def run_config_path(run_dir: str | Path) -> Path | None:
    """The config.yaml of the run `run_dir` belongs to: its own, or its run folder's when `run_dir`
    is one of the run's weight folders (`final/`, `sft/`)."""
    folder = Path(run_dir).expanduser()
    for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def run_config(run_dir: str | Path) -> DictConfig | None:
    """The resolved config a run was trained with (its config.yaml), or None for a bare weights folder."""
    saved = run_config_path(run_dir)
    return OmegaConf.load(saved) if saved is not None else None


def run_model_config(run_dir: str | Path, fallback: DictConfig) -> DictConfig:
    """The `model` config a run was trained with, so its weights load into the same architecture."""
    saved = run_config(run_dir)
    return saved.model if saved is not None and "model" in saved else fallback


DEFAULT_MAX_NEW_TOKENS = 64
"""The tiny default's evaluation length: used when neither the user nor a run sets one."""


def run_prompt_settings(
    ckpt: str | Path | None, model_cfg: DictConfig, schema_cfg: DictConfig, max_new_tokens: int | None
) -> tuple[DictConfig, DictConfig, int]:
    """What `evaluate` and `predict` ask a run's weights with: with `ckpt`, the run's model (so its
    weights fit) and prompt wording (`schema`: the same weights asked in another wording answer
    worse) and, unless `max_new_tokens` is set, its evaluation length (512 in the real recipes; a
    shorter budget cuts answers off). Without `ckpt`, the configured ones."""
    run = run_config(ckpt) if ckpt else None
    trained_length = OmegaConf.select(run, "eval.max_new_tokens") if run is not None else None
    if max_new_tokens is None:
        max_new_tokens = int(trained_length) if trained_length is not None else DEFAULT_MAX_NEW_TOKENS
    if run is not None:
        model_cfg = run.model if "model" in run else model_cfg
        schema_cfg = run.schema if "schema" in run else schema_cfg
    return model_cfg, schema_cfg, int(max_new_tokens)


def load_trained_policy(model_cfg: DictConfig, ckpt: str | Path | None) -> tuple[Any, Any]:
    """The model and processor of `model_cfg`, with a run's trained weights when `ckpt` is given.

    The weights are checked against the processor's tokenizer, as `init_from` does in training.
    """
    if ckpt:
        folder = weights_folder(ckpt)  # before the model is built: a wrong folder fails at once
    model, processor = load_model_and_processor(model_cfg)
    if ckpt:
        log.info("loaded %d tensors from %s", load_policy_weights(model, folder, processor), folder)
    return model, processor
