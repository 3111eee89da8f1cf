"""Every experiment composes, and its data module, model config and trainer instantiate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
import yaml
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
    from anomaly_rl.phases.settings import MissingSettingError, preflight

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


# ---------------------------------------------------------------- real-model recipes (issue 17)
REAL_RECIPES = ["paper_adfm", "paper_adfm_3b", "mvtec_fewshot", "visa_fewshot", "mmad_1shot"]
TINY_ALGO = yaml.safe_load((CONF / "sizes" / "tiny_cpu.yaml").read_text())["algo"]  # the embedded default's sizes


def flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("experiment", REAL_RECIPES)
def test_real_recipes_state_the_papers_settings(tmp_path: Path, experiment: str) -> None:
    cfg = compose_train(tmp_path, [f"+experiment={experiment}"])
    algo, model = cfg.algo, cfg.model
    assert (algo.group_size, algo.temperature, algo.top_p, algo.beta) == (6, 0.9, 1.0, 0.04)
    assert (algo.eps_low, algo.eps_high, algo.loss_type, algo.num_iterations) == (0.2, 0.2, "grpo", 1)
    assert algo.max_new_tokens == 512 and cfg.eval.max_new_tokens == 512
    assert algo.optimizer.lr == 1.0e-5 and algo.lr_schedule == "cosine" and algo.min_lr_ratio == 0.0
    assert 0 < algo.warmup_steps < algo.max_steps
    assert model.name.startswith("qwen2_5_vl_") and model.finetune == "lora" and model.freeze_vision
    assert (model.lora.r, model.lora.alpha, model.lora.target_modules) == (64, 128, "all-linear")
    assert model.image_max_pixels == 512 * 512
    assert cfg.schema.style == "instruction" and cfg.trainer.precision == "bf16-mixed"
    # No tiny warm start, no SFT control of the tiny default.
    assert not cfg.warm_start.enabled and not cfg.control.enabled
    assert cfg.hydra.runtime.choices.sizes == "paper"
    # Every value conf/sizes/tiny_cpu.yaml's `algo` block sets for the tiny CPU default is restated.
    tiny = flat(TINY_ALGO)
    ours = flat(OmegaConf.to_container(algo, resolve=True))
    inherited = [k for k, v in tiny.items() if k != "train_vision" and ours[k] == v]
    assert not inherited, f"{experiment} inherits the tiny default's {inherited}"
    # ... and the training loop accepts every setting as written.
    from anomaly_rl.phases.settings import check_settings

    settings, warm_start = check_settings(cfg, int(hydra.utils.instantiate(cfg.schema).min_new_tokens), 1)
    assert settings.max_new_tokens == 512 and warm_start is None


def test_paper_adfm_is_the_released_7b_setting_and_its_3b_twin_differs_only_in_the_model(tmp_path: Path) -> None:
    paper = compose_train(tmp_path, ["+experiment=paper_adfm"])
    twin = compose_train(tmp_path, ["+experiment=paper_adfm_3b"])
    assert paper.model.name == "qwen2_5_vl_7b" and twin.model.name == "qwen2_5_vl_3b"
    assert paper.algo.prompts_per_step == 50 and paper.data.num_references == 1
    assert paper.algo.max_steps == 72  # 15 epochs of 240 few-shot images at 50 prompts a step
    for key in ("algo", "data", "schema", "reward", "trainer", "warm_start", "control", "eval"):
        assert OmegaConf.to_container(paper[key], resolve=True) == OmegaConf.to_container(twin[key], resolve=True), key
    differ = {k for k in paper.model if paper.model[k] != twin.model[k]}
    assert differ == {"name", "hf_repo"}


@pytest.mark.parametrize(("experiment", "references"), [("mvtec_fewshot", 0), ("visa_fewshot", 0), ("mmad_1shot", 1)])
def test_few_shot_recipes_references_and_data(tmp_path: Path, experiment: str, references: int) -> None:
    cfg = compose_train(tmp_path, [f"+experiment={experiment}"])
    assert cfg.model.name == "qwen2_5_vl_3b" and cfg.algo.prompts_per_step == 6
    assert cfg.data.num_references == references and cfg.data.shots == 8
    assert cfg.data.reader == ("visa" if experiment == "visa_fewshot" else "mvtec")
    assert hydra.utils.instantiate(cfg.data).num_references == references


def test_tiny_sizes_belong_to_the_default_only(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, [])
    assert cfg.model.name == "tiny"
    assert (cfg.algo.lr_schedule, cfg.algo.max_new_tokens, cfg.algo.max_steps) == ("constant", 64, 120)
    assert (cfg.algo.warmup_steps, cfg.algo.optimizer.lr, cfg.algo.prompts_per_step) == (5, 5.0e-5, 8)
    assert cfg.warm_start.enabled and cfg.control.enabled
    assert cfg.warm_start.checkpoint.endswith("experiments/warm_start/tiny_sft")


@pytest.mark.parametrize("experiment", ["paper_adfm", "paper_adfm_3b"])
def test_paper_recipes_without_paths_stop_with_what_to_set(tmp_path: Path, experiment: str) -> None:
    from anomaly_rl.phases.settings import MissingSettingError, preflight

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}"])
    with pytest.raises(MissingSettingError, match=r"model\.path=.*Qwen2\.5-VL-.B-Instruct.*data\.root="):
        preflight(cfg)


def test_export_config_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("export", overrides=["run=/some/run"], return_hydra_config=True)
    assert cfg.task_name == "export" and cfg.run == "/some/run" and cfg.merged is False
    assert cfg.dtype is None and cfg.model_path is None
