"""compute_metrics against independent re-implementations, and COCO AP against pycocotools itself."""

from __future__ import annotations

import contextlib
import io
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.evaluation.metrics import (
    LOC_ACC_THRESHOLDS,
    PredictionError,
    best_match_iou,
    box_iou,
    compute_metrics,
)


def pred(
    label: str,
    answer: str | None,
    p: float,
    boxes: list[list[float]] | None = None,
    pred_boxes: list[list[float]] | None = None,
    category: str = "bottle",
    follows_schema: bool = True,
    name: str = "img.png",
) -> dict[str, Any]:
    return {
        "image_path": name,
        "category": category,
        "label": label,
        "boxes": boxes or [],
        "response": "<answer>x</answer>",
        "answer": answer,
        "pred_boxes": pred_boxes or [],
        "p_anomalous": p,
        "follows_schema": follows_schema,
    }


# ---------- independent re-implementations ----------


def pixel_iou(a: list[int], b: list[int]) -> float:
    """IoU by counting pixel cells, x2/y2 exclusive: shares no arithmetic with box_iou."""
    cells_a = {(x, y) for x in range(a[0], a[2]) for y in range(a[1], a[3])}
    cells_b = {(x, y) for x in range(b[0], b[2]) for y in range(b[1], b[3])}
    union = cells_a | cells_b
    return len(cells_a & cells_b) / len(union) if union else 0.0


def mann_whitney_auroc(scores_pos: list[float], scores_neg: list[float]) -> float:
    wins = 0.0
    for sp in scores_pos:
        for sn in scores_neg:
            wins += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
    return wins / (len(scores_pos) * len(scores_neg))


def reference_image_metrics(preds: list[dict[str, Any]]) -> dict[str, float]:
    tp = fp = tn = fn = 0
    for p in preds:
        truth = p["label"] == "anomalous"
        if p["answer"] is None:
            said_anomalous = not truth  # always wrong
        else:
            said_anomalous = p["answer"] == "a"
        if truth and said_anomalous:
            tp += 1
        elif truth:
            fn += 1
        elif said_anomalous:
            fp += 1
        else:
            tn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    class_recalls = [r for r, n in ((recall, tp + fn), (tn / (tn + fp) if tn + fp else 0.0, tn + fp)) if n]
    pos = [p["p_anomalous"] for p in preds if p["label"] == "anomalous"]
    neg = [p["p_anomalous"] for p in preds if p["label"] == "normal"]
    return {
        "image_Accuracy": (tp + tn) / len(preds),
        "image_Precision": precision,
        "image_Recall": recall,
        "image_F1Score": f1,
        "image_BalancedAccuracy": sum(class_recalls) / len(class_recalls),
        "image_AUROC": mann_whitney_auroc(pos, neg) if pos and neg else math.nan,
        "schema_valid_rate": sum(p["follows_schema"] for p in preds) / len(preds),
    }


def reference_miou(preds: list[dict[str, Any]]) -> float:
    per_image = []
    for p in preds:
        if p["label"] != "anomalous" or not p["boxes"]:
            continue
        best = [max([pixel_iou(t, q) for q in p["pred_boxes"]] + [0.0]) for t in p["boxes"]]
        per_image.append(sum(best) / len(best))
    return sum(per_image) / len(per_image) if per_image else math.nan


def reference_loc_acc(preds: list[dict[str, Any]], threshold: float) -> float:
    """Share of anomalous images with true boxes on which some (predicted, true) pair of boxes has a
    pixel-counted IoU >= threshold: a second implementation of box_LocAcc@t."""
    hits = [
        any(pixel_iou(t, q) >= threshold for t in p["boxes"] for q in p["pred_boxes"])
        for p in preds
        if p["label"] == "anomalous" and p["boxes"]
    ]
    return sum(hits) / len(hits) if hits else math.nan


def random_int_box(rng: random.Random, size: int = 40) -> list[int]:
    x1, y1 = rng.randrange(0, size - 2), rng.randrange(0, size - 2)
    return [x1, y1, rng.randrange(x1 + 1, size), rng.randrange(y1 + 1, size)]


def random_predictions(seed: int, n: int = 40) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(["normal", "anomalous"])
        boxes = [random_int_box(rng) for _ in range(rng.randint(1, 3))] if label == "anomalous" else []
        pred_boxes = [random_int_box(rng) for _ in range(rng.randint(0, 2))]
        out.append(
            pred(
                label,
                rng.choice(["a", "b", None, "a", "b"]),
                rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()]),  # many ties on purpose
                boxes,
                pred_boxes,
                category=rng.choice(["bottle", "cable", "screw"]),
                follows_schema=rng.random() < 0.7,
                name=f"{i}.png",
            )
        )
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


# ---------- compute_metrics vs the references ----------


