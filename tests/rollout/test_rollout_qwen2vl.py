"""The Qwen2-VL architecture (model.name=qwen2_vl_2b) goes through the same loading, sampling and scoring."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from anomaly_rl.models.processing import encode_prompts, never_sampled_token_ids, stop_token_ids
from anomaly_rl.models.processor import ImageOnlyQwenVLProcessor, fixed_size_image_processor
from anomaly_rl.rollout.logprobs import completion_logprobs
from anomaly_rl.rollout.transformers_backend import sample


def save_tiny_qwen2vl(folder: Path, template_dir: Path) -> None:
    """A random 2-layer Qwen2-VL (merge 2, as the real one) with the tiny tokenizer."""
    tiny = ImageOnlyQwenVLProcessor.from_pretrained(str(template_dir))
    tok = tiny.tokenizer
    processor = ImageOnlyQwenVLProcessor(
        image_processor=fixed_size_image_processor(112, patch_size=14, merge_size=2),
        tokenizer=tok,
        chat_template=tiny.chat_template,
    )
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 64,
            "num_heads": 2,
            "spatial_merge_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_qwen2vl_lora_sampling_and_scoring(tmp_path: Path, rollout_dir: Path, helpers) -> None:
    save_tiny_qwen2vl(tmp_path, rollout_dir)
    model, processor = helpers.load(
        tmp_path, name="qwen2_vl_2b", finetune="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}
    )
    model.eval()
    assert type(model.get_base_model()).__name__ == "Qwen2VLForConditionalGeneration"
    lora = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(lora) == 14 and all(".language_model." in n for n in lora)
    texts = [helpers.chat(processor, "Defect?"), helpers.chat(processor, "Is there a scratch?")]
    images = [[helpers.image(112, 112, 0)], [helpers.image(150, 100, 1)]]
    with helpers.VisionCalls(model) as vision:
        enc = encode_prompts(model, processor, texts, images)
        never = never_sampled_token_ids(
            processor, model.config.text_config.vocab_size, stop_token_ids(processor)
        )
        stops = list(range(100, 160))  # many stop tokens, so some rows end early
        rollout = sample(
            model, enc, 3, max_new_tokens=8, temperature=0.8, eos_token_ids=stops, suppress_token_ids=never,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        logp = completion_logprobs(
            model,
            enc,
            rollout.completion_ids,
            rollout.completion_mask,
            3,
            temperature=0.8,
            suppress_token_ids=never,
        )
    assert vision.calls == 1
    # merge 2: 28-px tokens; 112x112 -> 4x4, 150x100 -> 112x84 px (smart_resize) -> 4x3
    assert enc.image_features.shape[0] == 16 + 12
    torch.testing.assert_close(logp, rollout.sampling_logp, atol=1e-4, rtol=0)
