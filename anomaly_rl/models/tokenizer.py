"""A small byte-level BPE tokenizer for the embedded (tiny) model, trained on the project's own text.

Why a tokenizer of our own: the real Qwen vocabulary has 151k entries, so a 5M-parameter model would
spend most of its weights on embeddings of tokens it never sees. We keep everything else Qwen-like
(byte-level BPE, the Qwen pre-tokenizer, the same special tokens and chat template) so that the
tiny model goes through exactly the code paths of a real checkpoint.

Every integer 0..max_coordinate is one token: box coordinates then cost one token each and the
model predicts a coordinate in one step (findings: whole-number tokens were ~10% faster and
learned as well as digits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The Qwen2 pre-tokenizer split, so that text is cut into pieces the way the real models cut it.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in Qwen's order. <|endoftext|> comes first so that it gets id 0 and
# serves as the pad token, as in Qwen.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Schema tags: added as NON-special tokens so that they survive `skip_special_tokens=True` decoding
# (the parser reads them from decoded text) while still costing one token each.
SCHEMA_TAGS: tuple[str, ...] = ("<think>", "</think>", "<rethink>", "</rethink>", "<answer>", "</answer>")

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

# Qwen2.5-VL-Instruct's chat template, verbatim, so that prompts are identical in shape for the tiny
# and the real models (including the default system prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Fixed strings of the chat template: part of every prompt, so part of the training text.
TEMPLATE_TEXTS: tuple[str, ...] = ("system\nYou are a helpful assistant.\n", "user\n", "assistant\n")


class TokenizerBuildError(ValueError):
    """The tokenizer settings cannot give the promised vocabulary."""


def build_tokenizer(
    corpus: Sequence[str], *, max_coordinate: int, bpe_vocab_size: int
) -> PreTrainedTokenizerFast:
    """Train the tiny model's tokenizer on `corpus` and wrap it for transformers.

    `bpe_vocab_size` bounds the learned BPE vocabulary (bytes + merges + special tokens); the
    number tokens and schema tags come on top of it.
    """
    if max_coordinate < 0:
        raise TokenizerBuildError(f"model.tiny.max_coordinate must be >= 0, got {max_coordinate}")
    if not corpus:
        raise TokenizerBuildError("the tokenizer corpus is empty: tokenizer_corpus() returned no text")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    minimum = 256 + len(SPECIAL_TOKENS)
    if bpe_vocab_size < minimum:
        raise TokenizerBuildError(
            f"model.tiny.bpe_vocab_size={bpe_vocab_size} is below the byte alphabet plus special tokens ({minimum})"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_pieces([*TEMPLATE_TEXTS, *corpus]), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SCHEMA_TAGS])
    # Added (not learned) so that each whole number is one token regardless of corpus frequencies;
    # added-token matching is leftmost-longest, so "112" is one token, not "11" + "2".
    tok.add_tokens([AddedToken(str(i), special=False, normalized=False) for i in range(max_coordinate + 1)])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=32768,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
    )
    _check_numbers_are_single_tokens(hf, max_coordinate)
    return hf


def training_pieces(texts: Sequence[str]) -> list[str]:
    """The texts cut where added tokens will cut them at encoding time (special tokens, tags, digits).

    Added tokens are matched before BPE sees the text, so "<think>Check" is encoded as "<think>" +
    "Check". Training on the uncut text would instead learn merges across ">C" that never apply
    (and "Check" would fall apart into rare pieces). Digits are all added tokens, so BPE never sees them.
    """
    pattern = re.compile("|".join([*(re.escape(t) for t in (*SPECIAL_TOKENS, *SCHEMA_TAGS)), r"\d+"]))
    return [piece for text in texts for piece in pattern.split(text) if piece]


def _check_numbers_are_single_tokens(tokenizer: PreTrainedTokenizerFast, max_coordinate: int) -> None:
    for i in range(max_coordinate + 1):
        ids = tokenizer.encode(str(i), add_special_tokens=False)
        if len(ids) != 1:
            raise TokenizerBuildError(f"the number {i} encodes to {len(ids)} tokens, expected one")