@pytest.mark.parametrize("seed", range(3))
def test_image_and_iou_metrics_match_references(seed: int) -> None:
    preds = random_predictions(seed)
    metrics = compute_metrics(preds)
    groups = {"overall": preds}
    for cat in {p["category"] for p in preds}:
        groups[cat] = [p for p in preds if p["category"] == cat]
    for scope, subset in groups.items():
        got = metrics["overall"] if scope == "overall" else metrics["per_category"][scope]
        want = reference_image_metrics(subset)
        for key, value in want.items():
            assert same(got[key], value), (scope, key, got[key], value)
        assert same(got["box_mIoU"], reference_miou(subset)), scope
        for t in LOC_ACC_THRESHOLDS:
            assert same(got[f"box_LocAcc@{t}"], reference_loc_acc(subset, t)), (scope, t)
        assert got["n_images"] == len(subset)
        assert got["n_anomalous"] == sum(p["label"] == "anomalous" for p in subset)
        assert got["answer_missing_rate"] == pytest.approx(
            sum(p["answer"] is None for p in subset) / len(subset)
        )
    assert set(metrics["per_category"]) == {p["category"] for p in preds}


def test_none_answer_is_always_wrong() -> None:
    preds = [pred("anomalous", None, 0.9, [[0, 0, 2, 2]]), pred("normal", None, 0.1)]
    m = compute_metrics(preds)["overall"]
    assert m["image_Accuracy"] == 0.0
    assert m["image_Recall"] == 0.0  # the anomalous one counts as a miss
    assert m["image_Precision"] == 0.0  # the normal one counts as a false alarm
    assert m["image_AUROC"] == 1.0  # AUROC uses p_anomalous, not the letter
    assert m["answer_missing_rate"] == 1.0


def test_auroc_with_ties_hand_worked() -> None:
    # positives 0.8, 0.5; negatives 0.5, 0.2: pairs 1 + 1 + 0.5 + 1 = 3.5 of 4
    preds = [
        pred("anomalous", "a", 0.8, [[0, 0, 1, 1]]),
        pred("anomalous", "a", 0.5, [[0, 0, 1, 1]]),
        pred("normal", "b", 0.5),
        pred("normal", "b", 0.2),
    ]
    assert compute_metrics(preds)["overall"]["image_AUROC"] == pytest.approx(0.875)


def test_single_class_gives_nan_auroc_and_a_note() -> None:
    preds = [pred("normal", "b", 0.1, category="x"), pred("normal", "a", 0.7, category="x")]
    metrics = compute_metrics(preds)
    m = metrics["overall"]
    assert math.isnan(m["image_AUROC"])
    assert any("AUROC" in note for note in metrics["notes"])
    assert m["image_BalancedAccuracy"] == pytest.approx(0.5)  # recall of the only class present
    assert math.isnan(m["box_mIoU"]) and math.isnan(m["box_AP"])  # no anomalous image, no true box
    assert math.isnan(m["box_area_true_median"])


# ---------- IoU ----------


def test_iou_hand_worked() -> None:
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no pixel
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0  # a one-pixel box
    assert box_iou((5, 5, 2, 2), (0, 0, 10, 10)) == 0.0  # inverted prediction scores 0
    # two true boxes, one matched perfectly, the other missed: (1 + 0) / 2
    assert best_match_iou([(0, 0, 4, 4), (10, 10, 12, 12)], [(0, 0, 4, 4)]) == 0.5
    assert best_match_iou([(0, 0, 4, 4)], []) == 0.0


def test_miou_per_image_then_over_images() -> None:
    preds = [
        pred("anomalous", "a", 0.9, [[0, 0, 4, 4], [10, 10, 12, 12]], [[0, 0, 4, 4]]),  # image IoU 0.5
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 5]]),  # image IoU 0.5
        pred("anomalous", "b", 0.2, [[0, 0, 10, 10]], []),  # image IoU 0
        pred("normal", "b", 0.1, [], [[0, 0, 50, 50]]),  # not part of mIoU
    ]
    m = compute_metrics(preds)["overall"]
    assert m["box_mIoU"] == pytest.approx(1 / 3)
    assert m["box_IoU50_rate"] == pytest.approx(2 / 3)
    assert m["box_n_scored"] == 3
    # areas on anomalous images only: pred 16, 50; true 16, 4, 100, 100
    assert m["box_area_pred_median"] == pytest.approx(33.0)
    assert m["box_area_true_median"] == pytest.approx(58.0)
    assert m["box_area_true_mean"] == pytest.approx(55.0)


