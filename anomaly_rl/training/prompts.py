"""From a batch of records to model inputs: the schema writes the chat, the processor encodes it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from anomaly_rl.data.records import Sample
from anomaly_rl.models.frame import Frame
from anomaly_rl.models.processing import EncodedPrompts, encode_prompts, model_input_size
from anomaly_rl.schemas.base import Schema
from anomaly_rl.schemas.parsed import ParsedResponse


@dataclass
class PreparedPrompts:
    samples: list[Sample]
    frames: list[Frame]
    encoded: EncodedPrompts


def frame_of(sample: Sample, processor: Any) -> Frame:
    return Frame(sample.image_size, model_input_size(processor, sample.image_size))


def prepare_prompts(
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    references: Sequence[Sequence[Image.Image]],
    schema: Schema,
    processor: Any,
    model: Any,
) -> PreparedPrompts:
    """Query image first, then the references: the order the schema's image slots promise."""
    frames = [frame_of(s, processor) for s in samples]
    texts = [
        processor.apply_chat_template(
            schema.messages(s, f.model_size, num_references=len(refs)),
            add_generation_prompt=True,
            tokenize=False,
        )
        for s, f, refs in zip(samples, frames, references, strict=True)
    ]
    image_lists = [[img, *refs] for img, refs in zip(images, references, strict=True)]
    encoded = encode_prompts(model, processor, texts, image_lists)
    return PreparedPrompts(samples=list(samples), frames=frames, encoded=encoded)


def parse_in_original_frame(
    texts: Sequence[str], frames: Sequence[Frame], group_size: int, schema: Schema
) -> list[ParsedResponse]:
    """Parse each response and map its boxes to original pixels: rewards and metrics score there."""
    parsed = []
    for i, text in enumerate(texts):
        response = schema.parse(text)
        parsed.append(response.with_boxes(frames[i // group_size].to_original(response.boxes)))
    return parsed


def select_prompts(encoded: EncodedPrompts, prompts: slice) -> EncodedPrompts:
    """The prompts `prompts` of an encoded batch, with their image features and pixels.

    Mini-batches of a GRPO update are whole groups, i.e. contiguous prompt ranges; the cached
    image features are stored flat in prompt order, so a prompt range is a contiguous range of
    feature rows (and of images and pixel patches).
    """
    tokens_per_prompt = (encoded.input_ids == encoded.image_token_id).sum(dim=1).tolist()
    start, stop = prompts.start or 0, prompts.stop if prompts.stop is not None else encoded.num_prompts
    first_token = sum(tokens_per_prompt[:start])
    last_token = first_token + sum(tokens_per_prompt[start:stop])
    features = None if encoded.image_features is None else encoded.image_features[first_token:last_token]
    grid, pixels = encoded.image_grid_thw, encoded.pixel_values
    if grid is not None and pixels is not None:
        # Every image shares the processor's spatial merge, so patches / tokens is the same ratio.
        patches_per_image = [int(g.prod()) for g in grid]
        merge_area = sum(patches_per_image) // max(1, sum(tokens_per_prompt))
        tokens_per_image = [p // merge_area for p in patches_per_image]
        ends = list(itertools.accumulate(tokens_per_image))
        chosen = [
            i for i, end in enumerate(ends) if end - tokens_per_image[i] >= first_token and end <= last_token
        ]
        image_first, image_last = (chosen[0], chosen[-1] + 1) if chosen else (0, 0)
        patch_start = sum(patches_per_image[:image_first])
        patch_stop = patch_start + sum(patches_per_image[image_first:image_last])
        grid = grid[image_first:image_last]
        pixels = pixels[patch_start:patch_stop]
    return replace(
        encoded,
        input_ids=encoded.input_ids[start:stop],
        attention_mask=encoded.attention_mask[start:stop],
        position_ids=encoded.position_ids[:, start:stop],
        next_position=encoded.next_position[start:stop],
        image_features=features,
        image_grid_thw=grid,
        pixel_values=pixels,
    )

