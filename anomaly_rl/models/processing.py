"""Turn prompts and images into model inputs, running the vision tower once per prompt.

`encode_prompts` is the only place the vision tower runs in a GRPO step: it stores the image
features, and every later forward pass of the step (prefill for sampling, policy and reference
scoring) rebuilds the prompt embeddings from them. Without this, sampling G responses per prompt
and scoring them would run the ViT 1 + G + G times per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


class EncodingError(ValueError):
    """Prompts and images do not fit together."""


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (LoRA layers live inside it, in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_input_size(processor: Any, original_size: tuple[int, int]) -> tuple[int, int]:
    """The (w, h) the processor resizes an image of `original_size` (w, h) to.

    Mirrors the image processor's own `smart_resize` call with its current pixel budget, so that
    `Frame(original_size, model_input_size(...))` maps boxes into the frame the model sees.
    """
    ip = processor.image_processor
    w, h = original_size
    if w <= 0 or h <= 0:
        raise EncodingError(f"image size must be positive, got {original_size}")
    new_h, new_w = smart_resize(
        h,
        w,
        factor=ip.patch_size * ip.merge_size,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )
    return new_w, new_h


def prompt_text(processor: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """The chat-formatted prompt, ending with the assistant header the model continues from."""
    return processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def stop_token_ids(processor: Any) -> list[int]:
    """Tokens that end a response: <|im_end|> (the chat turn's end) and the tokenizer's eos."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<|im_end|>")}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return sorted(i for i in ids if i is not None and i >= 0)


def never_sampled_token_ids(processor: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> list[int]:
    """Ids a response must never contain: special tokens other than the stop tokens, and padded rows.

    Special tokens (image/video/vision pads, <|im_start|>, <|endoftext|> when it does not stop) would
    corrupt the next forward pass or the chat format; ids past the tokenizer's length exist only
    because real checkpoints pad their embedding matrix, and cannot even be decoded.
    """
    tok = processor.tokenizer
    eos = set(eos_token_ids)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    special |= set(tok.all_special_ids)
    beyond = set(range(len(tok), vocab_size))
    return sorted((special | beyond) - eos)


@dataclass
class EncodedPrompts:
    """B prompts ready for the language model, with their image features computed once.

    input_ids / attention_mask: [B, P], LEFT-padded (pad mask 0) so that every prompt ends at column P-1
        and completions of all rows start at the same column.
    position_ids: [3, B, P] multimodal rotary (mrope) positions from the model's get_rope_index
        (temporal, height, width; equal for text tokens; 0 on padding).
    next_position: [B] the rotary position of the first completion token (max prompt position + 1);
        completion token t of prompt b sits at next_position[b] + t in all three mrope axes.
    image_features: [n_image_tokens, H] vision-tower output for every <|image_pad|> in input order, or
        None for text-only prompts. Computed under no_grad when the vision tower is frozen.
    image_grid_thw / pixel_values: the processor's outputs, kept so that a model with a different
        vision tower (e.g. a reference under full fine-tuning of vision) can recompute features.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    next_position: Tensor
    image_features: Tensor | None
    image_grid_thw: Tensor | None
    pixel_values: Tensor | None
    image_token_id: int
    pad_token_id: int
    tokenizer: Any = field(repr=False)

    @property
    def num_prompts(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[1])


def vision_is_frozen(model: nn.Module) -> bool:
    visual = unwrap_model(model).model.visual
    return not any(p.requires_grad for p in visual.parameters())


def compute_image_features(model: nn.Module, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
    """One vision-tower call for all images of the batch: [n_image_tokens, H] in input order."""
    base = unwrap_model(model)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not vision_is_frozen(model)):
        out = base.model.get_image_features(pixel_values, image_grid_thw)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.cat(list(pooled), dim=0) if isinstance(pooled, (list, tuple)) else pooled


def encode_prompts(
    model: nn.Module, processor: Any, prompt_texts: Sequence[str], images: Sequence[Sequence[Image.Image]]
) -> EncodedPrompts:
    """Tokenize B chat-formatted prompts with their images and run the vision tower once for all.

    `images[b]` are prompt b's images, in the order of its {"type": "image"} placeholders.
    """
    if len(prompt_texts) != len(images):
        raise EncodingError(f"{len(prompt_texts)} prompts but {len(images)} image lists")
    if not prompt_texts:
        raise EncodingError("no prompts to encode")
    base = unwrap_model(model)
    device = base.device
    image_token = processor.image_token
    for b, (text, imgs) in enumerate(zip(prompt_texts, images, strict=True)):
        if text.count(image_token) != len(imgs):
            raise EncodingError(
                f"prompt {b} has {text.count(image_token)} image placeholders but {len(imgs)} images"
            )
    flat = [list(imgs) for imgs in images]
    has_images = any(flat)
    batch = processor(
        text=list(prompt_texts),
        images=flat if has_images else None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    mm_token_type_ids = batch.get("mm_token_type_ids")
    if mm_token_type_ids is None:
        mm_token_type_ids = (input_ids == processor.image_token_id).int()
    grid = batch["image_grid_thw"].to(device) if has_images else None
    pixel_values = batch["pixel_values"].to(device) if has_images else None
    position_ids, _ = base.model.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids.to(device),
        image_grid_thw=grid,
        attention_mask=attention_mask,
    )
    valid = attention_mask.bool().unsqueeze(0)
    next_position = position_ids.masked_fill(~valid, -1).amax(dim=(0, 2)) + 1
    features = compute_image_features(model, pixel_values, grid) if has_images else None
    return EncodedPrompts(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        next_position=next_position,
        image_features=features,
        image_grid_thw=grid,
        pixel_values=pixel_values,
        image_token_id=int(processor.image_token_id),
        pad_token_id=int(processor.tokenizer.pad_token_id),
        tokenizer=processor.tokenizer,
    )


def prompt_embeddings(model: nn.Module, enc: EncodedPrompts) -> Tensor:
    """[B, P, H] prompt embeddings: text embeddings with the cached image features at <|image_pad|>.

    Rebuilt per forward pass (cheap: an embedding lookup) so that trainable text embeddings get
    their gradient, while the vision tower is not run again.
    """
    base = unwrap_model(model)
    embeds = base.get_input_embeddings()(enc.input_ids)
    if enc.image_features is None:
        return embeds
    mask = enc.input_ids == enc.image_token_id
    if int(mask.sum()) != enc.image_features.shape[0]:
        raise EncodingError(
            f"{int(mask.sum())} image tokens but {enc.image_features.shape[0]} image feature rows"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), enc.image_features.to(embeds.dtype))


def with_image_features_from(model: nn.Module, enc: EncodedPrompts) -> EncodedPrompts:
    """A copy of `enc` whose image features come from `model`'s own vision tower.

    Only needed when the scoring model's vision tower differs from the one that encoded the prompts
    (a full-fine-tuning reference while the vision tower trains).
    """
    if enc.pixel_values is None:
        return enc
    features = compute_image_features(model, enc.pixel_values, enc.image_grid_thw)
    return EncodedPrompts(**{**enc.__dict__, "image_features": features})
