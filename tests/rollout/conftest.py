"""A small tiny model (hidden 64, 2 layers) and encoded prompts, shared by the rollout tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.tiny import TinyModelSpec, tiny_model_dir

SMALL = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "vision_hidden_size": 64,
    "vision_depth": 2,
    "vision_heads": 2,
    "bpe_vocab_size": 400,
}


def _corpus(spec: TinyModelSpec) -> Sequence[str]:
    return [
        "Find defects. bottle 112x112. Defect? a yes, b no.",
        "<think>Check [10, 20, 40, 50].</think><rethink>A scratch defect is visible.</rethink><answer>a</answer>",
        "<think>The object looks normal [0, 0, 112, 112].</think><rethink>No defect.</rethink><answer>b</answer>",
    ]


@pytest.fixture(scope="session")
def rollout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(TinyModelSpec(**SMALL), tmp_path_factory.mktemp("tiny_models"), corpus_fn=_corpus)


def load(folder: Path, **overrides):
    cfg = {"name": "tiny", "path": str(folder), "dtype": "float32", "finetune": "full", "freeze_vision": True}
    return load_model_and_processor({**cfg, **overrides})


@pytest.fixture(scope="module")
def loaded(rollout_dir: Path):
    model, processor = load(rollout_dir)
    return model.eval(), processor


def random_image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def chat(processor, text: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="module")
def prompts(loaded):
    """Three prompts of different lengths (so left padding matters), one with two images."""
    _, processor = loaded
    texts = [
        chat(processor, "Defect?"),
        chat(processor, "Is there any defect in the object? a yes, b no."),
        chat(processor, "bottle 112x112.", n_images=2),
    ]
    images = [
        [random_image(112, 112, 0)],
        [random_image(200, 150, 1)],
        [random_image(112, 112, 2), random_image(112, 112, 3)],
    ]
    return texts, images


class VisionCalls:
    """Counts vision-tower forward calls while active."""

    def __init__(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.calls = 0
        self.handle = base.model.visual.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """Test files cannot import conftest (tests/ is not a package): helpers come as a fixture."""
    return SimpleNamespace(load=load, image=random_image, chat=chat, VisionCalls=VisionCalls)


