"""Image-level, localisation and output-quality metrics from a list of prediction dicts.

One prediction dict per image (what predict/evaluate write to predictions.jsonl):
    image_path, category, label ("normal" | "anomalous"), boxes (true, original pixels),
    response, answer ("a" | "b" | None), pred_boxes (original pixels), p_anomalous (float in
    [0, 1], the probability of answer "a" read from token probabilities), follows_schema (bool).

Conventions, chosen once here:
- Boxes are (x1, y1, x2, y2) in original pixels with x2, y2 EXCLUSIVE edges, i.e. continuous
  coordinates: width = x2 - x1, area = (x2 - x1) * (y2 - y1). A one-pixel box at (3, 4) is
  (3, 4, 4, 5). This is also what pycocotools assumes for [x, y, w, h] boxes (no +1).
- answer None (no valid decision) is always WRONG: its predicted label is the opposite of the
  truth, so it is a false negative on an anomalous image and a false positive on a normal one.
  Counting it as "normal" would reward a model for failing to answer on normal images.
- Precision / recall / F1 with a zero denominator are 0 (torchmetrics' default).
- Balanced accuracy is the mean recall over the classes PRESENT in the ground truth (sklearn's
  rule), so it reduces to plain recall when a subset holds one class.
- AUROC is NaN when only one class is present (a note says so); it never raises.
- box_mIoU: over anomalous images that have at least one true box; for each true box take its
  best IoU with any predicted box (0 when there are none), average over the image's true boxes,
  then over images. Predicted boxes are scored as given, whatever the answer letter was.
- box_LocAcc@0.1 / @0.3 / @0.5: localisation accuracy as papers in the field report it: the
  share of the images box_mIoU scores (anomalous, with at least one true box) whose best-matching
  predicted box — the (predicted, true) pair with the highest IoU — has IoU >= t; an image without
  a predicted box is a miss. Unlike box_IoU50_rate (the image's IoU averaged over its true boxes
  first), hitting one of several defects counts as a hit.
- box_AP / box_AP50: class-agnostic COCO bbox AP (pycocotools COCOeval, maxDets 100, all areas)
  with every true box as ground truth and every predicted box as a detection scored by the
  image's p_anomalous, so a box on an image the model thinks is normal ranks low. NaN when there
  is no true box; 0 when there are true boxes but no detection.
- Box areas are compared on anomalous images (findings.md: a GIoU reward inflated boxes 9x).
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from anomaly_rl.data.records import ANOMALOUS, NORMAL, Box

REQUIRED_KEYS: tuple[str, ...] = (
    "image_path",
    "category",
    "label",
    "boxes",
    "answer",
    "pred_boxes",
    "p_anomalous",
    "follows_schema",
)
ANSWER_TO_LABEL: dict[str, str] = {"a": ANOMALOUS, "b": NORMAL}
LOC_ACC_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5)
"""IoU thresholds of box_LocAcc@t, the localisation accuracy papers in the field report."""


def loc_acc_key(threshold: float) -> str:
    """The metric name of the localisation accuracy at an IoU threshold: box_LocAcc@0.3."""
    return f"box_LocAcc@{threshold:g}"


class PredictionError(ValueError):
    """A prediction dict that cannot be scored; the message names the image and the field."""


def _where(pred: dict[str, Any], index: int) -> str:
    return f"prediction #{index} ({pred.get('image_path', '?')!s})"


def _as_boxes(value: Any, where: str, field: str, *, strict: bool) -> list[Box]:
    """Boxes as float 4-tuples. True boxes (strict) must have positive area; predicted ones may not."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise PredictionError(
            f"{where}: {field} must be a list of [x1, y1, x2, y2], got {type(value).__name__}"
        )
    boxes: list[Box] = []
    for box in value:
        if not isinstance(box, list | tuple) or len(box) != 4:
            raise PredictionError(f"{where}: {field} entry {box!r} is not [x1, y1, x2, y2]")
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError) as err:
            raise PredictionError(f"{where}: {field} entry {box!r} has a non-numeric value") from err
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise PredictionError(f"{where}: {field} entry {box!r} has a non-finite value")
        if strict and (x2 <= x1 or y2 <= y1):
            raise PredictionError(f"{where}: {field} entry {box!r} has no area (need x2 > x1 and y2 > y1)")
        boxes.append((x1, y1, x2, y2))
    return boxes


