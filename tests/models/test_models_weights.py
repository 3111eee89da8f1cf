"""Trained weights on disk: LoRA as a standard PEFT adapter folder, full fine-tuning (and older LoRA
folders) as weights.pt; both load back, and loading refuses weights that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from transformers import Qwen2_5_VLForConditionalGeneration

from anomaly_rl.checkpoints import weights_folder
from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.weights import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    WEIGHTS_FILE,
    WeightsMismatchError,
    load_policy_weights,
    recorded_model_name,
    save_policy,
    trainable_state_dict,
    weights_format,
)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf" / "model"
WARM_START = REPO / "experiments" / "warm_start" / "tiny_sft"


def model_cfg(preset: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{preset}.yaml")
    cfg.merge_with(OmegaConf.create({"paths": {"cache_dir": "/nonexistent"}}))
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


def lora_cfg(path: Path, **overrides):
    settings = {"path": str(path), "dtype": "float32", "lora": {"r": 4, "alpha": 8}}
    return model_cfg("qwen2_5_vl_3b", **{**settings, **overrides})


def train_a_little(model: torch.nn.Module) -> None:
    """Stand-in for training: every trainable tensor moves (LoRA's B starts at 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_is_saved_as_a_peft_adapter_that_peft_loads(tmp_path: Path, fake_qwen: Path) -> None:
    model, processor = load_model_and_processor(lora_cfg(fake_qwen))
    train_a_little(model)
    folder = save_policy(model, processor, tmp_path / "final")
    assert weights_format(folder) == "adapter"
    assert not (folder / WEIGHTS_FILE).exists()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model_name"] == "qwen2_5_vl_3b" and meta["format"] == "adapter"
    assert meta["base_model"] == str(fake_qwen)

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(fake_qwen), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(folder))
    ours = get_peft_model_state_dict(model)
    theirs = get_peft_model_state_dict(loaded)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2  # A and B, 7 linear layers, 2 layers
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(logits(loaded), logits(model))


def test_adapter_loads_back_into_a_fresh_model(tmp_path: Path, fake_qwen: Path) -> None:
    model, processor = load_model_and_processor(lora_cfg(fake_qwen))
    train_a_little(model)
    save_policy(model, processor, tmp_path / "final")
    fresh, fresh_processor = load_model_and_processor(lora_cfg(fake_qwen))
    before = logits(fresh.eval())
    assert load_policy_weights(fresh, tmp_path / "final", fresh_processor) == 28
    after = logits(fresh)
    torch.testing.assert_close(after, logits(model.eval()))
    assert not torch.allclose(before, after), "the loaded adapter must change the model"


def test_full_finetuning_keeps_weights_pt(tmp_path: Path, small_dir: Path) -> None:
    cfg = model_cfg("tiny", path=str(small_dir), dtype="float32")
    model, processor = load_model_and_processor(cfg)
    train_a_little(model)
    folder = save_policy(model, processor, tmp_path / "final")
    assert weights_format(folder) == "state_dict"
    assert not (folder / ADAPTER_CONFIG_FILE).exists()
    assert json.loads((folder / "meta.json").read_text())["model_name"] == "tiny"
    fresh, fresh_processor = load_model_and_processor(cfg)
    load_policy_weights(fresh, folder, fresh_processor)
    torch.testing.assert_close(logits(fresh.eval()), logits(model.eval()))


def test_lora_weights_pt_of_earlier_runs_still_load(tmp_path: Path, fake_qwen: Path) -> None:
    """LoRA runs saved weights.pt (peft state-dict names) before the adapter format."""
    model, processor = load_model_and_processor(lora_cfg(fake_qwen))
    train_a_little(model)
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(trainable_state_dict(model), folder / WEIGHTS_FILE)
    assert weights_format(folder) == "state_dict" and weights_folder(folder) == folder
    fresh, _ = load_model_and_processor(lora_cfg(fake_qwen))
    load_policy_weights(fresh, folder)
    torch.testing.assert_close(logits(fresh.eval()), logits(model.eval()))


