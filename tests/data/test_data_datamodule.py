from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf

from anomaly_rl.data.datamodule import AnomalyDataModule, PromptBatch, load_prompt_batch
from anomaly_rl.data.errors import DataError
from anomaly_rl.training.batches import ResumableBatches

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def compose(name: str, **overrides: object):
    """The data node as the lead's root config would give it, built without that root config."""
    cfg = OmegaConf.merge({"paths": {"data_dir": "/nonexistent"}}, {"data": OmegaConf.load(CONF / f"{name}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"data.{key}", value, force_add=True)
    return cfg


def synthetic_module(root: Path, config, **overrides: object) -> AnomalyDataModule:
    cfg = compose("synthetic", root=str(root), synthetic=config.to_dict(), **overrides)
    return instantiate(cfg.data)


def test_configs_compose_and_name_every_knob() -> None:
    for name in ("synthetic", "mvtec", "visa"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg._target_ == "anomaly_rl.data.datamodule.AnomalyDataModule"
        assert set(cfg.boxes) == {"dilation", "min_area"}
    assert OmegaConf.is_missing(OmegaConf.load(CONF / "mvtec.yaml"), "root")
    assert compose("synthetic").data.root == "/nonexistent/synthetic"


def test_batches(tiny_synthetic: Path, tiny_synthetic_config) -> None:
    """Training batches are drawn by ResumableBatches from the datamodule's samples and loaded by
    its own loader; evaluation reads the splits in order."""
    dm = synthetic_module(tiny_synthetic, tiny_synthetic_config, num_references=2, val_size=2,
                          train_anomalous_fraction=0.5)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.val_samples) == 8 and len(dm.skipped) == 0
    assert Counter(s.label for s in dm.train_samples) == {"normal": 16, "anomalous": 16}
    batches = ResumableBatches(dm.train_samples, 3, 0, load_prompt_batch)
    batch = next(iter(batches))
    assert isinstance(batch, PromptBatch) and len(batch) == 3
    for sample, image, refs in zip(batch.samples, batch.images, batch.references, strict=True):
        assert image.mode == "RGB" and image.size == sample.image_size == (64, 64)
        assert len(refs) == 2 and all(r.mode == "RGB" for r in refs)
    assert move_data_to_device(batch, "cpu") is batch  # Lightning's transfer leaves it alone


def test_splits_are_seeded(tiny_synthetic: Path, tiny_synthetic_config) -> None:
    def validation(seed: int) -> list[str]:
        dm = synthetic_module(tiny_synthetic, tiny_synthetic_config, seed=seed, val_size=2)
        dm.setup()
        return [s.image_path for s in dm.val_samples]

    assert validation(0) == validation(0) and validation(0) != validation(1)


def test_generates_when_root_is_missing(tmp_path: Path, tiny_synthetic_config) -> None:
    small = type(tiny_synthetic_config).from_mapping({**tiny_synthetic_config.to_dict(), "categories": ["pill"]})
    dm = synthetic_module(tmp_path / "fresh", small, val_size=0)
    dm.prepare_data()
    dm.setup()
    assert json.loads((tmp_path / "fresh" / "meta.json").read_text())["config"]["categories"] == ["pill"]
    assert {s.category for s in dm.test_samples} == {"pill"}


def test_real_sample_few_shot(mvtec_sample: Path) -> None:
    dm = instantiate(compose("mvtec", root=str(mvtec_sample), shots=2, num_references=1).data)
    dm.setup()
    assert Counter((s.category, s.label) for s in dm.train_samples) == {
        ("bottle", "normal"): 2, ("bottle", "anomalous"): 2, ("grid", "normal"): 2, ("grid", "anomalous"): 2}
    assert len(dm.test_samples) == 5 + 18 - 2 + 3 + 11 - 2
    batch = load_prompt_batch(dm.train_samples[:4])
    assert all(image.size == s.image_size and image.mode == "RGB" for s, image in zip(batch.samples, batch.images,
                                                                                      strict=True))


def test_bad_settings() -> None:
    with pytest.raises(DataError, match="unknown data.reader 'coco'"):
        AnomalyDataModule(reader="coco", root="x")
    with pytest.raises(DataError, match="on_error"):
        AnomalyDataModule(reader="mvtec", root="x", on_error="maybe")
    with pytest.raises(DataError, match="synthetic.image_size"):
        AnomalyDataModule(reader="synthetic", root="x", synthetic={"image_size": 4})
    with pytest.raises(DataError, match="reader_options"):
        AnomalyDataModule(reader="mvtec", root=Path(__file__).parent, reader_options={"colour": 1}).setup()
