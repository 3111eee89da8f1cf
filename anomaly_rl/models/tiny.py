"""The embedded default model: a tiny, randomly initialised Qwen2.5-VL built offline from code.

It is built once per configuration and saved with `save_pretrained` into a folder named by a hash of
its settings (and of the tokenizer corpus), so that it is then loaded exactly like a downloaded
checkpoint. Same settings and seed -> same tokenizer and bit-identical weights.

Defaults follow findings.md's second round, where boxes became learnable: 112 px images, patch 14
with spatial merge 1 (8x8 = 64 image tokens of 14 px), full attention in every vision block, an LM of
192 x 4 layers and a ViT of 192 x 4 blocks (~5M parameters with our small vocabulary).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from anomaly_rl.models.processor import ImageOnlyQwenVLProcessor, fixed_size_image_processor
from anomaly_rl.models.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, build_tokenizer

# Bump when this module changes what it builds, so that stale cached folders are not reused.
BUILD_VERSION = 1


class TinyModelConfigError(ValueError):
    """A `model.tiny.*` setting is unknown or inconsistent."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the tiny model and its processor."""

    seed: int = 0
    image_size: int = 112
    patch_size: int = 14
    spatial_merge_size: int = 1
    max_coordinate: int | None = None  # None: image_size (box corners run 0..image_size inclusive)
    bpe_vocab_size: int = 1024
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    num_kv_heads: int | None = None  # None: num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # None: 4 * hidden_size
    vision_hidden_size: int = 192
    vision_depth: int = 4
    vision_heads: int = 3
    vision_intermediate_size: int | None = None  # None: 4 * vision_hidden_size
    fullatt_block_indexes: tuple[int, ...] | None = None  # None: full attention in every vision block
    rope_theta: float = 10000.0
    # Qwen2.5-VL gives (time, height, width) contiguous blocks of the rotary frequencies, so width
    # gets only the lowest ones: over an 8x8 grid they barely rotate and the LM cannot tell image
    # columns apart (measured: the SFT warm start learned box rows, corr 0.68, but not columns, 0.13).
    # Interleaving the axes over the whole spectrum (as Qwen3-VL does) uses the stock Qwen2.5-VL
    # code: its `mrope_section` may list more than three chunks, chunk i going to axis i % 3.
    mrope_interleaved: bool = True
    # Pixel coordinates in the second temporal frame of each image patch (an absolute position for
    # the patch embedding): see anomaly_rl/models/processor.py, CoordinateFrameImageProcessor.
    coordinate_frame: bool = True
    max_position_embeddings: int = 4096

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TinyModelSpec:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TinyModelConfigError(f"unknown model.tiny settings {unknown}; known: {sorted(known)}")
        if values.get("fullatt_block_indexes") is not None:
            values["fullatt_block_indexes"] = tuple(int(i) for i in values["fullatt_block_indexes"])
        spec = cls(**values)
        spec.validate()
        return spec

    @property
    def coordinate_max(self) -> int:
        return self.image_size if self.max_coordinate is None else self.max_coordinate

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise TinyModelConfigError(
                f"model.tiny.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 8:
            raise TinyModelConfigError(
                "model.tiny: hidden_size/num_heads must be a multiple of 8 (mrope sections)"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise TinyModelConfigError(
                f"model.tiny.num_heads={self.num_heads} not divisible by num_kv_heads={kv}"
            )
        if self.vision_hidden_size % self.vision_heads or (self.vision_hidden_size // self.vision_heads) % 4:
            raise TinyModelConfigError(
                "model.tiny: vision_hidden_size/vision_heads must be an integer multiple of 4 (2D rotary)"
            )
        if self.image_size % (self.patch_size * self.spatial_merge_size):
            raise TinyModelConfigError(
                f"model.tiny.image_size={self.image_size} must be a multiple of "
                f"patch_size*spatial_merge_size={self.patch_size * self.spatial_merge_size}"
            )
        if self.fullatt_block_indexes is not None and any(
            not 0 <= i < self.vision_depth for i in self.fullatt_block_indexes
        ):
            raise TinyModelConfigError(
                f"model.tiny.fullatt_block_indexes={self.fullatt_block_indexes} outside 0..{self.vision_depth - 1}"
            )


def default_corpus(spec: TinyModelSpec) -> list[str]:
    """The project's own text (prompts, responses, numbers), from the schemas floor."""
    from anomaly_rl.schemas.corpus import tokenizer_corpus

    return list(tokenizer_corpus((spec.image_size, spec.image_size), spec.coordinate_max))


def mrope_section(head_dim: int, interleaved: bool = False) -> list[int]:
    """Split head_dim/2 rotary frequencies between (time, height, width).

    Contiguous: as Qwen2.5-VL does (16/24/24 of 64). Interleaved: one frequency per chunk, so that
    frequency i serves axis i % 3 and every axis spans high to low frequencies.
    """
    half = head_dim // 2
    if interleaved:
        return [1] * half
    hw = (half - half // 4) // 2
    return [half - 2 * hw, hw, hw]


def build_tiny(spec: TinyModelSpec, corpus: Sequence[str]) -> tuple[Qwen2_5_VLForConditionalGeneration, Any]:
    """Build the tokenizer, processor and randomly initialised model in memory."""
    spec.validate()
    tokenizer = build_tokenizer(
        corpus, max_coordinate=spec.coordinate_max, bpe_vocab_size=spec.bpe_vocab_size
    )
    image_processor = fixed_size_image_processor(
        spec.image_size,
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        coordinate_frame=spec.coordinate_frame,
    )
    processor = ImageOnlyQwenVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.num_heads
    fullatt = spec.fullatt_block_indexes
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size or 4 * spec.hidden_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads or spec.num_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": spec.rope_theta,
                "mrope_section": mrope_section(head_dim, spec.mrope_interleaved),
            },
            "bos_token_id": None,
            "eos_token_id": ids(EOS_TOKEN),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size or 4 * spec.vision_hidden_size,
            "num_heads": spec.vision_heads,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "temporal_patch_size": 2,
            "out_hidden_size": spec.hidden_size,
            "window_size": spec.image_size,
            # Full attention everywhere: Qwen's windowed blocks split small grids unevenly (findings).
            "fullatt_block_indexes": list(range(spec.vision_depth)) if fullatt is None else list(fullatt),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    # A private RNG stream: the same seed gives the same weights whatever the caller's RNG state,
    # and building does not disturb it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids(EOS_TOKEN)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def spec_hash(spec: TinyModelSpec, corpus: Sequence[str]) -> str:
    """Key of the cache folder: settings, corpus and the library versions that shape the weights."""
    payload = {
        "spec": dataclasses.asdict(spec),
        "corpus": hashlib.sha256("\x00".join(corpus).encode()).hexdigest(),
        "build_version": BUILD_VERSION,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tiny_model_dir(
    spec: TinyModelSpec,
    cache_dir: str | os.PathLike[str],
    corpus_fn: Callable[[TinyModelSpec], Sequence[str]] | None = None,
) -> Path:
    """Return the folder holding the tiny model for `spec`, building and saving it on first use.

    `corpus_fn` gives the tokenizer's training text (default: the schemas' `tokenizer_corpus`).
    """
    corpus = list((corpus_fn or default_corpus)(spec))
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"tiny-{spec_hash(spec, corpus)}"
    if (folder / "config.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(spec, corpus)
    # Build into a scratch folder and rename, so that concurrent runs never see half a folder.
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
        (scratch / "tiny_spec.json").write_text(
            json.dumps(dataclasses.asdict(spec), indent=2, sort_keys=True)
        )
        try:
            os.replace(scratch, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return folder
