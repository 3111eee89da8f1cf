"""Turning config groups into objects at the entry points (configs never travel further down)."""

from __future__ import annotations

from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    if not callbacks_cfg:
        return []
    return [hydra.utils.instantiate(c) for c in callbacks_cfg.values() if c and "_target_" in c]


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    if not logger_cfg:
        return []
    return [hydra.utils.instantiate(c) for c in logger_cfg.values() if c and "_target_" in c]


def instantiate_optimizer(optimizer_cfg: DictConfig, params: Any) -> Any:
    """`_partial_: true` optimiser configs become an optimiser over `params`."""
    return hydra.utils.instantiate(optimizer_cfg)(params)
