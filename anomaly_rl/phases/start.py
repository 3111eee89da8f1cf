"""Where GRPO starts from: the warm start (shipped, trained, or another run's weights) and the
reference the KL is measured against."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from peft import PeftModel

from anomaly_rl.checkpoints import weights_folder
from anomaly_rl.phases.state import RunState
from anomaly_rl.rollout.logprobs import make_reference, needs_reference_copy, reference_context

log = logging.getLogger("anomaly_rl")


def reference_factory(model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The frozen reference: the adapter switched off under LoRA, else a frozen copy of the start."""
    frozen_copy = make_reference(model) if needs_reference_copy(model) else None
    return lambda: reference_context(model, frozen_copy)


def shipped_warm_start(cfg: DictConfig) -> tuple[Path | None, bool]:
    """Where the SFT warm start comes from: (weights to load or None, whether to train it here).

    `warm_start.checkpoint` holds weights trained for one model — the committed one for the tiny
    model. Weights never fit another model (other tokenizer, other shapes), so when the folder
    records (meta.json, or the run config beside it) another `model.name` than this run's, it is not
    loaded, and no warm start is trained either: the `warm_start.*` recipe beside it is sized for
    that model too (1,200 SFT steps at lr 1e-3 for the tiny one). The run's model then starts GRPO
    from its own pretrained weights, as the real-model recipes do.
    """
    # Imported here so that this rule stays in one place of this file.
    from anomaly_rl.models.weights import has_trained_weights, recorded_model_name

    folder = cfg.warm_start.get("checkpoint")
    if not folder:
        return None, True
    folder = Path(folder).expanduser()
    if not has_trained_weights(folder):
        log.warning("warm_start.checkpoint=%s holds no trained weights: training the warm start instead", folder)
        return None, True
    model_name, made_for = str(cfg.model.name), recorded_model_name(folder)
    if made_for is None:
        log.warning(
            "warm_start.checkpoint=%s does not record which model it was trained for: loading it into "
            "model.name=%s (its tokenizer is checked)", folder, model_name,
        )
        return folder, False
    if made_for != model_name:
        log.warning(
            "warm start skipped: warm_start.checkpoint=%s was trained for model.name=%s, this run trains "
            "model.name=%s, whose GRPO starts from its own pretrained weights (warm_start.enabled=false "
            "says so without this warning; warm_start.checkpoint=null trains an SFT warm start here, "
            "sized by warm_start.*)", folder, made_for, model_name,
        )
        return None, False
    return folder, False


def kl_anchor(
    cfg: DictConfig, model: torch.nn.Module, state: RunState, run_dir: Path, init_folder: Path | None
) -> Path | None:
    """The saved adapter to fold into the base weights before GRPO (`model.lora.merge_warm_start`).

    Under LoRA, GRPO's reference is the policy with its adapter switched off: the pretrained model,
    not the warm start. Folding the warm-start adapter into the base weights (and training a fresh
    adapter on top) makes the reference the warm start, as under full fine-tuning.
    """
    if not cfg.model.get("lora", {}).get("merge_warm_start", False):
        return None
    if not isinstance(model, PeftModel):
        log.warning("model.lora.merge_warm_start=true does nothing under model.finetune=full: the reference "
                    "is always a frozen copy of the start of GRPO there")
        return None
    source = run_dir / "sft" if state.done("sft") else init_folder
    if source is None:
        log.info("model.lora.merge_warm_start: no warm start or init_from adapter to fold in")
    return source


def check_init_from(init_from: str | None) -> Path | None:
    if not init_from:
        return None
    try:
        return weights_folder(init_from)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"init_from={init_from}: {error}") from error
