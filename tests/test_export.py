"""`python -m anomaly_rl.export`: adapter and merged folders that stock transformers / peft load.

Run folders are made here the way `anomaly_rl.train` leaves them (config.yaml beside `final/`
written by `save_policy`), with weights that differ from the base model's, so that an export which
lost them would be caught.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from anomaly_rl.export import ExportError, export
from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.processor import CoordinateFrameImageProcessor, ImageOnlyQwenVLProcessor
from anomaly_rl.models.weights import WEIGHTS_FILE, save_policy, trainable_state_dict
from tests.small_run import compose_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "model"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.qwen_checkpoint import build_fake_qwen2_5_vl

    return build_fake_qwen2_5_vl(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-3B-Instruct")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomaly_rl.models.tiny import TinyModelSpec, tiny_model_dir
    from tests.models.conftest import SMALL, _fallback_corpus

    return tiny_model_dir(TinyModelSpec(**SMALL), tmp_path_factory.mktemp("tiny"), corpus_fn=_fallback_corpus)


def model_cfg(preset: str, **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{preset}.yaml"), OmegaConf.create(overrides))
    cfg.cache_dir = None
    return cfg


def make_run(folder: Path, cfg, legacy: bool = False) -> tuple[torch.nn.Module, object]:
    """A finished run folder whose `final/` holds trained (here: randomly moved) weights."""
    model, processor = load_model_and_processor(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": OmegaConf.to_container(cfg)}))
    if legacy:  # a LoRA run saved before the adapter format
        (folder / "final").mkdir()
        torch.save(trainable_state_dict(model), folder / "final" / WEIGHTS_FILE)
    else:
        save_policy(model, processor, folder / "final")
    return model.eval(), processor


def run_export(tmp_path: Path, *overrides: str) -> dict:
    return export(compose_config("export", tmp_path, tmp_path / "export", list(overrides)))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 19).unsqueeze(0)).logits.float()


def test_adapter_export_copies_the_adapter_and_writes_stock_processor_files(tmp_path: Path, qwen_dir: Path) -> None:
    cfg = model_cfg("qwen2_5_vl_3b", path=str(qwen_dir), dtype="float32", image_max_pixels=200704)
    model, _ = make_run(tmp_path / "run", cfg)
    summary = run_export(tmp_path, f"run={tmp_path / 'run'}")
    adapter = Path(summary["adapter"])
    assert "merged" not in summary and not (tmp_path / "export" / "merged").exists()
    assert (adapter / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "run" / "final" / "adapter_model.safetensors"
    ).read_bytes()
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    torch.testing.assert_close(logits(loaded), logits(model))
    # The processor files carry the run's pixel budget (model.image_max_pixels), in the published layout.
    pre = json.loads((adapter / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor" and pre["processor_class"] == "Qwen2_5_VLProcessor"
    assert pre["max_pixels"] == pre["size"]["longest_edge"] == 200704
    processor = ImageOnlyQwenVLProcessor.from_pretrained(str(adapter))
    assert processor.chat_template == json.loads((qwen_dir / "chat_template.json").read_text())["chat_template"]


def test_merged_export_is_a_model_folder_in_the_checkpoints_dtype(tmp_path: Path, qwen_dir: Path) -> None:
    cfg = model_cfg("qwen2_5_vl_3b", path=str(qwen_dir), dtype="float32")
    model, processor = make_run(tmp_path / "run", cfg)
    summary = run_export(tmp_path, f"run={tmp_path / 'run'}", "merged=true")
    merged = Path(summary["merged"])
    with safe_open(str(merged / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118
        assert not any("lora" in k for k in weights.keys())  # noqa: SIM118
    assert dtypes == {torch.bfloat16}, "the base checkpoint is bfloat16; dtype=null keeps it"
    loaded = AutoModelForImageTextToText.from_pretrained(str(merged), dtype=torch.float32).eval()
    # bf16 storage costs precision, not the adapter: far closer to the trained model than the base is
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    trained, ours, theirs = logits(model), logits(loaded), logits(base)
    assert (ours - trained).abs().max() < 0.2 * (theirs - trained).abs().max()
    ids = processor.tokenizer("Is there a defect?", return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_full_finetuning_run_exports_its_whole_model(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = model_cfg("tiny", path=str(tiny_dir), dtype="float32")
    model, _ = make_run(tmp_path / "run", cfg)
    with pytest.raises(ExportError, match=r"model\.finetune=full.*merged=true"):
        run_export(tmp_path, f"run={tmp_path / 'run'}")
    summary = run_export(tmp_path, f"run={tmp_path / 'run'}", "merged=true")
    merged = Path(summary["merged"])
    assert "adapter" not in summary
    loaded = AutoModelForImageTextToText.from_pretrained(str(merged)).eval()
    torch.testing.assert_close(logits(loaded), logits(model))
    # The tiny model's coordinate frame survives the stock layout for this project's loader.
    processor = ImageOnlyQwenVLProcessor.from_pretrained(str(merged))
    assert isinstance(processor.image_processor, CoordinateFrameImageProcessor)


def test_lora_weights_pt_of_an_earlier_run_becomes_an_adapter(tmp_path: Path, qwen_dir: Path) -> None:
    cfg = model_cfg("qwen2_5_vl_3b", path=str(qwen_dir), dtype="float32", lora={"r": 4, "alpha": 8})
    model, _ = make_run(tmp_path / "run", cfg, legacy=True)
    summary = run_export(tmp_path, f"run={tmp_path / 'run' / 'final'}")  # a weight folder works too
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, summary["adapter"])
    expected = get_peft_model_state_dict(model)
    for key, tensor in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0)


def test_an_export_never_writes_over_another(tmp_path: Path, qwen_dir: Path) -> None:
    make_run(tmp_path / "run", model_cfg("qwen2_5_vl_3b", path=str(qwen_dir), dtype="float32"))
    run_export(tmp_path, f"run={tmp_path / 'run'}")
    with pytest.raises(ExportError, match=r"adapter already holds files"):
        run_export(tmp_path, f"run={tmp_path / 'run'}")


def test_cli_names_the_run_folder_without_trained_weights(tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: tiny}\n")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ANOMALY_RL_ROOT", None)
    done = subprocess.run(
        [sys.executable, "-m", "anomaly_rl.export", f"run={run}", f"paths.root_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    (failure,) = tmp_path.glob("logs/export/runs/*/failure.txt")
    message = failure.read_text()
    assert f"run={run}" in message and "no trained weights" in message and f"resume={run}" in message
