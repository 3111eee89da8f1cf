"""Parsing: stage texts, boxes, the answer letter and the follows_schema verdict, by hand."""

from __future__ import annotations

import pytest

from anomaly_rl.schemas.base import Schema
from anomaly_rl.schemas.parsing import answer_letter, has_brackets, parse_boxes

VALID = {
    "adfm": "<think>Check [1, 2, 3, 4].</think><rethink>Looks fine.</rethink><answer>b</answer>",
    "r1": "<think>Looks fine.</think><answer>b</answer>",
    "direct": "<answer>b</answer>",
}


@pytest.mark.parametrize("name", ["adfm", "r1", "direct"])
def test_valid_response_follows_its_schema(schemas: dict[str, Schema], name: str) -> None:
    parsed = schemas[name].parse(VALID[name])
    assert parsed.follows_schema
    assert parsed.tags == schemas[name].tags
    assert parsed.answer == "b" and parsed.answer_text == "b"


def test_stage_texts_are_the_first_pairs_unstripped(schemas: dict[str, Schema]) -> None:
    text = (
        "<think> one </think><think>two</think><rethink>\nx\n</rethink><answer> a </answer><answer>b</answer>"
    )
    parsed = schemas["adfm"].parse(text)
    assert parsed.think == " one " and parsed.rethink == "\nx\n" and parsed.answer_text == " a "
    assert parsed.answer == "a"
    assert not parsed.follows_schema  # <think> and <answer> appear twice


def test_tags_are_ordered_by_their_opening_tag(schemas: dict[str, Schema]) -> None:
    parsed = schemas["adfm"].parse("<answer>a</answer><rethink>r</rethink><think>t</think>")
    assert parsed.tags == ("answer", "rethink", "think")
    assert not parsed.follows_schema  # right tags, wrong order


def test_nested_and_unclosed_tags(schemas: dict[str, Schema]) -> None:
    parsed = schemas["adfm"].parse("<think><think>[1, 1, 2, 2]</think></think><answer>a")
    assert parsed.think == "<think>[1, 1, 2, 2]"  # first opening tag to the first closing tag after it
    assert parsed.boxes == ((1.0, 1.0, 2.0, 2.0),)
    assert parsed.answer_text is None and parsed.answer is None
    assert parsed.tags == ("think",)
    closing_first = schemas["r1"].parse("</think>x<think>y")
    assert closing_first.think is None and closing_first.tags == ()


def test_rethink_is_not_mistaken_for_think(schemas: dict[str, Schema]) -> None:
    parsed = schemas["adfm"].parse("<rethink>[1, 2, 3, 4]</rethink><answer>a</answer>")
    assert parsed.think is None and parsed.rethink == "[1, 2, 3, 4]"
    assert parsed.boxes == ()  # boxes come from the region stage only
    assert not parsed.region_has_brackets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2, 3, 4]", ((1.0, 2.0, 3.0, 4.0),)),
        ("[1,2,3,4] and [ 5.5 , 6.25,7 ,8 ]", ((1.0, 2.0, 3.0, 4.0), (5.5, 6.25, 7.0, 8.0))),
        ("[0, 0, 0, 0]", ((0.0, 0.0, 0.0, 0.0),)),
        ("[10, 5, 2, 1]", ((10.0, 5.0, 2.0, 1.0),)),  # inverted corners still parse; rewards see no area
        ("[-1, 2, 3, 4]", ()),  # negative: not a box
        ("[1, 2, 3]", ()),
        ("[1, 2, 3, 4, 5]", ()),
        ("(1, 2, 3, 4)", ()),
        ("[1e3, 2, 3, 4]", ()),  # exponent notation is not a plain decimal
        ("[.5, 2, 3, 4]", ()),
        ("[١, 2, 3, 4]", ()),  # non-ASCII digits
        ("[" + "9" * 400 + ", 1, 2, 3]", ()),  # overflows to inf: dropped
        ("[" + "9" * 300 + ", 1, 2, 3]", ((float("9" * 300), 1.0, 2.0, 3.0),)),  # big but finite: kept
    ],
)
def test_parse_boxes(text: str, expected: tuple) -> None:
    assert parse_boxes(text) == expected