def test_saving_one_format_removes_the_other(tmp_path: Path, fake_qwen: Path) -> None:
    model, processor = load_model_and_processor(lora_cfg(fake_qwen))
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(b"stale")
    save_policy(model, processor, folder)
    assert not (folder / WEIGHTS_FILE).exists() and weights_format(folder) == "adapter"


def test_an_adapter_that_does_not_fit_is_refused(tmp_path: Path, fake_qwen: Path) -> None:
    model, processor = load_model_and_processor(lora_cfg(fake_qwen))
    save_policy(model, processor, tmp_path / "r4")
    other_rank, _ = load_model_and_processor(lora_cfg(fake_qwen, lora={"r": 8, "alpha": 8}))
    with pytest.raises(WeightsMismatchError, match=r"model\.lora\.r=4.*model\.lora\.r=8"):
        load_policy_weights(other_rank, tmp_path / "r4")
    fewer_layers, _ = load_model_and_processor(lora_cfg(fake_qwen, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(WeightsMismatchError, match=r"target_modules"):
        load_policy_weights(fewer_layers, tmp_path / "r4")
    full, _ = load_model_and_processor(lora_cfg(fake_qwen, finetune="full"))
    with pytest.raises(WeightsMismatchError, match=r"not under LoRA \(model\.finetune=full\)"):
        load_policy_weights(full, tmp_path / "r4")


def test_weights_of_another_model_are_named_as_such(tmp_path: Path, fake_qwen: Path, small_dir: Path) -> None:
    """The tiny warm start loaded into a real model: the error says which models, not just
    'another tokenizer' (which read as if the tiny tokenizer had changed)."""
    tiny, tiny_processor = load_model_and_processor(model_cfg("tiny", path=str(small_dir)))
    save_policy(tiny, tiny_processor, tmp_path / "tiny")
    real, real_processor = load_model_and_processor(lora_cfg(fake_qwen))
    with pytest.raises(WeightsMismatchError, match=r"model\.name=tiny.*model\.name=qwen2_5_vl_3b"):
        load_policy_weights(real, tmp_path / "tiny", real_processor)


def test_no_weights_is_a_clear_error(tmp_path: Path, fake_qwen: Path) -> None:
    model, _ = load_model_and_processor(lora_cfg(fake_qwen))
    with pytest.raises(FileNotFoundError, match=rf"no trained weights in {tmp_path}.*{ADAPTER_WEIGHTS_FILE}"):
        load_policy_weights(model, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: tiny}\n")
    with pytest.raises(FileNotFoundError, match=rf"{run}: no trained weights.*resume={run}"):
        weights_folder(run)


def test_the_model_a_checkpoint_was_made_for(tmp_path: Path) -> None:
    assert recorded_model_name(WARM_START) == "tiny"  # from its stage configs (meta.json predates the field)
    assert weights_format(WARM_START) == "state_dict"
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "qwen2_5_vl_7b"}}))
    assert recorded_model_name(run / "final") == "qwen2_5_vl_7b"  # the run folder's config
    (run / "final" / "meta.json").write_text(json.dumps({"model_name": "qwen2_5_vl_3b"}))
    assert recorded_model_name(run / "final") == "qwen2_5_vl_3b"  # meta.json first
    assert recorded_model_name(tmp_path) is None


def test_the_committed_warm_start_loads_into_the_default_tiny_model(tmp_path: Path) -> None:
    """experiments/warm_start/tiny_sft (weights.pt, full fine-tuning) keeps loading, fingerprint checked."""
    cfg = model_cfg("tiny")
    cfg.cache_dir = str(tmp_path)
    model, processor = load_model_and_processor(cfg)
    assert load_policy_weights(model, WARM_START, processor) == len(model.state_dict())
