"""Building the tiny model: sizes, determinism, the on-disk cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anomaly_rl.models.tiny as tiny
from anomaly_rl.models.tiny import (
    TinyModelConfigError,
    TinyModelSpec,
    build_tiny,
    mrope_section,
    tiny_model_dir,
)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_same_seed_same_weights_in_another_cache(
    tmp_path: Path, small_spec: TinyModelSpec, small_dir: Path, fallback_corpus
) -> None:
    torch.manual_seed(123)  # the caller's RNG state must not matter
    other = tiny_model_dir(small_spec, tmp_path / "elsewhere", corpus_fn=fallback_corpus)
    assert other.name == small_dir.name
    a, b = _weights(small_dir), _weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((other / "tokenizer.json").read_text()) == json.loads(
        (small_dir / "tokenizer.json").read_text()
    )


def test_another_seed_other_weights_other_folder(
    tmp_path: Path, small_spec: TinyModelSpec, small_dir: Path, fallback_corpus
) -> None:
    spec = dataclasses.replace(small_spec, seed=1)
    other = tiny_model_dir(spec, tmp_path, corpus_fn=fallback_corpus)
    assert other.name != small_dir.name
    key = "model.layers.0.self_attn.q_proj.weight"  # saved in the published checkpoints' key layout
    assert not torch.equal(_weights(other)[key], _weights(small_dir)[key])


def test_second_call_loads_from_cache(
    tmp_path: Path, small_spec: TinyModelSpec, fallback_corpus, monkeypatch
) -> None:
    first = tiny_model_dir(small_spec, tmp_path, corpus_fn=fallback_corpus)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(tiny, "build_tiny", no_build)
    assert tiny_model_dir(small_spec, tmp_path, corpus_fn=fallback_corpus) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch folders left behind


def test_corpus_change_is_a_new_model(
    tmp_path: Path, small_spec: TinyModelSpec, small_dir: Path, fallback_corpus
) -> None:
    other = tiny_model_dir(
        small_spec, tmp_path, corpus_fn=lambda s: [*fallback_corpus(s), "A new word: zipper."]
    )
    assert other.name != small_dir.name


def test_default_sizes_match_findings(fallback_corpus) -> None:
    """112 px, patch 14, merge 1, ViT 192x4 with full attention everywhere, LM 192x4: ~5M params."""
    model, processor = build_tiny(TinyModelSpec(), fallback_corpus(TinyModelSpec()))
    n = sum(p.numel() for p in model.parameters())
    assert 4.5e6 < n < 6.0e6
    v = model.config.vision_config
    assert (v.depth, v.hidden_size, v.patch_size, v.spatial_merge_size) == (4, 192, 14, 1)
    assert list(v.fullatt_block_indexes) == [0, 1, 2, 3]
    t = model.config.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (192, 4, len(processor.tokenizer))
    assert sum(t.rope_parameters["mrope_section"]) == 192 // 3 // 2


def test_mrope_section_hand_worked() -> None:
    assert mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL's own split
    assert mrope_section(64) == [8, 12, 12]
    assert mrope_section(32) == [4, 6, 6]
    assert mrope_section(12, interleaved=True) == [1] * 6


@pytest.mark.parametrize("interleaved", [False, True])
def test_every_rotary_axis_gets_the_frequencies_we_expect(interleaved: bool) -> None:
    """The stock Qwen2.5-VL rotary module, fed our mrope_section, rotates frequency i by the position
    of the axis we intend: contiguous blocks, or axis i % 3 when interleaved (computed here by hand)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    head_dim, theta = 24, 100.0
    section = mrope_section(head_dim, interleaved)
    config = Qwen2_5_VLTextConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section},
    )
    rotary = Qwen2_5_VLRotaryEmbedding(config)
    position = torch.tensor([[[3]], [[5]], [[7]]])  # (time, height, width) of one token
    cos, _ = rotary(torch.zeros(1, 1, head_dim), position)
    half = head_dim // 2
    inv_freq = [theta ** (-2 * i / head_dim) for i in range(half)]
    if interleaved:
        axis_of = [i % 3 for i in range(half)]
    else:
        axis_of = [axis for axis, width in enumerate(section) for _ in range(width)]
    expected = torch.tensor([torch.cos(torch.tensor(float(position[axis_of[i], 0, 0]) * inv_freq[i])).item()
                             for i in range(half)])
    torch.testing.assert_close(cos[0, 0, :half], expected, rtol=1e-5, atol=1e-6)
    # Interleaved: the width axis reaches the highest frequencies too (index 2 of 12), not only the lowest.
    assert (min(i for i in range(half) if axis_of[i] == 2) == 2) is interleaved


def test_spec_errors_name_the_setting() -> None:
    with pytest.raises(TinyModelConfigError, match="hidden_sise"):
        TinyModelSpec.from_mapping({"hidden_sise": 64})
    with pytest.raises(TinyModelConfigError, match="image_size"):
        TinyModelSpec.from_mapping({"image_size": 100})
    with pytest.raises(TinyModelConfigError, match="num_heads"):
        TinyModelSpec.from_mapping({"hidden_size": 64, "num_heads": 3})
    assert TinyModelSpec.from_mapping({"fullatt_block_indexes": [0, 1]}).fullatt_block_indexes == (0, 1)


def test_default_corpus_comes_from_schemas() -> None:
    pytest.importorskip("anomaly_rl.schemas.corpus")
    spec = TinyModelSpec()
    corpus = tiny.default_corpus(spec)
    assert any("<think>" in text for text in corpus)