def test_boxes_in_r1_think_are_read_and_direct_reads_none(schemas: dict[str, Schema]) -> None:
    assert schemas["r1"].parse("<think>see [1, 2, 3, 4]</think><answer>a</answer>").boxes == ((1, 2, 3, 4),)
    direct = schemas["direct"].parse("<think>see [1, 2, 3, 4]</think><answer>a</answer>")
    assert direct.boxes == () and not direct.region_has_brackets and not direct.follows_schema


@pytest.mark.parametrize(
    ("text", "expected"),
    [("[1, 2]", True), ("x ] [", False), ("[", False), ("[]", True), ("no brackets", False)],
)
def test_has_brackets(text: str, expected: bool) -> None:
    assert has_brackets(text) is expected


def test_region_with_only_brackets(schemas: dict[str, Schema]) -> None:
    parsed = schemas["adfm"].parse("<think>[x1, y1, x2, y2]</think><rethink>r</rethink><answer>a</answer>")
    assert parsed.boxes == () and parsed.region_has_brackets
    assert not parsed.follows_schema  # adfm needs a box


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("a", "a"),
        (" B \n", "b"),
        ("(a)", "a"),
        ("a.", "a"),
        ("Answer: b", "b"),  # the "a" inside "answer" is not standalone
        ("a) anomalous", "a"),
        ("a, a", "a"),  # the same letter twice is still one letter
        ("a or b", None),  # both letters
        ("anomalous", None),  # no standalone letter
        ("ab", None),
        ("a1", None),  # digits count as word characters
        ("a_", None),
        ("éa", None),  # so do non-ASCII letters
        ("", None),
        ("   ", None),
        ("c", None),
        (None, None),
    ],
)
def test_answer_letter(answer: str | None, letter: str | None) -> None:
    assert answer_letter(answer) == letter


@pytest.mark.parametrize(
    ("name", "text", "follows"),
    [
        ("adfm", "  <think>[1, 2, 3, 4]</think>\n<rethink></rethink>\t<answer> A </answer>\n", True),
        ("adfm", "<think>no box</think><rethink>r</rethink><answer>a</answer>", False),
        ("adfm", "x<think>[1, 2, 3, 4]</think><rethink>r</rethink><answer>a</answer>", False),
        ("adfm", "<think>[1, 2, 3, 4]</think>x<rethink>r</rethink><answer>a</answer>", False),
        ("adfm", "<think>[1, 2, 3, 4]</think><rethink>r</rethink><answer>a</answer>.", False),
        ("adfm", "<think>[1, 2, 3, 4]</think><rethink>r</rethink><answer>a.</answer>", False),
        ("adfm", "<think>[1, 2, 3, 4]</think><answer>a</answer>", False),
        ("adfm", "<think>[1, 2, 3, 4]</think><rethink>r</think></rethink><answer>a</answer>", False),
        ("r1", "<think></think><answer>b</answer>", True),
        ("r1", "<think>[1, 2, 3, 4]</think><answer>b</answer>", True),
        ("r1", "<think>x</think><rethink>y</rethink><answer>b</answer>", False),  # another schema's tag
        ("r1", "<answer>b</answer><think>x</think>", False),
        ("r1", "<think>x<answer>b</answer></think>", False),
        ("direct", "<answer>b</answer><answer>b</answer>", False),
        ("direct", "b", False),
        ("direct", "<answer>ab</answer>", False),
    ],
)
def test_follows_schema(schemas: dict[str, Schema], name: str, text: str, follows: bool) -> None:
    assert schemas[name].parse(text).follows_schema is follows


@pytest.mark.parametrize("name", ["adfm", "r1", "direct"])
@pytest.mark.parametrize("text", ["", "   ", "<", "</answer>", "<answer>", "[[[[", "\x00\ud800", "🙂" * 50])
def test_degenerate_inputs_parse(schemas: dict[str, Schema], name: str, text: str) -> None:
    parsed = schemas[name].parse(text)
    assert parsed.text == text and not parsed.follows_schema
    assert parsed.answer is None and parsed.boxes == ()


def test_parse_of_a_long_hostile_text_is_fast(schemas: dict[str, Schema]) -> None:
    import time

    hostile = "<think>" + "[" * 200_000 + "1," * 200_000 + "9" * 100_000 + "<answer>" * 10_000
    start = time.perf_counter()
    for schema in schemas.values():
        schema.parse(hostile)
    assert time.perf_counter() - start < 2.0  # linear-time parsing; a quadratic scan would take minutes
