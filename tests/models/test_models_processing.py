"""encode_prompts and the model frame: checked against transformers' own forward and processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anomaly_rl.models.frame import Frame
from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.processing import (
    EncodingError,
    encode_prompts,
    model_input_size,
    never_sampled_token_ids,
    prompt_embeddings,
    prompt_text,
    stop_token_ids,
)
from anomaly_rl.models.processor import fixed_size_image_processor


@pytest.fixture(scope="module")
def loaded(small_dir: Path):
    model, processor = load_model_and_processor(
        {
            "name": "tiny",
            "path": str(small_dir),
            "dtype": "float32",
            "finetune": "full",
            "freeze_vision": True,
        }
    )
    return model.eval(), processor


def chat(processor, text: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return prompt_text(processor, [{"role": "user", "content": content}])


def image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)


class VisionCalls:
    """Counts vision-tower forward calls."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.model.visual.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@settings(max_examples=40, deadline=None)
@given(w=st.integers(16, 700), h=st.integers(16, 700), merge=st.sampled_from([1, 2]))
def test_model_input_size_is_what_the_processor_produces(w: int, h: int, merge: int) -> None:
    if max(w, h) / min(w, h) > 20:
        return
    ip = fixed_size_image_processor(112, patch_size=14, merge_size=merge)

    class Proc:
        image_processor = ip

    out = ip(images=[Image.new("RGB", (w, h))], return_tensors="pt")
    _, gh, gw = out["image_grid_thw"][0].tolist()
    assert model_input_size(Proc, (w, h)) == (gw * 14, gh * 14)


def test_112_px_gives_the_8x8_grid(loaded) -> None:
    _, processor = loaded
    assert model_input_size(processor, (112, 112)) == (112, 112)
    frame = Frame((1024, 1024), model_input_size(processor, (1024, 1024)))
    assert frame.model_size == (112, 112) and frame.to_model([(512, 0, 1024, 256)]) == (
        (56.0, 0.0, 112.0, 28.0),
    )


def test_encode_matches_transformers_own_forward(loaded) -> None:
    """Our path (cached features -> inputs_embeds, explicit mrope positions) gives the logits that
    the model computes itself from pixel values and input ids."""
    model, processor = loaded
    texts = [
        chat(processor, "Defect?"),
        chat(processor, "Is there any defect in this metal nut?", n_images=2),
    ]
    images = [[image(112, 112, 0)], [image(300, 200, 1), image(112, 112, 2)]]
    with VisionCalls(model) as vision:
        enc = encode_prompts(model, processor, texts, images)
    assert vision.calls == 1  # one call for all three images of the batch
    assert enc.image_features.shape[0] == 64 + (84 // 14) * (126 // 14) + 64
    assert not enc.image_features.requires_grad  # frozen tower
    # left padding: every prompt ends in the last column
    assert bool(enc.attention_mask[:, -1].all()) and not bool(enc.attention_mask[0, 0])
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits
        ours = model(
            inputs_embeds=prompt_embeddings(model, enc),
            attention_mask=enc.attention_mask,
            position_ids=enc.position_ids,
        ).logits
    valid = enc.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    # completion positions continue after the last prompt position
    assert enc.next_position.tolist() == [
        int(enc.position_ids[:, b][:, valid[b]].max()) + 1 for b in range(2)
    ]


def test_text_only_prompts(loaded) -> None:
    model, processor = loaded
    with VisionCalls(model) as vision:
        enc = encode_prompts(
            model, processor, [chat(processor, "hello", 0), chat(processor, "a b", 0)], [[], []]
        )
    assert vision.calls == 0 and enc.image_features is None
    assert enc.next_position.tolist() == enc.attention_mask.sum(1).tolist()


def test_trainable_vision_keeps_the_graph(small_dir: Path) -> None:
    model, processor = load_model_and_processor(
        {
            "name": "tiny",
            "path": str(small_dir),
            "dtype": "float32",
            "finetune": "full",
            "freeze_vision": False,
        }
    )
    enc = encode_prompts(model, processor, [chat(processor, "x")], [[image(112, 112, 3)]])
    assert enc.image_features.requires_grad


def test_mismatched_images_raise(loaded) -> None:
    model, processor = loaded
    with pytest.raises(EncodingError, match="prompt 0 has 1 image placeholders but 2 images"):
        encode_prompts(model, processor, [chat(processor, "x")], [[image(112, 112, 0)] * 2])
    with pytest.raises(EncodingError, match="image lists"):
        encode_prompts(model, processor, [chat(processor, "x")], [])


def test_stop_and_never_sampled_tokens(loaded) -> None:
    _, processor = loaded
    tok = processor.tokenizer
    stop = stop_token_ids(processor)
    assert stop == [tok.convert_tokens_to_ids("<|im_end|>")]
    never = never_sampled_token_ids(processor, len(tok) + 5, stop)
    for t in (
        "<|image_pad|>",
        "<|video_pad|>",
        "<|vision_pad|>",
        "<|vision_start|>",
        "<|im_start|>",
        "<|endoftext|>",
    ):
        assert tok.convert_tokens_to_ids(t) in never
    assert stop[0] not in never and tok.convert_tokens_to_ids("<think>") not in never
    assert set(range(len(tok), len(tok) + 5)) <= set(never)  # padded embedding rows of real checkpoints
