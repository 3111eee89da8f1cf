"""Prompts: chat structure, image slots, stated size, config-driven wording and its validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from anomaly_rl.data.records import Sample
from anomaly_rl.schemas.adfm import AdfmSchema
from anomaly_rl.schemas.base import Schema, SchemaConfigError
from anomaly_rl.schemas.config import SCHEMA_NAMES, load_schema
from anomaly_rl.schemas.direct import DirectSchema
from anomaly_rl.schemas.r1 import R1Schema

CONF = Path(__file__).resolve().parents[2] / "conf"


def user_text(messages: list[dict]) -> str:
    return messages[1]["content"][-1]["text"]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
@pytest.mark.parametrize("refs", [0, 1, 3])
def test_chat_structure_and_image_slots(
    schemas: dict[str, Schema], sample_builder: Callable[..., Sample], name: str, refs: int
) -> None:
    messages = schemas[name].messages(sample_builder(), (112, 84), num_references=refs)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": messages[0]["content"][0]["text"]}]
    content = messages[1]["content"]
    assert content[: 1 + refs] == [{"type": "image"}] * (1 + refs)  # query first, then references
    assert content[-1]["type"] == "text" and len(content) == refs + 2


@pytest.mark.parametrize("style", ["short", "instruction"])
@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_prompt_states_the_model_frame_question_and_tags(
    sample_builder: Callable[..., Sample], name: str, style: str
) -> None:
    schema = load_schema(name, style=style)
    text = user_text(schema.messages(sample_builder(size=(900, 700)), (112, 84)))
    assert "112" in text and "84" in text and "900" not in text  # the model's frame, not the original
    assert "metal nut" in text  # readable category
    assert "a" in text and "b" in text
    for tag in schema.tags:
        assert f"<{tag}>" in text and f"</{tag}>" in text
    if name == "adfm":
        assert "[x1, y1, x2, y2]" in text


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_references_text_only_with_references(sample_builder: Callable[..., Sample], name: str) -> None:
    schema = load_schema(name, style="instruction")
    alone = user_text(schema.messages(sample_builder(), (112, 112)))
    with_two = user_text(schema.messages(sample_builder(), (112, 112), num_references=2))
    assert with_two.endswith(alone) and len(with_two) > len(alone)
    assert "2" in with_two[: len(with_two) - len(alone)]  # {num_references}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_short_prompts_are_short_and_instruction_prompts_longer(
    sample_builder: Callable[..., Sample], name: str
) -> None:
    def size(style: str) -> int:
        messages = load_schema(name, style=style).messages(sample_builder(), (112, 112))
        return len(messages[0]["content"][0]["text"]) + len(user_text(messages))

    assert size("short") <= 160  # a tiny model pays for every prompt token
    assert size("instruction") > 2 * size("short")


def test_prompt_wording_comes_from_config(sample_builder: Callable[..., Sample]) -> None:
    styles = {"mine": {"system": "S {category}", "user": "U {width} {height}", "references": "R"}}
    schema = AdfmSchema(style="mine", styles=styles, render=load_schema("adfm").render_templates)
    messages = schema.messages(sample_builder(), (64, 32), num_references=1)
    assert messages[0]["content"][0]["text"] == "S metal nut"
    assert user_text(messages) == "R\nU 64 32"


def test_hydra_group_instantiates_each_schema_class() -> None:
    GlobalHydra.instance().clear()
    classes = {"adfm": AdfmSchema, "r1": R1Schema, "direct": DirectSchema}
    with initialize_config_dir(config_dir=str(CONF / "schema"), version_base="1.3"):
        for name, cls in classes.items():
            schema = instantiate(compose(name, overrides=["style=instruction"]))
            assert type(schema) is cls and schema.name == name and schema.style == "instruction"
            assert isinstance(schema.styles, dict)  # plain containers, no config objects inside
    GlobalHydra.instance().clear()


def test_schema_attributes() -> None:
    assert AdfmSchema.tags == ("think", "rethink", "answer") and AdfmSchema.requires_box
    assert R1Schema.tags == ("think", "answer") and not R1Schema.requires_box
    assert DirectSchema.tags == ("answer",) and DirectSchema.region_tag is None


def _styles(**prompt: str) -> dict:
    base = {"system": "s", "user": "u", "references": "r"}
    base.update(prompt)
    return {"short": base}


@pytest.mark.parametrize(
    ("styles", "style", "message"),
    [
        (_styles(user="{colour}"), "short", "schema.styles.short.user: unknown placeholders ['colour']"),
        (_styles(user="{width"), "short", "schema.styles.short.user: malformed"),
        (_styles(system="{0}"), "short", "schema.styles.short.system: placeholders must be names"),
        ({"short": {"system": "s", "user": "u"}}, "short", "missing keys ['references']"),
        (_styles(), "long", "schema.style='long' is not one of"),
        ({}, "short", "schema.styles must map"),
    ],
)
def test_bad_prompt_config_names_the_key(styles: dict, style: str, message: str) -> None:
    with pytest.raises(SchemaConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DirectSchema(style=style, styles=styles)


@pytest.mark.parametrize(
    ("render", "message"),
    [
        ({}, "schema.render.think must map"),
        ({"think": {"anomalous": ["x {boxes}"]}, "rethink": {}}, "schema.render.think.normal must be"),
        ({"think": {"anomalous": "x {boxes}", "normal": ["{boxes}"]}}, "schema.render.think.anomalous must"),
        (
            {"think": {"anomalous": ["no boxes"], "normal": ["{boxes}"]}, "rethink": {}},
            r"schema.render.think.anomalous\[0\] must contain \{boxes\}",
        ),
        (
            {"think": {"anomalous": ["{boxes} {size}"], "normal": ["{boxes}"]}},
            r"schema.render.think.anomalous\[0\]: unknown placeholders",
        ),
        ({"answer": {}}, r"\['answer'\] are not stages"),
    ],
)
def test_bad_render_config_names_the_key(render: dict, message: str) -> None:
    with pytest.raises(SchemaConfigError, match=message):
        AdfmSchema(style="short", styles=_styles(), render=render)


def test_negative_reference_count_is_refused(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    with pytest.raises(ValueError, match="num_references"):
        schemas["adfm"].messages(sample_builder(), (112, 112), num_references=-1)
