"""A small random Qwen2.5-VL laid out like a downloaded Qwen/Qwen2.5-VL-3B-Instruct folder.

What `huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct` leaves on disk, shrunk: config.json in
the published (transformers 4.4x) layout — text settings at the top level, `rope_scaling` of type
mrope, `vision_config` with windowed attention —, weights in two safetensors shards under the
published parameter names (`model.layers.*`, `visual.*`; the 3B ties its output embedding, so there
is no `lm_head.weight`) with their index, generation_config.json, a Qwen2 byte-level BPE tokenizer
(tokenizer.json, vocab.json, merges.txt, tokenizer_config.json) whose 22 added tokens follow the
learned vocabulary in Qwen's order and with Qwen's special flags, chat_template.json, and
preprocessor_config.json with the published image settings. Everything is built offline; nothing is
downloaded.

Why so faithful: the tiny default model is saved by transformers 5 itself, so it never exercises
the paths a real checkpoint takes (legacy config layout, legacy weight names, a vocabulary padded
past the tokenizer, a tokenizer that is not ours, the published processor files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# The chat template of Qwen/Qwen2.5-VL-3B-Instruct (tokenizer_config.json and chat_template.json),
# written out independently of anomaly_rl/models/tokenizer.py so that a change there is caught.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's added tokens in id order (151643.. in the real vocabulary); True = special.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# Qwen2's pre-tokenizer split (digits one by one, as in the real models).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# General English, not this project's prompts: a real tokenizer was not trained on them either.
CORPUS = (
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog while the camera records the scene.",
    "Inspect the image of the object and report whether it has a defect such as a scratch, "
    "a crack, a stain, a spot or a missing part.",
    "Answer with a or b. Think first, then examine the region, then answer.",
    "The bounding box of the region is given by its corners, from the top left to the bottom right.",
    "Industrial inspection of metal, fabric, pills, screws, bottles and printed circuit boards.",
    "This looks normal. There is no defect visible in this region of the image.",
)

# The published preprocessor_config.json of Qwen2.5-VL (3B and 7B alike).
PREPROCESSOR_CONFIG: dict[str, Any] = {
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


def build_tokenizer_files(folder: Path, bpe_vocab_size: int = 600) -> int:
    """Train a small Qwen2-style byte-level BPE and write the published tokenizer files.

    Returns the tokenizer's length (learned vocabulary plus the 22 added tokens).
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(CORPUS), trainer)
    learned = tok.get_vocab_size()
    # Special tokens first, then the non-special ones, so that ids follow Qwen's order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in ADDED_TOKENS if s])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in ADDED_TOKENS if not s])
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json, merges.txt
    decoder = {
        str(learned + i): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (text, special) in enumerate(ADDED_TOKENS)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t, s in ADDED_TOKENS if s and t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN25_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "chat_template.json", {"chat_template": QWEN25_VL_CHAT_TEMPLATE})
    return learned + len(ADDED_TOKENS)


def published_config(vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """config.json as Qwen published it (flat text settings), with small sizes."""
    hidden, heads = 64, 4
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,  # grouped-query attention, as the 3B (16 heads, 2 kv heads)
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],  # block 0 windowed, as most of the real tower
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        # head_dim 16 -> 8 rotary frequencies split (time, height, width), as 16/24/24 of 64
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab_size,
    }


def _published_name(name: str) -> str:
    """transformers 5's parameter name -> the name in Qwen's published safetensors."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual.") :]
    return name


def build_fake_qwen2_5_vl(folder: str | Path, seed: int = 0) -> Path:
    """Write the fake checkpoint into `folder` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    length = build_tokenizer_files(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    token_ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    # Real checkpoints pad the embedding matrix past the tokenizer (151936 rows for 151665 tokens).
    vocab_size = -(-length // 128) * 128 + 128
    config_dict = published_config(vocab_size, token_ids)
    _write_json(folder / "config.json", config_dict)
    config = Qwen2_5_VLConfig.from_pretrained(str(folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = {
        _published_name(k): v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied to the input embedding, not stored (as in the 3B)
    }
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(
        folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": token_ids["<|endoftext|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_p": 0.001,
            "top_k": 1,
            "transformers_version": "4.49.0",
        },
    )
    _write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    return folder


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
