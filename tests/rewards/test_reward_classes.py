"""The reward classes: their arrays, weights, bounds, and the baselines' rules by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from anomaly_rl.data.records import Sample
from anomaly_rl.rewards.adfm import AdfmReward
from anomaly_rl.rewards.base import Reward
from anomaly_rl.rewards.binary import BinaryReward
from anomaly_rl.rewards.decision import reasoning_decision
from anomaly_rl.rewards.iou import IouReward
from anomaly_rl.rewards.roam import RoamReward, roam_score
from anomaly_rl.schemas.base import Schema

CONF = Path(__file__).resolve().parents[2] / "conf"
ALL = [AdfmReward(), BinaryReward(), RoamReward(), IouReward()]

GOOD = "<think>Look at [10, 20, 30, 40].</think><rethink>A scratch defect.</rethink><answer>a</answer>"


def test_hydra_group_instantiates_each_reward() -> None:
    GlobalHydra.instance().clear()
    classes = {"adfm": AdfmReward, "binary": BinaryReward, "roam": RoamReward, "iou": IouReward}
    with initialize_config_dir(config_dir=str(CONF / "reward"), version_base="1.3"):
        for name, cls in classes.items():
            assert type(instantiate(compose(name))) is cls
        weighted = instantiate(compose("adfm", overrides=["w_loc=2.0"]))
        assert weighted.weights == {"cls": 1.0, "loc": 2.0, "fmt": 1.0}
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("reward", ALL, ids=lambda r: type(r).__name__)
def test_arrays_keys_and_bounds(
    reward: Reward, schemas: dict[str, Schema], sample_builder: Callable[..., Sample]
) -> None:
    samples = [sample_builder(), sample_builder(label="normal"), sample_builder()]
    parsed = [schemas["adfm"].parse(t) for t in (GOOD, GOOD, "garbage")]
    values = reward(parsed, samples)
    assert set(values) == set(reward.bounds) and "total" in values
    assert reward.classification_key in values and reward.classification_key != "total"
    for key, array in values.items():
        assert array.dtype == np.float64 and array.shape == (3,)
        low, high = reward.bounds[key]
        assert np.all((array >= low) & (array <= high)), key
    empty = reward([], [])
    assert all(v.shape == (0,) for v in empty.values())
    with pytest.raises(ValueError, match="2 responses for 1 samples"):
        reward(parsed[:2], samples[:1])


def test_adfm_total_is_the_weighted_sum(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    samples = [sample_builder(), sample_builder(label="normal")]
    parsed = [schemas["adfm"].parse(GOOD)] * 2
    plain = AdfmReward()(parsed, samples)
    # anomalous: exact box and letter -> cls 1, loc 1, fmt 1.2; normal: wrong letter "a" -> cls 0,
    # one box -> loc 0.5, fmt 1.2
    np.testing.assert_allclose(plain["cls"], [1.0, 0.0])
    np.testing.assert_allclose(plain["loc"], [1.0, 0.5])
    np.testing.assert_allclose(plain["fmt"], [1.2, 1.2])
    np.testing.assert_allclose(plain["total"], [3.2, 1.7])
    weighted = AdfmReward(w_cls=2.0, w_loc=0.5, w_fmt=0.0)(parsed, samples)
    np.testing.assert_allclose(weighted["total"], [2.0 + 0.5, 0.25])
    assert AdfmReward().bounds["total"] == pytest.approx((-0.1, 3.2))
    assert AdfmReward(w_loc=-1.0).bounds["total"] == pytest.approx((-1.0, 2.3))


def test_adfm_loc_overlap_iou(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    # GOOD's box [10,20,30,40] against a far defect [60,60,70,70]: GIoU = 0 - (3000 - 500) / 3000 = -5/6,
    # r = -5/6 + 0.3 -> clip((r + 0.5) / 1.5) = 0; plain IoU 0 -> r = 0.3 -> 0.8 / 1.5
    samples = [sample_builder(boxes=((60.0, 60.0, 70.0, 70.0),))]
    parsed = [schemas["adfm"].parse(GOOD)]
    assert AdfmReward()(parsed, samples)["loc"][0] == 0.0
    assert AdfmReward(loc_overlap="iou")(parsed, samples)["loc"][0] == pytest.approx(0.8 / 1.5)
    with pytest.raises(ValueError, match="reward.loc_overlap"):
        AdfmReward(loc_overlap="diou")  # type: ignore[arg-type]


def test_adfm_cls_reads_the_whole_response_without_answer_tag(
    schemas: dict[str, Schema], sample_builder: Callable
) -> None:
    parsed = [schemas["adfm"].parse(t) for t in ("a", " (a) ", "<think>x</think> a", "<answer>a</answer>")]
    values = AdfmReward()(parsed, [sample_builder()] * 4)
    # "a" exact; "(a)" partial; the whole 18-char response holds "a" but is too long; tagged exact
    np.testing.assert_allclose(values["cls"], [1.0, 0.8, 0.0, 1.0])
    np.testing.assert_allclose(values["fmt"], [0.0, 0.0, 0.3, 0.2])  # no answer stage -> no answer points


def test_weights_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        AdfmReward(w_cls=float("nan"))


def test_binary(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    texts = [GOOD, "<answer>a</answer>", "<think>[1, 1, 2, 2]</think><rethink></rethink><answer>b</answer>"]
    values = BinaryReward()([schemas["adfm"].parse(t) for t in texts], [sample_builder()] * 3)
    np.testing.assert_allclose(values["accuracy"], [1, 1, 0])
    np.testing.assert_allclose(values["format"], [1, 0, 1])
    np.testing.assert_allclose(values["total"], [2, 1, 1])


def test_iou_reward_best_box_and_normal_images(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    two_boxes = "<think>[0, 0, 5, 5] [10, 20, 30, 50]</think><rethink>x</rethink><answer>a</answer>"
    texts = [two_boxes, "<answer>a</answer>", GOOD, GOOD]
    samples = [sample_builder(), sample_builder(), sample_builder(label="normal"), sample_builder(boxes=())]
    values = IouReward()([schemas["adfm"].parse(t) for t in texts], samples)
    # best box [10,20,30,50] vs true [10,20,30,40]: inter 400, union 600 -> 2/3; the other box adds nothing
    np.testing.assert_allclose(values["iou"], [2 / 3, 0.0, 0.0, 0.0])  # no box; normal; no true box
    np.testing.assert_allclose(values["accuracy"], [1, 1, 0, 1])
    np.testing.assert_allclose(values["total"], [1 + 2 / 3, 1, 0, 1])


@pytest.mark.parametrize(
    ("text", "decision"),
    [
        ("There is a scratch defect.", "a"),
        ("The surface is damaged.", "a"),
        ("Anomalous texture.", "a"),
        ("It looks abnormal.", "a"),  # not "normal"
        ("The bottle looks normal.", "b"),
        ("No defect is visible.", "b"),  # not "defect"
        ("no visible defects", "b"),
        ("It is defect-free and intact.", "b"),
        ("Nothing abnormal here.", "b"),
        ("It is not defective.", "b"),
        ("without any anomalies", "b"),
        ("A defect? No, on closer look it is normal.", "b"),  # the last cue decides
        ("It seemed normal, but there is a crack defect.", "a"),
        ("So the answer is a.", "a"),
        ("Answer: (b)", "b"),
        ("option b", "b"),
        ("The metal nut, seen from above.", None),
        ("", None),
        (None, None),
        ("normally fine", None),  # "normally" is not the word "normal"
    ],
)
def test_reasoning_decision(text: str | None, decision: str | None) -> None:
    assert reasoning_decision(text) == decision


@pytest.mark.parametrize(
    ("reasoning", "answer", "right", "expected"),
    [
        ("a scratch defect", "a", "a", 1.0),  # both right
        ("it looks normal", "b", "b", 1.0),
        ("the image", "a", "a", 0.8),  # no decision, answer right
        ("the image", "b", "a", 0.05),  # no decision, answer wrong
        ("the image", None, "a", 0.05),  # no decision, no answer
        (None, "a", "a", 0.8),  # no reasoning stage at all (direct schema)
        ("it looks normal", "b", "a", 0.1),  # both wrong, agreeing
        ("a scratch defect", "b", "a", 0.0),  # reasoning right, answer wrong
        ("it looks normal", "a", "a", 0.0),  # reasoning wrong, answer right
        ("a scratch defect", None, "a", 0.0),  # reasoning decides, answer names no letter
    ],
)
def test_roam_score(reasoning: str | None, answer: str | None, right: str, expected: float) -> None:
    assert roam_score(reasoning, answer, right) == expected


def test_roam_reward_reads_think_then_rethink(schemas: dict[str, Schema], sample_builder: Callable) -> None:
    texts = [
        "<think>Defect at [1, 1, 2, 2]?</think><rethink>No, it looks normal.</rethink><answer>b</answer>",
        "<think>It looks normal.</think><answer>(a)</answer>",
    ]
    parsed = [schemas["adfm"].parse(texts[0]), schemas["r1"].parse(texts[1])]
    values = RoamReward()(parsed, [sample_builder(label="normal"), sample_builder()])
    # 1: the rethink's "normal" is the last cue, answer b right -> 1.0
    # 2: reasoning says normal (wrong), answer "(a)" names a (right) -> they disagree -> 0
    np.testing.assert_allclose(values["roam"], [1.0, 0.0])
    np.testing.assert_allclose(values["accuracy"], [1.0, 0.0])  # "(a)" is not exactly "a"
    np.testing.assert_allclose(values["total"], values["roam"])