def validate_predictions(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check every field compute_metrics relies on; returns copies with boxes as float tuples."""
    if not isinstance(predictions, Sequence) or isinstance(predictions, str | bytes):
        raise PredictionError(f"predictions must be a list of dicts, got {type(predictions).__name__}")
    if len(predictions) == 0:
        raise PredictionError("predictions is empty: nothing to evaluate")
    clean: list[dict[str, Any]] = []
    for index, pred in enumerate(predictions):
        if not isinstance(pred, dict):
            raise PredictionError(f"prediction #{index} is a {type(pred).__name__}, not a dict")
        where = _where(pred, index)
        missing = [k for k in REQUIRED_KEYS if k not in pred]
        if missing:
            raise PredictionError(f"{where}: missing keys {missing}")
        if pred["label"] not in (NORMAL, ANOMALOUS):
            raise PredictionError(f"{where}: label must be 'normal' or 'anomalous', got {pred['label']!r}")
        if pred["answer"] not in ("a", "b", None):
            raise PredictionError(f"{where}: answer must be 'a', 'b' or None, got {pred['answer']!r}")
        p = pred["p_anomalous"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
            raise PredictionError(f"{where}: p_anomalous must be a float in [0, 1], got {p!r}")
        if not isinstance(pred["follows_schema"], bool | np.bool_):
            raise PredictionError(f"{where}: follows_schema must be a bool, got {pred['follows_schema']!r}")
        true_boxes = _as_boxes(pred["boxes"], where, "boxes", strict=True)
        if pred["label"] == NORMAL and true_boxes:
            raise PredictionError(f"{where}: a normal image has true boxes {true_boxes}")
        clean.append(
            {
                **pred,
                "category": str(pred["category"]),
                "p_anomalous": float(p),
                "follows_schema": bool(pred["follows_schema"]),
                "boxes": true_boxes,
                "pred_boxes": _as_boxes(pred["pred_boxes"], where, "pred_boxes", strict=False),
            }
        )
    return clean


def box_area(box: Box) -> float:
    """Area with exclusive x2/y2 edges; an inverted or empty box has area 0."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union, exclusive edges; 0 when the union is empty."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def best_match_iou(true_boxes: Sequence[Box], pred_boxes: Sequence[Box]) -> float:
    """Mean over true boxes of the best IoU with any predicted box (boxes may share a prediction)."""
    if not true_boxes:
        raise ValueError("best_match_iou needs at least one true box")
    return sum(max((box_iou(t, p) for p in pred_boxes), default=0.0) for t in true_boxes) / len(true_boxes)


def best_box_iou(true_boxes: Sequence[Box], pred_boxes: Sequence[Box]) -> float:
    """The highest IoU of any predicted box with any true box; 0 without a predicted box."""
    return max((box_iou(t, p) for t in true_boxes for p in pred_boxes), default=0.0)


def _coco_ap(preds: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(AP@[.5:.95], AP50) from pycocotools, class-agnostic; its chatter goes to a discarded buffer."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for image_id, pred in enumerate(preds, start=1):
        images.append({"id": image_id, "file_name": str(pred["image_path"])})
        for x1, y1, x2, y2 in pred["boxes"]:
            w, h = x2 - x1, y2 - y1
            # ids start at 1: COCOeval treats a matched gt id of 0 as "no match".
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for x1, y1, x2, y2 in pred["pred_boxes"]:
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1)],
                    "score": pred["p_anomalous"],
                }
            )
    if not annotations:
        return math.nan, math.nan
    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "anomaly"}],
        }
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50 = float(evaluator.stats[0]), float(evaluator.stats[1])
    # COCOeval writes -1 for "undefined"; only possible here if there were no true boxes.
    return (math.nan if ap < 0 else ap), (math.nan if ap50 < 0 else ap50)


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else math.nan


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def _predicted_labels(preds: Sequence[dict[str, Any]]) -> list[int]:
    """1 = anomalous. None answers are wrong by construction (see module docstring)."""
    out = []
    for pred in preds:
        truth = pred["label"] == ANOMALOUS
        if pred["answer"] is None:
            out.append(int(not truth))
        else:
            out.append(int(ANSWER_TO_LABEL[pred["answer"]] == ANOMALOUS))
    return out


