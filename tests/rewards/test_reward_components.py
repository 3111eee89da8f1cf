"""Every branch of R_cls, R_loc and R_fmt, with the expected numbers worked out by hand."""

from __future__ import annotations

import pytest

from anomaly_rl.models.frame import Frame
from anomaly_rl.rewards.components import (
    giou,
    inside_image,
    iou,
    matched_mean_overlap,
    r_cls,
    r_count,
    r_fmt,
    r_loc,
)

# ---------------------------------------------------------------------------------- IoU / GIoU


def test_iou_and_giou_by_hand() -> None:
    a = (0.0, 0.0, 10.0, 10.0)
    assert iou(a, a) == 1.0 and giou(a, a) == 1.0
    # half overlap: inter 50, union 150 -> 1/3; enclosing [0,15]x[0,10] = 150 = union -> GIoU = IoU
    assert iou(a, (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert giou(a, (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # disjoint with a gap: inter 0, union 200, enclosing [0,30]x[0,10] = 300 -> GIoU = -100/300
    assert iou(a, (20, 0, 30, 10)) == 0.0
    assert giou(a, (20, 0, 30, 10)) == pytest.approx(-1 / 3)
    # contained: inter 25, union 100, enclosing 100 -> 0.25
    assert giou(a, (0, 0, 5, 5)) == pytest.approx(0.25)
    # far apart and tiny relative to the enclosing box: GIoU tends to -1
    assert giou((0, 0, 1, 1), (999, 999, 1000, 1000)) == pytest.approx(-1.0, abs=1e-5)


def test_degenerate_boxes_stay_finite() -> None:
    point = (5.0, 5.0, 5.0, 5.0)
    assert iou(point, point) == 0.0 and giou(point, point) == 0.0  # empty union and enclosing box
    inverted = (10.0, 10.0, 0.0, 0.0)  # corners swapped: no area
    assert iou(inverted, (0, 0, 10, 10)) == 0.0
    assert -1.0 <= giou(inverted, (0, 0, 10, 10)) <= 0.0
    huge = (0.0, 0.0, 1e300, 1e300)  # areas would overflow without clipping
    assert 0.0 <= iou(huge, (0, 0, 10, 10)) < 1e-20
    assert -1.0 <= giou(huge, (0, 0, 10, 10)) <= 1.0
    assert giou((float("inf"), 0, float("inf"), 5), (0, 0, 10, 10)) >= -1.0


# ------------------------------------------------------------------------------------- R_cls


@pytest.mark.parametrize(
    ("pred", "right", "expected"),
    [
        ("a", "a", 1.0),  # exactly the letter
        (" A \n", "a", 1.0),  # stripped and lower-cased first
        ("b", "a", 0.0),  # the wrong letter
        ("(a)", "a", 0.8),  # the letter occurs, 3 chars <= 10
        ("answer: a", "a", 0.8),  # 9 chars
        ("a123456789", "a", 0.8),  # exactly 10 chars: still partial
        ("a1234567890", "a", 0.0),  # 11 chars: too long
        ("the answer is a", "a", 0.0),  # 15 chars
        ("bad", "a", 0.8),  # substring test, as in the paper: "bad" holds both letters
        ("bad", "b", 0.8),
        ("", "b", 0.0),
        ("no", "b", 0.0),  # neither letter in it
    ],
)
def test_r_cls(pred: str, right: str, expected: float) -> None:
    assert r_cls(pred, right) == expected


# ------------------------------------------------------------------------------------- R_loc

T = (0.0, 0.0, 10.0, 10.0)


def test_r_count() -> None:
    # right count / one off either way / two or more off
    assert [r_count(2, 2), r_count(1, 2), r_count(3, 2)] == [1.0, 0.5, 0.5]
    assert [r_count(4, 2), r_count(0, 3)] == [-0.1, -0.1]


@pytest.mark.parametrize(
    ("m", "expected"),
    [(0, 0.0), (1, 0.5), (2, -0.1), (5, -0.1)],  # 0 / one region / more than one
)
def test_r_loc_normal_pays_for_one_region(m: int, expected: float) -> None:
    assert r_loc([T] * m, [], is_anomalous=False) == expected
    assert r_loc([T] * m, [], is_anomalous=True) == expected  # anomalous without annotated boxes: same rule


def test_r_loc_anomalous_without_prediction_is_zero() -> None:
    assert r_loc([], [T], is_anomalous=True) == 0.0


def test_r_loc_one_exact_box_clips_at_one() -> None:
    # GIoU 1, r_count 1: r = 1 + 0.3 = 1.3; (1.3 + 0.5) / 1.5 = 1.2 -> clipped to 1
    assert r_loc([T], [T], True) == 1.0


def test_r_loc_one_to_one_partial() -> None:
    # pred [0,0,10,10] vs true [0,0,10,20]: inter 100, union 200, enclosing 200 -> GIoU 0.5
    # r = 0.5 + 0.3 * 1 = 0.8; (0.8 + 0.5) / 1.5 = 0.866...
    assert r_loc([T], [(0, 0, 10, 20)], True) == pytest.approx(1.3 / 1.5)


def test_r_loc_one_to_one_disjoint_negative_giou() -> None:
    # pred [0,0,10,10] vs true [20,0,30,10]: GIoU = 0 - (300 - 200)/300 = -1/3
    # r = -1/3 + 0.3 = -0.0333...; (r + 0.5) / 1.5 = 0.3111...
    assert r_loc([T], [(20, 0, 30, 10)], True) == pytest.approx((-1 / 3 + 0.3 + 0.5) / 1.5)
    assert r_loc([T], [(20, 0, 30, 10)], True) == pytest.approx(0.311111, abs=1e-6)


def test_r_loc_two_predicted_one_true() -> None:
    # the exact box matches (GIoU 1), the extra one is unmatched and counts 0: mean over m=2 -> 0.5
    # |2 - 1| = 1 -> r_count 0.5; r = 0.5 + 0.15 = 0.65; (0.65 + 0.5) / 1.5 = 0.7666...
    assert r_loc([T, (50, 50, 60, 60)], [T], True) == pytest.approx(1.15 / 1.5)


def test_r_loc_one_predicted_three_true() -> None:
    # the single box matches its exact partner: mean over m=1 -> 1; |1 - 3| = 2 -> r_count -0.1
    # r = 1 - 0.03 = 0.97; (0.97 + 0.5) / 1.5 = 0.98
    truths = [(50, 50, 60, 60), T, (0, 50, 10, 60)]
    assert r_loc([T], truths, True) == pytest.approx(0.98)


def test_r_loc_hungarian_beats_greedy_matching() -> None:
    # Height-10 boxes, so every ratio is a ratio of x-lengths. True T1=[0,10], T2=[10,20];
    # P1=[1,18]: vs T1 inter 9, union 18, encl 18 -> 0.5;  vs T2 inter 8, union 19, encl 19 -> 8/19
    # P2=[0,4]:  vs T1 inter 4, union 10, encl 10 -> 0.4;  vs T2 inter 0, union 14, encl 20 -> -0.3
    # Greedy (best pair first) takes P1-T1 + P2-T2 = 0.2; Hungarian takes P1-T2 + P2-T1 = 8/19 + 0.4.
    # mean = (8/19 + 0.4) / 2 = 0.410526; r = 0.410526 + 0.3 = 0.710526; R = 1.210526 / 1.5 = 0.807018
    pred = [(1, 0, 18, 10), (0, 0, 4, 10)]
    true = [(0, 0, 10, 10), (10, 0, 20, 10)]
    assert matched_mean_overlap(pred, true) == pytest.approx((8 / 19 + 0.4) / 2)
    assert r_loc(pred, true, True) == pytest.approx(0.807018, abs=1e-6)


def test_r_loc_clips_at_zero() -> None:
    # one far box, three true boxes: best GIoU is [90,90,100,100] vs [10,0,20,10]:
    # union 200, enclosing [10,100]x[0,100] = 9000 -> -8800/9000 = -0.97778;
    # r = -0.97778 + 0.3 * (-0.1) = -1.00778 -> (r + 0.5) / 1.5 < 0 -> clipped to 0
    truths = [T, (0, 10, 10, 20), (10, 0, 20, 10)]
    assert matched_mean_overlap([(90, 90, 100, 100)], truths) == pytest.approx(-8800 / 9000)
    assert r_loc([(90, 90, 100, 100)], truths, True) == 0.0


def test_r_loc_boxes_outside_the_image_are_scored_as_boxes() -> None:
    # pred [90,90,110,110] (beyond a 100x100 image) vs true [90,90,100,100]: inter 100, union 400,
    # enclosing 400 -> GIoU 0.25; r = 0.55; (0.55 + 0.5) / 1.5 = 0.7. R_fmt is what penalises "outside".
    assert r_loc([(90, 90, 110, 110)], [(90, 90, 100, 100)], True) == pytest.approx(0.7)


# ------------------------------------------------------------------------------------- R_fmt

SIZE = (100, 100)
BOX = ((10.0, 10.0, 20.0, 20.0),)


def fmt(region="Region [10, 10, 20, 20]", exam="Looks like a crack.", answer="a", boxes=BOX, brackets=True):
    return r_fmt(region, exam, answer, boxes, brackets, SIZE)


def test_r_fmt_maximum_is_1_2() -> None:
    # 0.3 + 0.1 (region > 10 chars) + 0.2 + 0.1 (exam > 10) + 0.2 (exact answer) + 0.2 + 0.1 (box inside)
    assert fmt() == 1.2


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"region": None, "boxes": (), "brackets": False}, 0.5),  # no region stage: 0.3 + 0.2 left
        ({"region": "  \n "}, 0.8),  # whitespace only = empty: -0.4 (boxes passed in still count)
        ({"region": "[1,1,2,2]"}, 1.1),  # 9 chars: non-empty (+0.3) but not longer than 10
        ({"region": "0123456789"}, 1.1),  # exactly 10: no bonus
        ({"region": "0123456789x"}, 1.2),  # 11: bonus
        ({"exam": None}, 0.9),  # no examination stage
        ({"exam": ""}, 0.9),
        ({"exam": "crack"}, 1.1),  # short: +0.2 only
        ({"answer": " B "}, 1.2),  # exact after strip/lower (the letter's correctness is R_cls's job)
        ({"answer": "(a)"}, 1.1),  # contains a letter: +0.1
        ({"answer": "maybe"}, 1.1),  # "maybe" contains both a and b
        ({"answer": "yes"}, 1.0),  # neither letter
        ({"answer": None}, 1.0),  # no answer stage: nothing
        ({"boxes": ((10.0, 10.0, 120.0, 20.0),)}, 1.1),  # a box, but outside the image: +0.2 only
        ({"boxes": ((0.0, 0.0, 100.0, 100.0),)}, 1.2),  # on the border is inside
        ({"boxes": (), "brackets": True}, 1.0),  # only brackets: +0.1 instead of +0.3
        ({"boxes": (), "brackets": False}, 0.9),  # nothing: 0
    ],
)
def test_r_fmt_branches(kwargs: dict, expected: float) -> None:
    assert fmt(**kwargs) == pytest.approx(expected)


