"""The tiny tokenizer: whole-number tokens, decodable tags, Qwen special tokens and chat template."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.models.tokenizer import (
    CHAT_TEMPLATE,
    SCHEMA_TAGS,
    SPECIAL_TOKENS,
    TokenizerBuildError,
    build_tokenizer,
    training_pieces,
)

CORPUS = [
    "Find defects. bottle 112x112. Defect? a yes, b no.",
    "<think>Check [10, 20, 40, 50].</think><rethink>A scratch defect is visible.</rethink><answer>a</answer>",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, max_coordinate=223, bpe_vocab_size=400)


def test_every_coordinate_is_one_token(tok) -> None:
    for i in range(224):
        ids = tok.encode(str(i), add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == str(i)
    # numbers past max_coordinate split (leftmost-longest), they are not one token
    assert len(tok.encode("224", add_special_tokens=False)) == 2


def test_tags_are_single_non_special_tokens_that_survive_decoding(tok) -> None:
    for tag in SCHEMA_TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    text = "<think>Check [10, 20, 40, 50].</think><rethink>ok</rethink><answer>a</answer>"
    ids = tok.encode(text + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_are_special_and_skipped(tok) -> None:
    for t in SPECIAL_TOKENS:
        (i,) = tok.encode(t, add_special_tokens=False)
        assert tok.added_tokens_decoder[i].special
        assert tok.decode([i], skip_special_tokens=True) == ""
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.eos_token == "<|im_end|>"


def test_box_tokenizes_as_hand_worked(tok) -> None:
    tokens = tok.convert_ids_to_tokens(tok.encode("[10, 20, 40, 50]", add_special_tokens=False))
    assert [t for t in tokens if t.isdigit()] == ["10", "20", "40", "50"]


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60))
def test_any_text_round_trips(tok, text: str) -> None:
    """Byte-level BPE: no unknown tokens, every string decodes back (NFC-normalised)."""
    import unicodedata

    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_training_pieces_cut_at_added_tokens() -> None:
    assert training_pieces(["<think>Check [10, 2].</think>x"]) == ["Check [", ", ", "].", "x"]


def test_chat_template_is_qwens(tok) -> None:
    from jinja2 import Template

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Defect?"}]}]
    text = Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Defect?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_bad_settings_raise() -> None:
    with pytest.raises(TokenizerBuildError, match="bpe_vocab_size"):
        build_tokenizer(CORPUS, max_coordinate=10, bpe_vocab_size=100)
    with pytest.raises(TokenizerBuildError, match="empty"):
        build_tokenizer([], max_coordinate=10, bpe_vocab_size=400)
