"""load_model_and_processor: one code path for the tiny and real checkpoints, LoRA and freezing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel

import anomaly_rl.models.tiny as tiny
from anomaly_rl.models.loading import (
    ModelConfigError,
    ModelWeightsNotFoundError,
    load_model_and_processor,
    resolve_dtype,
)
from anomaly_rl.models.processor import ImageOnlyQwenVLProcessor

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def model_cfg(preset: str, **overrides):
    """The shipped conf/model/<name>.yaml with overrides, as Hydra would hand it over."""
    cfg = OmegaConf.load(CONF / f"{preset}.yaml")
    cfg.merge_with(OmegaConf.create({"paths": {"cache_dir": "/nonexistent"}}))
    cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    return cfg


def lora_modules(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith(".lora_A")]


def test_saved_tiny_loads_as_a_real_model_with_lora(small_dir: Path) -> None:
    cfg = model_cfg("qwen2_5_vl_3b", path=str(small_dir), dtype="float32", lora={"r": 4, "alpha": 8})
    model, processor = load_model_and_processor(cfg)
    assert isinstance(model, PeftModel) and isinstance(processor, ImageOnlyQwenVLProcessor)
    names = lora_modules(model)
    # 2 layers x 7 linear layers, all in the language model: the frozen vision tower has none
    assert len(names) == 14 and all(".language_model." in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    assert next(model.parameters()).dtype == torch.float32


def test_lora_reaches_vision_when_it_is_not_frozen(small_dir: Path) -> None:
    cfg = model_cfg("qwen2_5_vl_3b", path=str(small_dir), dtype="float32", freeze_vision=False)
    model, _ = load_model_and_processor(cfg)
    names = lora_modules(model)
    assert any(".visual." in n for n in names) and not any("lm_head" in n for n in names)


def test_lora_with_named_targets(small_dir: Path) -> None:
    cfg = model_cfg(
        "qwen2_5_vl_3b",
        path=str(small_dir),
        dtype="float32",
        lora={"target_modules": ["q_proj", "gate_proj"]},
    )
    model, _ = load_model_and_processor(cfg)
    names = lora_modules(model)
    assert len(names) == 4 and all(".language_model." in n for n in names)


def test_tiny_default_is_full_finetuning_of_everything(small_dir: Path) -> None:
    model, _ = load_model_and_processor(model_cfg("tiny", path=str(small_dir)))
    assert not isinstance(model, PeftModel)
    assert all(p.requires_grad for p in model.parameters())


def test_tiny_frozen_vision(small_dir: Path) -> None:
    model, _ = load_model_and_processor(model_cfg("tiny", path=str(small_dir), freeze_vision=True))
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_tiny_is_built_into_the_configured_cache(
    tmp_path: Path, small_spec, fallback_corpus, monkeypatch
) -> None:
    monkeypatch.setattr(tiny, "default_corpus", fallback_corpus)
    cfg = model_cfg("tiny", tiny=dict(small_spec.__dict__))
    cfg.paths.cache_dir = str(tmp_path)
    model, processor = load_model_and_processor(cfg)
    (folder,) = (tmp_path / "tiny_models").iterdir()
    assert folder.name.startswith("tiny-") and (folder / "model.safetensors").is_file()
    assert model.config.text_config.hidden_size == small_spec.hidden_size


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(
        ModelWeightsNotFoundError, match=r"huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct"
    ):
        load_model_and_processor(model_cfg("qwen2_5_vl_7b", path=str(tmp_path / "nope")))
    with pytest.raises(ModelWeightsNotFoundError, match="model.path is not set"):
        load_model_and_processor(model_cfg("qwen2_vl_2b"))


def test_wrong_architecture_and_bad_settings(small_dir: Path) -> None:
    with pytest.raises(ModelConfigError, match="qwen2_vl"):
        load_model_and_processor(model_cfg("qwen2_vl_2b", path=str(small_dir)))
    with pytest.raises(ModelConfigError, match="model.name"):
        load_model_and_processor(model_cfg("tiny", name="llava"))
    with pytest.raises(ModelConfigError, match="model.finetune"):
        load_model_and_processor(model_cfg("tiny", path=str(small_dir), finetune="qlora"))
    with pytest.raises(ModelConfigError, match="model.dtype"):
        resolve_dtype("fp8")


def test_pixel_budget_override_and_published_processor_layout(tmp_path: Path, small_dir: Path) -> None:
    """A folder laid out like the published Qwen2.5-VL checkpoints (preprocessor_config.json naming a
    class transformers 5 no longer has, chat_template.json) loads, and image_min/max_pixels apply."""
    folder = tmp_path / "published"
    shutil.copytree(small_dir, folder)
    (folder / "processor_config.json").unlink()
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2_5_VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    cfg = model_cfg(
        "qwen2_5_vl_3b", path=str(folder), dtype="float32", image_min_pixels=200704, image_max_pixels=200704
    )
    _, processor = load_model_and_processor(cfg)
    assert processor.chat_template == template
    ip = processor.image_processor
    assert (ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"]) == (2, 200704, 200704)