def test_localisation_accuracy_hand_worked() -> None:
    preds = [
        # bottle: IoU 0.5 (50/100), 0.2 (20/100), 0.4 on the second of two defects (40/100), no box
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 5]], name="b1"),
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 2]], name="b2"),
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10], [20, 20, 30, 30]], [[20, 20, 30, 24]], name="b3"),
        pred("anomalous", "b", 0.1, [[0, 0, 10, 10]], [], name="b4"),
        pred("normal", "a", 0.9, [], [[0, 0, 10, 10]], name="b5"),  # not a defective image: not counted
        pred("anomalous", "a", 0.9, [], [[0, 0, 10, 10]], name="b6"),  # no true box: not counted
        # cable: exact (IoU 1), elsewhere (IoU 0)
        pred("anomalous", "a", 0.9, [[0, 0, 4, 4]], [[0, 0, 4, 4]], category="cable", name="c1"),
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[50, 50, 60, 60]], category="cable", name="c2"),
    ]
    metrics = compute_metrics(preds)
    bottle, cable, overall = metrics["per_category"]["bottle"], metrics["per_category"]["cable"], metrics["overall"]
    assert [bottle[f"box_LocAcc@{t}"] for t in (0.1, 0.3, 0.5)] == [3 / 4, 2 / 4, 1 / 4]
    assert [cable[f"box_LocAcc@{t}"] for t in (0.1, 0.3, 0.5)] == [1 / 2, 1 / 2, 1 / 2]
    assert [overall[f"box_LocAcc@{t}"] for t in (0.1, 0.3, 0.5)] == [4 / 6, 3 / 6, 2 / 6]
    # one hit on one of two defects counts for LocAcc, not for the per-image mean IoU
    assert bottle["box_IoU50_rate"] == 1 / 4 and bottle["box_mIoU"] == pytest.approx((0.5 + 0.2 + 0.2 + 0) / 4)


def test_localisation_accuracy_is_nan_without_scored_images() -> None:
    metrics = compute_metrics([pred("normal", "b", 0.1), pred("anomalous", "a", 0.9, [], [[0, 0, 1, 1]], name="x")])
    assert all(math.isnan(metrics["overall"][f"box_LocAcc@{t}"]) for t in LOC_ACC_THRESHOLDS)


def test_anomalous_image_without_true_boxes_is_left_out_of_miou() -> None:
    preds = [
        pred("anomalous", "a", 0.9, [], [[0, 0, 3, 3]]),
        pred("anomalous", "a", 0.9, [[0, 0, 3, 3]], [[0, 0, 3, 3]]),
    ]
    metrics = compute_metrics(preds)
    assert metrics["overall"]["box_mIoU"] == 1.0
    assert any("without true boxes" in n for n in metrics["notes"])