def _group_metrics(preds: Sequence[dict[str, Any]], scope: str, notes: list[str]) -> dict[str, float]:
    target = torch.tensor([int(p["label"] == ANOMALOUS) for p in preds])
    predicted = torch.tensor(_predicted_labels(preds))
    scores = torch.tensor([p["p_anomalous"] for p in preds], dtype=torch.float64)
    n_anom = int(target.sum().item())
    n_norm = len(preds) - n_anom

    recalls = []
    if n_anom:
        recalls.append(float(((predicted == 1) & (target == 1)).sum().item()) / n_anom)
    if n_norm:
        recalls.append(float(((predicted == 0) & (target == 0)).sum().item()) / n_norm)

    if n_anom and n_norm:
        auroc = float(binary_auroc(scores, target).item())
    else:
        auroc = math.nan
        notes.append(
            f"{scope}: image_AUROC undefined, only one class present ({n_anom} anomalous, {n_norm} normal)"
        )

    anomalous = [p for p in preds if p["label"] == ANOMALOUS]
    scored = [p for p in anomalous if p["boxes"]]
    ious = [best_match_iou(p["boxes"], p["pred_boxes"]) for p in scored]
    best = [best_box_iou(p["boxes"], p["pred_boxes"]) for p in scored]
    if len(scored) < len(anomalous):
        notes.append(
            f"{scope}: {len(anomalous) - len(scored)} anomalous image(s) without true boxes left out of box_mIoU"
        )
    ap, ap50 = _coco_ap(preds)
    pred_areas = [box_area(b) for p in anomalous for b in p["pred_boxes"]]
    true_areas = [box_area(b) for p in anomalous for b in p["boxes"]]
    pred_median, true_median = _median(pred_areas), _median(true_areas)

    return {
        "n_images": float(len(preds)),
        "n_anomalous": float(n_anom),
        "n_normal": float(n_norm),
        "image_Accuracy": float(binary_accuracy(predicted, target).item()),
        "image_BalancedAccuracy": _mean(recalls),
        "image_Precision": float(binary_precision(predicted, target).item()),
        "image_Recall": float(binary_recall(predicted, target).item()),
        "image_F1Score": float(binary_f1_score(predicted, target).item()),
        "image_AUROC": auroc,
        "answer_missing_rate": _mean(float(p["answer"] is None) for p in preds),
        "schema_valid_rate": _mean(float(p["follows_schema"]) for p in preds),
        "box_mIoU": _mean(ious),
        "box_IoU50_rate": _mean(float(v >= 0.5) for v in ious),
        **{loc_acc_key(t): _mean(float(v >= t) for v in best) for t in LOC_ACC_THRESHOLDS},
        "box_n_scored": float(len(scored)),
        "box_AP": ap,
        "box_AP50": ap50,
        "box_area_pred_median": pred_median,
        "box_area_true_median": true_median,
        "box_area_pred_mean": _mean(pred_areas),
        "box_area_true_mean": _mean(true_areas),
        "box_area_ratio_median": pred_median / true_median if true_areas and pred_areas else math.nan,
    }


def compute_metrics(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"overall": {...}, "per_category": {category: {...}}, "notes": [str, ...]}.

    Every value in the metric dicts is a float (counts included) so tables and loggers treat them
    alike; undefined values are NaN and explained in "notes". Overall AP pools all categories
    into one class-agnostic COCO evaluation (not the mean of per-category APs).
    """
    preds = validate_predictions(predictions)
    notes: list[str] = []
    by_category: dict[str, list[dict[str, Any]]] = {}
    for pred in preds:
        by_category.setdefault(pred["category"], []).append(pred)
    per_category = {cat: _group_metrics(by_category[cat], cat, notes) for cat in sorted(by_category)}
    overall = _group_metrics(preds, "overall", notes)
    return {"overall": overall, "per_category": per_category, "notes": notes}
