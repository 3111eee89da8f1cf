"""Property tests: any text parses, every reward is finite and in bounds, Hungarian is optimal."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_rl.data.records import Sample
from anomaly_rl.models.frame import Frame
from anomaly_rl.rewards.adfm import AdfmReward
from anomaly_rl.rewards.binary import BinaryReward
from anomaly_rl.rewards.components import matched_mean_overlap, r_loc
from anomaly_rl.rewards.iou import IouReward
from anomaly_rl.rewards.roam import RoamReward
from anomaly_rl.schemas.config import SCHEMA_NAMES, load_schema
from anomaly_rl.schemas.parsed import ParsedResponse

SCHEMAS = {name: load_schema(name) for name in SCHEMA_NAMES}
REWARDS = [AdfmReward(), BinaryReward(), RoamReward(), IouReward(), AdfmReward(w_cls=2, w_loc=-1, w_fmt=0.5)]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TAGS = ["<think>", "</think>", "<rethink>", "</rethink>", "<answer>", "</answer>", "<think", "answer>"]
WORDS = [
    "a",
    "b",
    " A ",
    "(a)",
    "\n",
    " ",
    ",",
    "[",
    "]",
    "-",
    ".",
    "defect",
    "no defect",
    "normal",
    "🙂",
    "\x00",
]
numbers = st.one_of(
    st.integers(0, 10**6).map(str),
    st.integers(0, 10**500).map(str),  # beyond float range: inf
    st.floats(0, 1e308, allow_nan=False).map(lambda v: f"{v:.3f}"),
    st.sampled_from(["1e5", "-3", ".5", "5.", "inf", "nan", "١"]),
)
boxes_text = st.lists(numbers, min_size=3, max_size=5).map(lambda ns: "[" + ", ".join(ns) + "]")
fragments = st.one_of(st.sampled_from(TAGS + WORDS), numbers, boxes_text, st.text(max_size=8))
texts = st.one_of(st.text(max_size=200), st.lists(fragments, max_size=40).map("".join))


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    width, height = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
    label = draw(st.sampled_from(["anomalous", "normal"]))
    boxes = []
    if label == "anomalous":
        for _ in range(draw(st.integers(0, 3))):
            x1, x2 = sorted(draw(st.floats(0, width)) for _ in range(2))
            y1, y2 = sorted(draw(st.floats(0, height)) for _ in range(2))
            boxes.append((x1, y1, x2, y2))
    return Sample("x.png", label, "pill", "crack", None, tuple(boxes), (width, height), "test")


def check_parsed(parsed: ParsedResponse, text: str, name: str) -> None:
    schema = SCHEMAS[name]
    assert parsed.text == text
    assert parsed.answer in ("a", "b", None)
    if parsed.answer_text is None:
        assert parsed.answer is None
    assert all(math.isfinite(v) and v >= 0 for box in parsed.boxes for v in box)
    assert all(len(box) == 4 for box in parsed.boxes)
    if parsed.boxes:
        assert parsed.region_has_brackets
    assert set(parsed.tags) <= {"think", "rethink", "answer"} and len(set(parsed.tags)) == len(parsed.tags)
    if parsed.follows_schema:
        assert parsed.tags == schema.tags
        assert parsed.answer_text is not None and parsed.answer == parsed.answer_text.strip().lower()
        assert bool(parsed.boxes) or not schema.requires_box


@PROPERTY
@given(text=texts)
def test_parser_never_raises_and_is_consistent(text: str) -> None:
    for name, schema in SCHEMAS.items():
        check_parsed(schema.parse(text), text, name)


@PROPERTY
@given(
    items=st.lists(
        st.tuples(texts, samples(), st.integers(1, 1000), st.integers(1, 1000)), min_size=1, max_size=6
    )
)
def test_every_reward_is_finite_and_within_bounds(items: list) -> None:
    for name, schema in SCHEMAS.items():
        parsed = []
        for text, sample, mw, mh in items:
            response = schema.parse(text)
            frame = Frame(sample.image_size, (mw, mh))  # to_original may overflow huge numbers to inf
            parsed.append(response.with_boxes(frame.to_original(response.boxes)))
        sample_list = [item[1] for item in items]
        for reward in REWARDS:
            values = reward(parsed, sample_list)
            assert set(values) == set(reward.bounds)
            for key, array in values.items():
                low, high = reward.bounds[key]
                assert array.shape == (len(items),) and np.all(np.isfinite(array)), (name, key, array)
                assert np.all(array >= low - 1e-12) and np.all(array <= high + 1e-12), (name, key, array)


def reference_giou(a: tuple, b: tuple) -> float:
    """Pure-Python GIoU, written independently of the numpy version."""

    def area(box: tuple) -> float:
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    hull = area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    iou = inter / union if union > 0 else 0.0
    return iou - (hull - union) / hull if hull > 0 else iou


def reference_mean_giou(pred: list, true: list) -> float:
    """Best total GIoU over every one-to-one assignment, divided by the number of predicted boxes."""
    k = min(len(pred), len(true))
    best = max(
        sum(reference_giou(pred[r], true[c]) for r, c in zip(rows, cols, strict=True))
        for rows in itertools.permutations(range(len(pred)), k)
        for cols in itertools.permutations(range(len(true)), k)
    )
    return best / len(pred)


def reference_r_loc(pred: list, true: list) -> float:
    """R_loc of an anomalous image, from the spec's words."""
    m, n = len(pred), len(true)
    if n == 0:
        return {0: 0.0, 1: 0.5}.get(m, -0.1)
    if m == 0:
        return 0.0
    count = 1.0 if m == n else 0.5 if abs(m - n) == 1 else -0.1
    r = reference_mean_giou(pred, true) + 0.3 * count
    return min(1.0, max(0.0, (r + 0.5) / 1.5))


coords = st.integers(0, 40)
int_boxes = st.tuples(coords, coords, coords, coords).map(lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))


@settings(max_examples=300, deadline=None)
@given(pred=st.lists(int_boxes, max_size=4), true=st.lists(int_boxes, max_size=4))
def test_r_loc_matches_brute_force_assignment(pred: list, true: list) -> None:
    assert math.isclose(r_loc(pred, true, is_anomalous=True), reference_r_loc(pred, true), abs_tol=1e-9)
    if pred and true:
        assert math.isclose(matched_mean_overlap(pred, true), reference_mean_giou(pred, true), abs_tol=1e-9)
