"""conf/data/mmad.yaml instantiates read_mmad with MMAD's 1-shot defaults."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import OmegaConf

from anomaly_rl.data.leakage import LeakageSettings
from anomaly_rl.data.mmad import MmadData
from anomaly_rl.evaluation.mmad_runner import split_data_config
from tests.mmad.fixture import build_mmad_fixture

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "data" / "mmad.yaml"


def test_config_instantiates_on_the_fixture(tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONFIG)
    assert cfg.num_references == 1 and cfg.template_source == "random" and cfg.on_error == "raise"
    cfg.root = str(build_mmad_fixture(tmp_path).root)  # the default interpolates paths.data_dir
    cfg.datasets = ["VisA"]
    reader_cfg, leakage = split_data_config(cfg)  # the leakage settings are the runner's, not read_mmad's
    assert leakage == LeakageSettings(check=True, allow=False, tolerance=1.5, cache_dir=None, training_images=None)
    data = hydra.utils.instantiate(reader_cfg)
    assert isinstance(data, MmadData)
    assert len(data.items) == 5 and len(data.samples) == 2
    assert all(len(item.reference_paths) == 1 for item in data.items)
