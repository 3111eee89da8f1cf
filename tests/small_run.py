"""A model and dataset small enough for end-to-end tests, and composing configs around them.

56 px images (16 image tokens), one LM layer, a handful of synthetic images: every entry point
runs in seconds. Shared by the pipeline, evaluation, W&B and MMAD tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"

SMALL_MODEL = [
    "model.tiny.image_size=56",
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.vision_hidden_size=32",
    "model.tiny.vision_depth=1",
    "model.tiny.vision_heads=2",
    "model.tiny.bpe_vocab_size=400",
]
SMALL_DATA = [
    "data.synthetic.image_size=56",
    "data.synthetic.categories=[metal,pill]",
    "data.synthetic.train_good=6",
    "data.synthetic.test_good=2",
    "data.synthetic.test_anomalous=6",
    "data.synthetic.defect_size=[8,20]",
    "data.val_size=0",
]
SMALL = [
    *SMALL_MODEL,
    *SMALL_DATA,
    "logger=none",
    "callbacks=none",
    "algo.prompts_per_step=2",
    "algo.group_size=3",
    "algo.max_new_tokens=24",
    "algo.checkpoint_every=1",
    "warm_start.batch_size=4",
    "warm_start.max_steps=2",
    "warm_start.checkpoint=null",
    "control.enabled=false",
    "eval.limit=4",
    "eval.max_new_tokens=24",
]


def compose_config(name: str, root: Path, out_dir: Path, overrides: list[str]) -> DictConfig:
    """Compose `conf/<name>.yaml` as Hydra would, with every path of the run under `root`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.data_dir = str(root / "data")
        cfg.paths.cache_dir = str(root / "cache")
        cfg.paths.output_dir = str(out_dir)
    return cfg


def compose_small_run(tmp_path: Path, run: str, overrides: list[str]) -> DictConfig:
    """The train config of a small run in `tmp_path/run`; data and model caches shared across tests."""
    return compose_config("train", tmp_path.parent / "shared", tmp_path / run, [*SMALL, *overrides])


def algo_settings(name: str = "grpo", optimizer: Any = None, **overrides: Any) -> Any:
    """`conf/algo/<name>.yaml` instantiated with `overrides` (nested dicts for nested keys), the
    way the training entry point does; `optimizer` replaces the configured optimiser factory."""
    node = OmegaConf.merge(OmegaConf.load(CONF / "algo" / f"{name}.yaml"), overrides)
    settings = hydra.utils.instantiate(node)
    return dataclasses.replace(settings, optimizer=optimizer) if optimizer is not None else settings
