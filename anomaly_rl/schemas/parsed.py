"""The structured result of parsing a model response. Rewards only ever see this, never raw text."""

from __future__ import annotations

from dataclasses import dataclass, replace

from anomaly_rl.data.records import Box


@dataclass(frozen=True)
class ParsedResponse:
    """What a parser extracted from one response; built for any input string, however broken.

    Stage texts are the contents of the first `<think>`, `<rethink>` and `<answer>` pairs
    (None when the pair is absent). `boxes` are the boxes found in the region stage, in the
    frame they were written in (the model's frame until `with_boxes` maps them).
    """

    text: str
    tags: tuple[str, ...]  # complete tag pairs found, in order of their opening tag
    think: str | None
    rethink: str | None
    answer_text: str | None  # contents of <answer>...</answer>, unstripped
    answer: str | None  # "a" | "b" when the answer stage names exactly one letter, else None
    boxes: tuple[Box, ...]
    region_has_brackets: bool  # the region stage holds "[...]" even if no valid box parsed
    follows_schema: bool  # the schema's tags, each once, in its order, and a valid answer

    def with_boxes(self, boxes: tuple[Box, ...]) -> ParsedResponse:
        return replace(self, boxes=tuple(boxes))