def test_r_fmt_minimum_is_zero() -> None:
    assert r_fmt(None, None, None, (), False, SIZE) == 0.0


def test_inside_image_tolerates_frame_round_trip_error() -> None:
    frame = Frame((900, 700), (112, 84))
    edge = frame.to_original([(0.0, 0.0, 112.0, 84.0)])
    assert inside_image(edge, (900, 700))
    assert not inside_image([(0.0, 0.0, 901.0, 700.0)], (900, 700))
    assert not inside_image([(0.0, float("nan"), 1.0, 1.0)], (900, 700))
    assert not inside_image([(0.0, 0.0, float("inf"), 1.0)], (900, 700))


def test_r_loc_plain_iou_drops_the_enclosing_box_term() -> None:
    # The lever loc_overlap="iou". Disjoint pred [0,0,10,10] vs true [20,0,30,10]: IoU 0 (GIoU -1/3),
    # so r = 0 + 0.3 = 0.3 -> (0.3 + 0.5) / 1.5 = 0.5333...; farther away earns the same (GIoU: less).
    near, far = (20, 0, 30, 10), (200, 0, 210, 10)
    assert r_loc([T], [near], True, overlap="iou") == pytest.approx(0.8 / 1.5)
    assert r_loc([T], [far], True, overlap="iou") == pytest.approx(0.8 / 1.5)
    assert r_loc([T], [far], True) < r_loc([T], [near], True)
    # pred [0,0,10,10] vs true [0,0,10,20]: IoU 0.5 = GIoU (the enclosing box is the union): same reward
    assert r_loc([T], [(0, 0, 10, 20)], True, overlap="iou") == pytest.approx(r_loc([T], [(0, 0, 10, 20)], True))
    # two predicted, two true, matched one-to-one on IoU: T exact (1) + [50,50,60,60] vs [55,50,65,60]
    # (inter 50, union 150 -> 1/3): mean 2/3; r = 2/3 + 0.3 -> (0.9667 + 0.5) / 1.5
    pred, true = [T, (50, 50, 60, 60)], [(55, 50, 65, 60), T]
    assert r_loc(pred, true, True, overlap="iou") == pytest.approx((2 / 3 + 0.3 + 0.5) / 1.5)
    with pytest.raises(ValueError, match="overlap"):
        r_loc([T], [T], True, overlap="diou")  # type: ignore[arg-type]
