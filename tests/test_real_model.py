"""A user with a downloaded Qwen2.5-VL: train, evaluate, predict and export, end to end on CPU.

The checkpoint is a small random Qwen2.5-VL laid out like the published Qwen2.5-VL-3B-Instruct
folder (tests/models/qwen_checkpoint.py). The run uses the README's form, `model=qwen2_5_vl_3b
model.path=<folder>`, with the default warm start setting, which names the tiny model's committed
checkpoint: it must be skipped, not loaded (it used to fail with a misleading tokenizer error, or,
where it was absent, train 1,200 tiny-recipe SFT steps on the real model).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.small_run import SMALL_DATA, compose_config

REPO = Path(__file__).resolve().parents[1]
WARM_START = REPO / "experiments" / "warm_start" / "tiny_sft"
TOKENS = 12

RUN = [
    "model=qwen2_5_vl_3b",
    "model.image_max_pixels=3136",  # 56 x 56: 4 x 4 patches of 14 px, 2 x 2 image tokens
    *SMALL_DATA,
    "logger=none",
    "callbacks=none",
    "algo.prompts_per_step=2",
    "algo.group_size=2",
    "algo.max_new_tokens=24",
    "algo.max_steps=2",
    "algo.checkpoint_every=1",
    "eval.limit=2",
    "eval.batch_size=1",
    f"eval.max_new_tokens={TOKENS}",
    "control.enabled=false",
    f"warm_start.checkpoint={WARM_START}",
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models.qwen_checkpoint import build_fake_qwen2_5_vl

    return build_fake_qwen2_5_vl(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-3B-Instruct")


def stock_processor(folder: Path) -> Any:
    """`AutoProcessor.from_pretrained(folder)` where it can run. In transformers 5 it also builds
    Qwen's video processor, which needs torchvision (not installed in this project, and the stock
    processor class cannot be built without it); then the parts are loaded by the stock auto
    classes and put together by this project's image-only subclass of the stock processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from anomaly_rl.models.processor import ImageOnlyQwenVLProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (3136, 3136)
    assert json.loads((folder / "preprocessor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    return ImageOnlyQwenVLProcessor(image_processor, tokenizer, chat_template=template)


def give_the_adapter_trained_weights(final: Path) -> dict[str, torch.Tensor]:
    """A random model earns no reward, so its GRPO steps leave LoRA's B at 0 and the adapter
    would be indistinguishable from none: write random B so that a loader that dropped the
    adapter, or an export that lost it, changes the answers checked below."""
    path = final / "adapter_model.safetensors"
    state = load_file(str(path))
    generator = torch.Generator().manual_seed(0)
    for key, tensor in state.items():
        if "lora_B" in key:
            assert torch.count_nonzero(tensor) == 0, "an untrained LoRA B is zero"
            state[key] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(state, str(path), metadata={"format": "pt"})
    return state


def test_a_real_checkpoint_trains_evaluates_predicts_and_exports(
    tmp_path: Path, qwen_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import Qwen2_5_VLForConditionalGeneration

    from anomaly_rl.evaluate import evaluate
    from anomaly_rl.export import export
    from anomaly_rl.models.processing import never_sampled_token_ids, stop_token_ids
    from anomaly_rl.predict import predict
    from anomaly_rl.train import train

    torch.set_num_threads(1)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="anomaly_rl"):
        results = train(compose_config("train", tmp_path, run, [*RUN, f"model.path={qwen_dir}"]))
    assert "warm start skipped" in caplog.text and "model.name=tiny" in caplog.text
    assert not (run / "sft").exists(), "the tiny warm start was loaded into (or trained on) the real model"
    assert set(results["rows"]) >= {"start", "grpo"}
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "weights.pt").exists()
    assert json.loads((final / "meta.json").read_text())["model_name"] == "qwen2_5_vl_3b"
    trained = give_the_adapter_trained_weights(final)

    # evaluate ckpt=<run>: the run's own model config, the adapter on top
    evaluate(compose_config("eval", tmp_path, tmp_path / "eval", [
        *SMALL_DATA, f"ckpt={run}", "eval.limit=2", "eval.batch_size=1", f"eval.max_new_tokens={TOKENS}",
    ]))
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    first = predictions[0]
    untrained = [json.loads(line) for line in (run / "eval_start" / "predictions.jsonl").read_text().splitlines()]
    assert [p["image_path"] for p in untrained] == [p["image_path"] for p in predictions]
    assert [p["response"] for p in untrained] != [p["response"] for p in predictions], "the adapter was not loaded"

    # predict on the same image and category: the same prompt, so the same greedy answer
    result = predict(compose_config("predict", tmp_path, tmp_path / "predict", [
        f"ckpt={run}", f"image={first['image_path']}", f"category={first['category']}", f"max_new_tokens={TOKENS}",
    ]))
    assert result["response"] == first["response"]

    out = tmp_path / "export"
    export(compose_config("export", tmp_path, out, [f"run={run}", "merged=true", "dtype=float32"]))

    # The adapter folder: standard PEFT, holding exactly the run's adapter.
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == trained.keys()
    for key, tensor in trained.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)

    # The merged folder: stock transformers loads it and greedily writes what our evaluation wrote.
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "merged")).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    processor = stock_processor(out / "merged")
    schema_messages = _messages(run, first, processor)
    text = processor.apply_chat_template(schema_messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(first["image_path"]).convert("RGB")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    stop = stop_token_ids(processor)
    with torch.no_grad():
        generated = merged.generate(
            **inputs, max_new_tokens=TOKENS, do_sample=False, repetition_penalty=1.0, eos_token_id=stop,
            # the tokens our sampler never writes (special tokens, embedding rows past the tokenizer)
            suppress_tokens=never_sampled_token_ids(processor, merged.config.text_config.vocab_size, stop),
        )
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == first["response"]
    assert json.loads((out / "export.json").read_text())["merged"] == str(out / "merged")


def _messages(run: Path, prediction: dict[str, Any], processor: Any) -> list[dict[str, Any]]:
    """The evaluation's chat for `prediction`'s image, written by the run's schema."""
    import hydra
    from omegaconf import OmegaConf

    from anomaly_rl.data.records import Sample
    from anomaly_rl.models.processing import model_input_size

    schema = hydra.utils.instantiate(OmegaConf.load(run / "config.yaml").schema)
    size = tuple(prediction["image_size"])
    sample = Sample(
        image_path=prediction["image_path"], label=prediction["label"], category=prediction["category"],
        defect_type=prediction["defect_type"], mask_path=None, boxes=(), image_size=size, split="test",
    )
    return schema.messages(sample, model_input_size(processor, size), num_references=0)
