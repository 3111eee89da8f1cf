"""Text-level parsing primitives shared by every schema; each is total (never raises) on any str.

Everything here is linear in the length of the text: responses come straight from a sampling
policy and may be arbitrarily long or broken, and the parser runs on every response of every step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from anomaly_rl.data.records import Box

KNOWN_TAGS: tuple[str, ...] = ("think", "rethink", "answer")
"""Every stage tag any schema uses; `<rethink>` does not contain `<think>`, so plain find is safe."""

_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
BOX_PATTERN = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")
"""Four non-negative ints or decimals, comma separated, in square brackets (ASCII digits only)."""

_STANDALONE_LETTER = re.compile(r"(?<!\w)([ab])(?!\w)")


def open_tag(tag: str) -> str:
    return f"<{tag}>"


def close_tag(tag: str) -> str:
    return f"</{tag}>"


def first_pair(text: str, tag: str) -> tuple[int, int, int] | None:
    """(start of the opening tag, start of the contents, start of the closing tag) of the first pair.

    The first pair is the first opening tag and the first closing tag after it, so nested or
    repeated tags never make the contents ambiguous.
    """
    start = text.find(open_tag(tag))
    if start < 0:
        return None
    content = start + len(open_tag(tag))
    end = text.find(close_tag(tag), content)
    if end < 0:
        return None
    return start, content, end


def stage_texts(text: str, tags: Iterable[str] = KNOWN_TAGS) -> tuple[tuple[str, ...], dict[str, str]]:
    """The complete tag pairs found (ordered by their opening tag) and each one's unstripped contents."""
    found: list[tuple[int, str]] = []
    contents: dict[str, str] = {}
    for tag in tags:
        pair = first_pair(text, tag)
        if pair is not None:
            start, content, end = pair
            found.append((start, tag))
            contents[tag] = text[content:end]
    return tuple(tag for _, tag in sorted(found)), contents


def parse_boxes(text: str) -> tuple[Box, ...]:
    """Every `[x1, y1, x2, y2]` in `text` whose numbers are finite as floats, in order of appearance.

    A 400-digit number overflows to inf and its box is dropped rather than clamped: a box the
    model cannot have meant should not be scored as if it were at the image border.
    """
    boxes: list[Box] = []
    for match in BOX_PATTERN.finditer(text):
        values = tuple(float(v) for v in match.groups())
        if all(math.isfinite(v) for v in values):
            boxes.append(values)  # type: ignore[arg-type]
    return tuple(boxes)


def has_brackets(text: str) -> bool:
    """True when a `[` is followed somewhere later by a `]` (an attempted box, valid or not).

    Written with find/rfind instead of a regex so that a text of many unclosed `[` stays linear.
    """
    opening = text.find("[")
    return opening >= 0 and text.rfind("]") > opening


def answer_letter(answer_text: str | None) -> str | None:
    """The letter an answer stage names: "a" or "b", or None when it names neither or both.

    After stripping and lower-casing, the answer is that letter when it is exactly "a" or "b";
    otherwise it is the one distinct letter among the *standalone* a/b letters, those with no
    letter, digit or underscore (Unicode-aware) right before or after them. So "(a)", "a.",
    "Answer: b" and "a) anomalous" name one letter, while "a or b" (two letters), "anomalous"
    (no standalone letter) and "ab" name none. Repeating the same letter ("a, a") is still that letter.
    """
    if answer_text is None:
        return None
    pred = answer_text.strip().lower()
    if pred in ("a", "b"):
        return pred
    letters = set(_STANDALONE_LETTER.findall(pred))
    if len(letters) == 1:
        return letters.pop()
    return None


def follows_layout(text: str, schema_tags: tuple[str, ...]) -> bool:
    """The schema's tags each exactly once, in order, and nothing but whitespace outside them.

    Tags of other schemas must not appear at all (an r1 response holding a `<rethink>` is off-format).
    Checked by counting and slicing instead of one big regex so that it stays linear on any input.
    """
    for tag in KNOWN_TAGS:
        expected = 1 if tag in schema_tags else 0
        if text.count(open_tag(tag)) != expected or text.count(close_tag(tag)) != expected:
            return False
    cursor = 0
    for tag in schema_tags:
        start = text.find(open_tag(tag))
        end = text.find(close_tag(tag))
        if start < cursor or end < start + len(open_tag(tag)) or text[cursor:start].strip():
            return False
        cursor = end + len(close_tag(tag))
    return not text[cursor:].strip()
