"""The loader on a folder laid out like the downloaded Qwen/Qwen2.5-VL-3B-Instruct (legacy config
layout, legacy weight names in two shards, tied embeddings, a vocabulary padded past the tokenizer,
Qwen's tokenizer files and preprocessor_config.json)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from anomaly_rl.models.loading import checkpoint_dtype, load_model_and_processor
from anomaly_rl.models.processing import never_sampled_token_ids, stop_token_ids, unwrap_model
from anomaly_rl.models.tokenizer import CHAT_TEMPLATE
from tests.models.qwen_checkpoint import QWEN25_VL_CHAT_TEMPLATE

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def test_a_published_layout_loads_with_its_weights_tokenizer_and_processor(fake_qwen: Path) -> None:
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "qwen2_5_vl_3b.yaml"), {"path": str(fake_qwen), "dtype": "float32"}
    )
    model, processor = load_model_and_processor(cfg)
    base = unwrap_model(model)
    # Legacy names (model.layers.*, visual.*) land in transformers 5's modules, none left random.
    shard = {**load_file(str(fake_qwen / "model-00001-of-00002.safetensors")),
             **load_file(str(fake_qwen / "model-00002-of-00002.safetensors"))}
    torch.testing.assert_close(base.model.visual.blocks[0].attn.qkv.weight, shard["visual.blocks.0.attn.qkv.weight"].float())
    torch.testing.assert_close(
        base.model.language_model.layers[1].mlp.up_proj.base_layer.weight, shard["model.layers.1.mlp.up_proj.weight"].float()
    )
    assert base.lm_head.weight.data_ptr() == base.model.language_model.embed_tokens.weight.data_ptr()
    # The project's chat template is the published one, and the checkpoint's own is used.
    assert processor.chat_template == QWEN25_VL_CHAT_TEMPLATE == CHAT_TEMPLATE
    tok = processor.tokenizer
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|image_pad|>") == base.config.image_token_id == processor.image_token_id
    # Rows past the tokenizer (the padded embedding matrix) and special tokens are never sampled.
    vocab = base.config.text_config.vocab_size
    assert vocab > len(tok)
    stop = stop_token_ids(processor)
    banned = set(never_sampled_token_ids(processor, vocab, stop))
    assert set(range(len(tok), vocab)) <= banned and tok.convert_tokens_to_ids("<|vision_start|>") in banned
    assert stop == [tok.convert_tokens_to_ids("<|im_end|>")] and not banned & set(stop)
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (3136, 512 * 512)  # model.image_max_pixels
    assert checkpoint_dtype(fake_qwen) == "bfloat16"
