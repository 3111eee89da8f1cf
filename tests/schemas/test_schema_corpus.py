"""The tokenizer corpus covers every prompt, template, tag and coordinate the schemas write."""

from __future__ import annotations

import re

from anomaly_rl.data.records import Sample
from anomaly_rl.schemas.config import SCHEMA_NAMES, load_schema
from anomaly_rl.schemas.corpus import tokenizer_corpus
from anomaly_rl.schemas.parsing import KNOWN_TAGS
from anomaly_rl.schemas.r1 import R1Schema


def _static_words(template: str) -> list[str]:
    """The literal words of a template (placeholders removed)."""
    return re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", template))


def test_corpus_covers_tags_numbers_prompts_and_templates() -> None:
    corpus = tokenizer_corpus((112, 84), 112)
    joined = "\n".join(corpus)
    for tag in KNOWN_TAGS:
        assert f"<{tag}>" in joined and f"</{tag}>" in joined
    numbers = {int(n) for n in re.findall(r"\d+", " ".join(re.findall(r"\[[\d, ]+\]", joined)))}
    assert set(range(113)) <= numbers  # every coordinate value, inside box brackets
    sample = Sample("", "anomalous", "metal_nut", "crack", None, (), (112, 84), "test")
    for name in SCHEMA_NAMES:
        for style in ("short", "instruction"):
            schema = load_schema(name, style=style)
            for refs in (0, 1):
                for message in schema.messages(sample, (112, 84), num_references=refs):
                    assert message["content"][-1]["text"] in corpus
            for per_label in schema.render_templates.values():
                for templates in per_label.values():
                    for template in templates:  # every template's wording appears
                        for word in _static_words(template):
                            assert word in joined


def test_corpus_is_deterministic_and_unique() -> None:
    first = tokenizer_corpus((64, 64), 64)
    assert first == tokenizer_corpus((64, 64), 64)
    assert len(first) == len(set(first))


def test_corpus_takes_configured_schemas_and_words() -> None:
    custom = R1Schema(
        style="short",
        styles={"short": {"system": "zyxw", "user": "{category}", "references": "r"}},
        render={"think": {"anomalous": ["qqq {defect}"], "normal": ["ppp"]}},
    )
    corpus = tokenizer_corpus((32, 32), 40, categories=("widget",), defect_types=("dent",), schemas=[custom])
    joined = "\n".join(corpus)
    assert "zyxw" in joined and "widget" in joined and "qqq dent" in joined and "ppp" in joined
    assert "[36, 37, 38, 39]" in joined and "[41" not in joined
