"""Every experiment composes, and its data module, model config and trainer instantiate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from anomaly_rl.utils.task import job_config

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_train(tmp_path: Path, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        # Real-data recipes leave the dataset location to the user (`data.root: ???`).
        if OmegaConf.is_missing(cfg.data, "root"):
            cfg.data.root = str(tmp_path / "dataset")
    return cfg


def test_there_are_experiments() -> None:
    assert EXPERIMENTS, "conf/experiment/ holds no experiment"


def test_default_composes_and_instantiates(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [])
    assert cfg.algo.name == "grpo" and cfg.warm_start.name == "sft"
    assert cfg.schema._target_ and cfg.reward._target_
    datamodule = hydra.utils.instantiate(cfg.data)
    assert hasattr(datamodule, "setup")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], max_steps=1)
    assert trainer.max_steps == 1


def instantiate_trainer(cfg: DictConfig) -> Any:
    """GPU recipes are instantiated on this CPU machine with only the device settings swapped."""
    on_cpu = {}
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        on_cpu = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
    return hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], max_steps=1, **on_cpu)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(tmp_path: Path, experiment: str) -> None:
    cfg = compose_train(tmp_path, [f"+experiment={experiment}"])
    # Every interpolation resolves (the run folder's config.yaml is written resolved).
    OmegaConf.to_container(job_config(cfg), resolve=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    assert hasattr(datamodule, "setup")
    assert cfg.model.name
    schema = hydra.utils.instantiate(cfg.schema)
    reward = hydra.utils.instantiate(cfg.reward)
    assert schema.tags and callable(reward)
    assert instantiate_trainer(cfg).max_steps == 1


@pytest.mark.parametrize(
    "overrides",
    [["schema=r1", "reward=binary"], ["schema=direct", "reward=roam"], ["reward=iou"], ["logger=wandb"]],
)
def test_group_switches_compose(tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose_train(tmp_path, overrides)
    hydra.utils.instantiate(cfg.schema)
    hydra.utils.instantiate(cfg.reward)


def test_eval_config_composes(tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[], return_hydra_config=True)
    assert cfg.task_name == "evaluate"


@pytest.mark.parametrize("experiment", ["visa_fewshot", "mvtec_fewshot", "mmad_1shot"])
def test_real_recipes_without_paths_stop_with_what_to_set(tmp_path: Path, experiment: str) -> None:
    from anomaly_rl.train import MissingSettingError, preflight

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}"])
    with pytest.raises(MissingSettingError, match=r"model\.path=.*data\.root="):
        preflight(cfg)


def test_a_failed_multirun_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    """Both jobs fail fast (no model.path); the second must still run and leave its failure.txt."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "anomaly_rl.train", "-m", "model=qwen2_5_vl_3b,qwen2_vl_2b",
         f"paths.root_dir={tmp_path}"],
        cwd=CONF.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0  # the sweep reports its failures
    failures = sorted(tmp_path.glob("logs/train/multiruns/*/*/failure.txt"))
    assert [f.parent.name for f in failures] == ["0", "1"], done.stderr[-2000:]
    assert "model.path" in failures[1].read_text()
