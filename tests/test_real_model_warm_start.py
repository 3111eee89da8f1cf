"""The committed tiny warm start belongs to the tiny model: `shipped_warm_start` loads a warm-start
checkpoint only into the model it records, and says what it does otherwise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from anomaly_rl.phases.start import shipped_warm_start

REPO = Path(__file__).resolve().parents[1]
WARM_START = REPO / "experiments" / "warm_start" / "tiny_sft"


def train_cfg(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_tiny_model_loads_the_committed_warm_start() -> None:
    assert shipped_warm_start(train_cfg(f"warm_start.checkpoint={WARM_START}")) == (WARM_START, False)


@pytest.mark.parametrize("model", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_vl_2b"])
def test_a_real_model_neither_loads_nor_trains_the_tiny_warm_start(
    model: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = train_cfg(f"model={model}", f"warm_start.checkpoint={WARM_START}")
    with caplog.at_level(logging.WARNING, logger="anomaly_rl"):
        assert shipped_warm_start(cfg) == (None, False)
    assert f"trained for model.name=tiny, this run trains model.name={model}" in caplog.text


def test_a_warm_start_of_the_runs_own_model_is_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"model_name": "qwen2_5_vl_3b"}))
    cfg = train_cfg("model=qwen2_5_vl_3b", f"warm_start.checkpoint={folder}")
    assert shipped_warm_start(cfg) == (folder, False)


def test_an_unrecorded_checkpoint_is_loaded_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "weights.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="anomaly_rl"):
        assert shipped_warm_start(train_cfg(f"warm_start.checkpoint={tmp_path}")) == (tmp_path, False)
    assert "does not record which model" in caplog.text


def test_no_checkpoint_trains_the_warm_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert shipped_warm_start(train_cfg("warm_start.checkpoint=null")) == (None, True)
    with caplog.at_level(logging.WARNING, logger="anomaly_rl"):
        assert shipped_warm_start(train_cfg(f"warm_start.checkpoint={tmp_path}")) == (None, True)
    assert "holds no trained weights" in caplog.text


def test_a_wrong_model_folder_fails_before_the_data_is_read(tmp_path: Path) -> None:
    from anomaly_rl.models.loading import ModelWeightsNotFoundError
    from anomaly_rl.phases.settings import preflight
    from tests.small_run import compose_config

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    cfg = compose_config("train", tmp_path / "root", tmp_path / "run",
                         ["model=qwen2_5_vl_3b", f"model.path={empty}", "sizes=paper"])
    with pytest.raises(ModelWeightsNotFoundError, match="no config.json"):
        preflight(cfg)
    assert not (tmp_path / "root" / "data").exists()
