"""A rendered SFT target, parsed and scored, earns the highest reward its schema can get.

The full round trip of training: boxes go original -> model frame (Frame.to_model) -> rendered
text -> parsed -> original frame (Frame.to_original) -> reward.
"""

from __future__ import annotations

import random

import pytest

from anomaly_rl.data.records import Sample
from anomaly_rl.models.frame import Frame
from anomaly_rl.rewards.adfm import AdfmReward
from anomaly_rl.rewards.base import Reward
from anomaly_rl.rewards.binary import BinaryReward
from anomaly_rl.rewards.iou import IouReward
from anomaly_rl.rewards.roam import RoamReward
from anomaly_rl.schemas.base import Schema


def build_sample(label="anomalous", boxes=((10.0, 20.0, 30.0, 40.0),), size=(100, 80)) -> Sample:
    defect = "good" if label == "normal" else "broken_small"
    return Sample("img.png", label, "metal_nut", defect, None, tuple(boxes), size, "train")


IDENTITY = [
    ("normal", build_sample(label="normal"), None),
    ("one box", build_sample(), None),
    ("two overlapping", build_sample(boxes=((10, 10, 40, 40), (30, 30, 60, 70))), None),
    ("three boxes", build_sample(boxes=((0, 0, 10, 10), (50, 5, 90, 30), (20, 60, 35, 79))), None),
    ("border box", build_sample(boxes=((0, 0, 100, 80),)), None),
    ("anomalous without boxes", build_sample(boxes=()), None),
]
SCALED = [  # a 900 x 700 original seen by the model at 112 x 84
    ("scaled normal", build_sample(label="normal", size=(900, 700)), (112, 84)),
    (
        "scaled boxes",
        build_sample(boxes=((90, 70, 450, 350), (600, 400, 880, 690)), size=(900, 700)),
        (112, 84),
    ),
]
CASES = IDENTITY + SCALED


def scored(schema: Schema, reward: Reward, sample: Sample, model_size, seed: int) -> dict[str, float]:
    frame = Frame(sample.image_size, model_size or sample.image_size)
    text = schema.render(
        sample, frame.to_model(sample.boxes), random.Random(seed), model_size=frame.model_size
    )
    parsed = schema.parse(text)
    assert parsed.follows_schema, text
    parsed = parsed.with_boxes(frame.to_original(parsed.boxes))
    return {k: float(v[0]) for k, v in reward([parsed], [sample]).items()}


def has_true_boxes(sample: Sample) -> bool:
    return sample.is_anomalous and bool(sample.boxes)


@pytest.mark.parametrize(("case", "sample", "model_size"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", range(4))
def test_adfm_target_gets_the_adfm_maximum(
    schemas: dict[str, Schema], case: str, sample: Sample, model_size, seed: int
) -> None:
    values = scored(schemas["adfm"], AdfmReward(), sample, model_size, seed)
    # R_cls max 1; R_fmt max 1.2; R_loc max 1 with true boxes ((1 + 0.3 + 0.5) / 1.5 clipped), and
    # 0.5 where there is nothing to find (one region named), the most R_loc pays there.
    best_loc = 1.0 if has_true_boxes(sample) else 0.5
    assert values["cls"] == 1.0 and values["fmt"] == pytest.approx(1.2) and values["loc"] == best_loc
    assert values["total"] == pytest.approx(2.2 + best_loc)
    if has_true_boxes(sample):
        assert values["total"] == pytest.approx(AdfmReward().bounds["total"][1])


@pytest.mark.parametrize(("case", "sample", "model_size"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", ["adfm", "r1", "direct"])
def test_every_target_gets_the_binary_maximum(
    schemas: dict[str, Schema], case: str, sample: Sample, model_size, name: str
) -> None:
    for seed in range(3):
        values = scored(schemas[name], BinaryReward(), sample, model_size, seed)
        assert values["total"] == BinaryReward().bounds["total"][1] == 2.0


@pytest.mark.parametrize(("case", "sample", "model_size"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", ["adfm", "r1", "direct"])
def test_every_target_gets_the_roam_maximum(
    schemas: dict[str, Schema], case: str, sample: Sample, model_size, name: str
) -> None:
    # The reasoning of adfm and r1 targets implies the right decision: 1.0. The direct schema has
    # no reasoning, and 0.8 (undecided, answer right) is the most it can get.
    best = 0.8 if name == "direct" else 1.0
    for seed in range(6):
        assert scored(schemas[name], RoamReward(), sample, model_size, seed)["total"] == best


@pytest.mark.parametrize(("case", "sample", "model_size"), CASES, ids=[c[0] for c in CASES])
def test_adfm_target_gets_the_iou_maximum(
    schemas: dict[str, Schema], case: str, sample: Sample, model_size
) -> None:
    values = scored(schemas["adfm"], IouReward(), sample, model_size, 0)
    assert values["accuracy"] == 1.0
    if not has_true_boxes(sample):
        assert values["iou"] == 0.0  # nothing to localise: constant 0 by definition
    elif model_size is None:
        assert values["iou"] == 1.0  # integer boxes in an identity frame are written exactly
    else:
        assert values["iou"] >= 0.95  # integer rounding in the 8x smaller model frame costs a little