@settings(max_examples=150, deadline=None)
@given(
    a=st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(1, 8), st.integers(1, 8)),
    b=st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(1, 8), st.integers(1, 8)),
)
def test_iou_equals_pixel_count(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    box_a = [a[0], a[1], a[0] + a[2], a[1] + a[3]]
    box_b = [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    got = box_iou(tuple(box_a), tuple(box_b))
    assert got == pytest.approx(pixel_iou(box_a, box_b))
    assert got == pytest.approx(box_iou(tuple(box_b), tuple(box_a)))
    assert 0.0 <= got <= 1.0


# ---------- COCO AP ----------


def pycocotools_ap(
    gt_boxes: list[list[list[float]]], dets: list[tuple[int, list[float], float]]
) -> tuple[float, float]:
    """Straight pycocotools call, written here without the module's helper."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        anns = []
        for img, boxes in enumerate(gt_boxes, start=1):
            for x1, y1, x2, y2 in boxes:
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": img,
                        "category_id": 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        gt.dataset = {
            "images": [{"id": i} for i in range(1, len(gt_boxes) + 1)],
            "annotations": anns,
            "categories": [{"id": 1, "name": "defect"}],
        }
        gt.createIndex()
        dt = gt.loadRes(
            [
                {
                    "image_id": img,
                    "category_id": 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": s,
                }
                for img, b, s in dets
            ]
        )
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def test_ap_perfect_predictions_is_one() -> None:
    preds = [
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 10]]),
        pred("anomalous", "a", 0.8, [[5, 5, 20, 25], [30, 30, 40, 40]], [[5, 5, 20, 25], [30, 30, 40, 40]]),
        pred("normal", "b", 0.1),
    ]
    m = compute_metrics(preds)["overall"]
    assert m["box_AP"] == pytest.approx(1.0) and m["box_AP50"] == pytest.approx(1.0)
    assert pycocotools_ap([[[0, 0, 10, 10]]], [(1, [0, 0, 10, 10], 0.9)]) == pytest.approx((1.0, 1.0))


def test_ap_one_of_two_missed() -> None:
    # Precision 1 up to recall 0.5, nothing after: 51 of COCO's 101 recall points -> 51/101.
    preds = [
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 10]]),
        pred("anomalous", "b", 0.3, [[0, 0, 10, 10]], []),
    ]
    m = compute_metrics(preds)["overall"]
    assert m["box_AP"] == pytest.approx(51 / 101) and m["box_AP50"] == pytest.approx(51 / 101)
    direct = pycocotools_ap([[[0, 0, 10, 10]], [[0, 0, 10, 10]]], [(1, [0, 0, 10, 10], 0.9)])
    assert direct == pytest.approx((51 / 101, 51 / 101))


def test_ap_false_positive_ranked_first() -> None:
    # A box on a normal image with a higher score than the true hit: precision 0.5 at recall 1.
    # The true hit comes first in the list, so only the scores can put the false one ahead.
    preds = [
        pred("anomalous", "a", 0.6, [[0, 0, 10, 10]], [[0, 0, 10, 10]]),
        pred("normal", "a", 0.9, [], [[0, 0, 10, 10]]),
    ]
    m = compute_metrics(preds)["overall"]
    assert m["box_AP"] == pytest.approx(0.5)
    direct = pycocotools_ap([[], [[0, 0, 10, 10]]], [(1, [0, 0, 10, 10], 0.9), (2, [0, 0, 10, 10], 0.6)])
    assert direct == pytest.approx((0.5, 0.5))


def test_ap_vs_ap50_partial_overlap() -> None:
    # IoU 0.62: a hit at thresholds 0.50, 0.55, 0.60 only -> AP = 3/10, AP50 = 1.
    preds = [pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 6.2]])]
    m = compute_metrics(preds)["overall"]
    assert m["box_mIoU"] == pytest.approx(0.62)
    assert m["box_AP50"] == pytest.approx(1.0)
    assert m["box_AP"] == pytest.approx(0.3)
    assert pycocotools_ap([[[0, 0, 10, 10]]], [(1, [0, 0, 10, 6.2], 0.9)]) == pytest.approx((0.3, 1.0))


def test_ap_edge_cases() -> None:
    no_detection = compute_metrics([pred("anomalous", "b", 0.1, [[0, 0, 5, 5]], [])])["overall"]
    assert no_detection["box_AP"] == 0.0 and no_detection["box_mIoU"] == 0.0
    # No true box anywhere, only a false detection: AP undefined, not a crash.
    no_gt = compute_metrics([pred("normal", "a", 0.9, [], [[0, 0, 5, 5]]), pred("normal", "b", 0.1)])[
        "overall"
    ]
    assert math.isnan(no_gt["box_AP"]) and math.isnan(no_gt["box_AP50"])


def test_per_category_ap_is_evaluated_separately() -> None:
    preds = [
        pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 10]], category="good_cat"),
        pred("anomalous", "b", 0.2, [[0, 0, 10, 10]], [[50, 50, 60, 60]], category="bad_cat"),
    ]
    m = compute_metrics(preds)
    assert m["per_category"]["good_cat"]["box_AP"] == pytest.approx(1.0)
    assert m["per_category"]["bad_cat"]["box_AP"] == pytest.approx(0.0)
    assert m["overall"]["box_AP"] == pytest.approx(51 / 101)


def test_pycocotools_is_silenced(capsys: pytest.CaptureFixture[str]) -> None:
    compute_metrics([pred("anomalous", "a", 0.9, [[0, 0, 10, 10]], [[0, 0, 10, 10]])])
    assert capsys.readouterr().out == ""


# ---------- validation ----------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"label": "defect"}, "label"),
        ({"answer": "c"}, "answer"),
        ({"p_anomalous": 1.5}, "p_anomalous"),
        ({"p_anomalous": float("nan")}, "p_anomalous"),
        ({"p_anomalous": None}, "p_anomalous"),
        ({"follows_schema": "yes"}, "follows_schema"),
        ({"boxes": [[0, 0, 5]]}, "boxes"),
        ({"boxes": [[5, 5, 5, 9]]}, "no area"),
        ({"pred_boxes": [[0, 0, float("inf"), 3]]}, "pred_boxes"),
    ],
)
def test_bad_prediction_names_image_and_field(change: dict[str, Any], match: str) -> None:
    bad = {**pred("anomalous", "a", 0.5, [[0, 0, 4, 4]], name="broken.png"), **change}
    with pytest.raises(PredictionError, match=match) as info:
        compute_metrics([pred("normal", "b", 0.1), bad])
    assert "broken.png" in str(info.value) and "#1" in str(info.value)


def test_structural_errors() -> None:
    with pytest.raises(PredictionError, match="empty"):
        compute_metrics([])
    incomplete = pred("normal", "b", 0.1)
    del incomplete["pred_boxes"]
    with pytest.raises(PredictionError, match="missing keys"):
        compute_metrics([incomplete])
    with pytest.raises(PredictionError, match="normal image has true boxes"):
        compute_metrics([pred("normal", "b", 0.1, [[0, 0, 2, 2]])])
