"""SFT targets: valid, varied, boxes in the model frame on the grid, and the token lower bound."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

from anomaly_rl.data.records import Sample
from anomaly_rl.models.frame import Frame
from anomaly_rl.schemas.base import Schema, SchemaConfigError, readable
from anomaly_rl.schemas.config import SCHEMA_NAMES, load_schema
from anomaly_rl.schemas.rendering import snap_box, whole_image_box


def render(schema: Schema, sample: Sample, seed: int = 0, grid: int = 1, model_size=None) -> str:
    model_size = model_size or sample.image_size
    boxes = Frame(sample.image_size, model_size).to_model(sample.boxes)
    return schema.render(sample, boxes, random.Random(seed), grid, model_size=model_size)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
@pytest.mark.parametrize("label", ["anomalous", "normal"])
def test_rendered_targets_follow_the_schema(
    schemas: dict[str, Schema], sample_builder: Callable[..., Sample], name: str, label: str
) -> None:
    sample = sample_builder(label=label)
    for seed in range(20):
        parsed = schemas[name].parse(render(schemas[name], sample, seed))
        assert parsed.follows_schema
        assert parsed.answer == sample.answer_letter


def test_adfm_boxes_are_the_model_frame_boxes(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    sample = sample_builder(boxes=((90.0, 70.0, 450.0, 350.0), (0.0, 0.0, 900.0, 700.0)), size=(900, 700))
    parsed = schemas["adfm"].parse(render(schemas["adfm"], sample, model_size=(112, 84)))
    # 900 x 700 -> 112 x 84: x * 112/900, y * 84/700, rounded to integers
    assert parsed.boxes == ((11.0, 8.0, 56.0, 42.0), (0.0, 0.0, 112.0, 84.0))


@pytest.mark.parametrize("seed", range(5))
def test_normal_region_is_exactly_one_whole_image_box(
    schemas: dict[str, Schema], sample_builder: Callable[..., Sample], seed: int
) -> None:
    sample = sample_builder(label="normal", size=(640, 480))
    parsed = schemas["adfm"].parse(render(schemas["adfm"], sample, seed, model_size=(112, 84)))
    assert parsed.boxes == ((0.0, 0.0, 112.0, 84.0),)  # deterministic: the same for every seed


def test_anomalous_without_boxes_names_the_whole_image(schemas: dict[str, Schema], sample_builder) -> None:
    sample = sample_builder(boxes=())
    parsed = schemas["adfm"].parse(render(schemas["adfm"], sample))
    assert parsed.boxes == ((0.0, 0.0, 100.0, 80.0),) and parsed.answer == "a"


@pytest.mark.parametrize("name", ["adfm", "r1"])
def test_wording_varies_across_draws(schemas: dict[str, Schema], sample_builder: Callable, name: str) -> None:
    for label in ("anomalous", "normal"):
        texts = {render(schemas[name], sample_builder(label=label), seed) for seed in range(30)}
        assert len(texts) >= 3
    assert render(schemas[name], sample_builder(), 7) == render(schemas[name], sample_builder(), 7)


def test_examination_describes_the_defect_or_its_absence(schemas: dict[str, Schema], sample_builder) -> None:
    for seed in range(30):
        anomalous = schemas["adfm"].parse(render(schemas["adfm"], sample_builder(), seed))
        assert readable("scratch_head") in anomalous.rethink
        normal = schemas["adfm"].parse(render(schemas["adfm"], sample_builder(label="normal"), seed))
        assert re.search(r"nothing abnormal|looks normal|no defect", normal.rethink, re.IGNORECASE)
        r1 = schemas["r1"].parse(render(schemas["r1"], sample_builder(), seed))
        assert "scratch head" in r1.think


@pytest.mark.parametrize("grid", [1, 4, 8, 16])
def test_grid_rounding_stays_on_grid_and_inside(grid: int) -> None:
    rng = random.Random(grid)
    for _ in range(300):
        size = (rng.randint(20, 300), rng.randint(20, 300))
        x1, x2 = sorted(rng.uniform(-10, size[0] + 10) for _ in range(2))
        y1, y2 = sorted(rng.uniform(-10, size[1] + 10) for _ in range(2))
        box = snap_box((x1, y1, x2, y2), size, grid)
        assert all(v % grid == 0 for v in box)
        assert 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]  # never collapses
        assert abs(box[0] - min(max(x1, 0), size[0])) <= 2 * grid  # rounding, edge limit, widening


def test_grid_rounding_by_hand() -> None:
    assert snap_box((3.4, 4.5, 12.0, 13.9), (100, 100), 1) == (3, 5, 12, 14)  # half up, not banker's
    assert snap_box((3.9, 9.0, 12.1, 20.0), (100, 100), 8) == (0, 8, 16, 24)
    assert snap_box((50.0, 50.0, 51.0, 51.0), (100, 100), 8) == (48, 48, 56, 56)  # widened by a cell
    assert snap_box((98.0, 0.0, 100.0, 3.0), (100, 100), 8) == (88, 0, 96, 8)  # 96: last multiple <= 100
    assert whole_image_box((100, 60), 8) == (0, 0, 96, 56)
    assert whole_image_box((112, 84), 1) == (0, 0, 112, 84)
    with pytest.raises(ValueError, match="box_grid"):
        snap_box((0, 0, 1, 1), (10, 10), 0)


def test_render_with_grid_writes_grid_coordinates(schemas: dict[str, Schema], sample_builder) -> None:
    parsed = schemas["adfm"].parse(render(schemas["adfm"], sample_builder(), grid=8))
    assert parsed.boxes == ((8.0, 24.0, 32.0, 40.0),)  # (10, 20, 30, 40) on the 8-px grid, 20 -> 24 (half up)


def test_render_refuses_boxes_that_do_not_match_the_sample(
    schemas: dict[str, Schema], sample_builder
) -> None:
    with pytest.raises(ValueError, match="Frame.to_model"):
        schemas["adfm"].render(sample_builder(), (), random.Random(0), model_size=(100, 80))
    with pytest.raises(ValueError, match="Frame.to_model"):
        schemas["adfm"].render(
            sample_builder(label="normal"), ((1, 1, 2, 2),), random.Random(0), model_size=(9, 9)
        )


# The shortest responses that follow each schema, and the structural units min_new_tokens counts.
MINIMAL = {
    "adfm": "<think>[0,0,0,0]</think><rethink></rethink><answer>a</answer>",
    "r1": "<think></think><answer>a</answer>",
    "direct": "<answer>a</answer>",
}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_min_new_tokens_is_the_structure_of_the_shortest_valid_response(
    schemas: dict[str, Schema], sample_builder: Callable, name: str
) -> None:
    schema = schemas[name]
    assert schema.parse(MINIMAL[name]).follows_schema
    units = re.findall(r"</?\w+>|\d+|[ab]", MINIMAL[name])
    assert schema.min_new_tokens == len(units)
    assert {"adfm": 11, "r1": 5, "direct": 3}[name] == schema.min_new_tokens
    for label in ("anomalous", "normal"):  # a lower bound: no valid response has fewer bytes
        assert len(render(schema, sample_builder(label=label)).encode()) >= schema.min_new_tokens


def test_compact_box_separator_parses_the_same(sample_builder: Callable[..., Sample]) -> None:
    compact = load_schema("adfm", box_separator=",")
    sample = sample_builder(boxes=((10, 20, 30, 40), (50, 10, 70, 30)))
    text = render(compact, sample)
    assert "[10,20,30,40], [50,10,70,30]" in text
    assert compact.parse(text).boxes == ((10, 20, 30, 40), (50, 10, 70, 30))
    with pytest.raises(SchemaConfigError, match="schema.box_separator"):
        type(compact)(
            style="short", styles=compact.styles, render=compact.render_templates, box_separator=";"
        )
