"""A small tiny model (hidden 64, 2 layers) built once per test session from a local corpus."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

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


def _fallback_corpus(spec: TinyModelSpec) -> Sequence[str]:
    """Project-like text, independent of the schemas floor, so these tests pin the tokenizer."""
    return [
        "Find defects.",
        "bottle 112x112. Defect? a yes, b no. <think>boxes [x1, y1, x2, y2]</think>"
        "<rethink>check</rethink><answer>a or b</answer>",
        "<think>Check [10, 20, 40, 50].</think><rethink>A scratch defect is visible.</rethink><answer>a</answer>",
        "<think>The object looks normal [0, 0, 112, 112].</think><rethink>No defect.</rethink><answer>b</answer>",
    ]


@pytest.fixture(scope="session")
def fallback_corpus() -> Callable[[TinyModelSpec], Sequence[str]]:
    return _fallback_corpus


@pytest.fixture(scope="session")
def small_spec() -> TinyModelSpec:
    return TinyModelSpec(**SMALL)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory, small_spec: TinyModelSpec) -> Path:
    return tiny_model_dir(small_spec, tmp_path_factory.mktemp("tiny_models"), corpus_fn=_fallback_corpus)


@pytest.fixture(scope="session")
def fake_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Qwen2.5-VL laid out like the downloaded Qwen/Qwen2.5-VL-3B-Instruct folder."""
    from tests.models.qwen_checkpoint import build_fake_qwen2_5_vl

    return build_fake_qwen2_5_vl(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-3B-Instruct")
