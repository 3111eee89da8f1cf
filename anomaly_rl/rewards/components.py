"""AD-FM's reward components (method.md section 3) as pure functions of plain values.

Boxes are (x1, y1, x2, y2) in original-image pixels (the caller maps parsed boxes with `Frame`
first). Every function returns a finite float for any finite or infinite input coordinates: a
policy can write absurd numbers and the reward must still be a number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from anomaly_rl.data.records import Box

COORD_LIMIT = 1e12
"""Coordinates are clipped to [0, COORD_LIMIT] before any area is taken, so that products of
coordinates (up to 1e24) and their differences stay finite; no real image is that large."""

INSIDE_TOLERANCE = 1e-6
"""Relative slack for "inside the image": a box on the edge that went model frame -> original
frame picks up float error of this order and must still count as inside."""

CLS_PARTIAL = 0.8
CLS_PARTIAL_MAX_CHARS = 10
LOC_ONE_REGION = 0.5
LOC_TOO_MANY = -0.1
LOC_COUNT_WEIGHT = 0.3
FMT_MAX = 1.2


def _as_array(boxes: Sequence[Box] | np.ndarray) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(np.nan_to_num(array, nan=0.0, posinf=COORD_LIMIT, neginf=0.0), 0.0, COORD_LIMIT)


def _pairwise(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, union, enclosing area), each [m, n]; inverted boxes have zero area."""
    area_p = np.clip(pred[:, 2] - pred[:, 0], 0, None) * np.clip(pred[:, 3] - pred[:, 1], 0, None)
    area_t = np.clip(true[:, 2] - true[:, 0], 0, None) * np.clip(true[:, 3] - true[:, 1], 0, None)
    p, t = pred[:, None, :], true[None, :, :]
    inter_w = np.clip(np.minimum(p[..., 2], t[..., 2]) - np.maximum(p[..., 0], t[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(p[..., 3], t[..., 3]) - np.maximum(p[..., 1], t[..., 1]), 0, None)
    inter = inter_w * inter_h
    union = area_p[:, None] + area_t[None, :] - inter
    encl_w = np.clip(np.maximum(p[..., 2], t[..., 2]) - np.minimum(p[..., 0], t[..., 0]), 0, None)
    encl_h = np.clip(np.maximum(p[..., 3], t[..., 3]) - np.minimum(p[..., 1], t[..., 1]), 0, None)
    return inter, union, encl_w * encl_h


def iou_matrix(pred: Sequence[Box] | np.ndarray, true: Sequence[Box] | np.ndarray) -> np.ndarray:
    """Plain IoU [m, n]; 0 where the union is empty (two zero-area boxes)."""
    inter, union, _ = _pairwise(_as_array(pred), _as_array(true))
    safe = np.where(union > 0, union, 1.0)
    return np.where(union > 0, inter / safe, 0.0)


def giou_matrix(pred: Sequence[Box] | np.ndarray, true: Sequence[Box] | np.ndarray) -> np.ndarray:
    """Generalised IoU [m, n] in [-1, 1]: IoU - (enclosing - union) / enclosing.

    Unlike IoU it is negative for disjoint boxes and grows as they approach, which is why R_loc
    matches on it. Zero-area pairs (empty enclosing box) get their IoU, i.e. 0.
    """
    inter, union, enclosing = _pairwise(_as_array(pred), _as_array(true))
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    penalty = np.where(enclosing > 0, (enclosing - union) / np.where(enclosing > 0, enclosing, 1.0), 0.0)
    return np.clip(iou - penalty, -1.0, 1.0)


def iou(a: Box, b: Box) -> float:
    return float(iou_matrix([a], [b])[0, 0])


def giou(a: Box, b: Box) -> float:
    return float(giou_matrix([a], [b])[0, 0])


def r_cls(pred_text: str, right_letter: str) -> float:
    """R_cls: 1 for exactly the right letter, 0.8 if it occurs in a short (<= 10 chars) answer, else 0.

    `pred_text` is the raw `<answer>` contents, or the whole response when that tag is missing;
    it is stripped and lower-cased here. "Occurs" is a plain substring test, as in the paper's
    code: "(a)" and "a." earn 0.8, but so does "bad" for either letter; the 10-character cap
    keeps a long text that merely contains the letter at 0.
    """
    pred = pred_text.strip().lower()
    if pred == right_letter:
        return 1.0
    if right_letter in pred and len(pred) <= CLS_PARTIAL_MAX_CHARS:
        return CLS_PARTIAL
    return 0.0


def r_count(m: int, n: int) -> float:
    """The count term of R_loc: 1 for the right number of boxes, 0.5 one off, else -0.1."""
    if m == n:
        return 1.0
    if abs(m - n) == 1:
        return 0.5
    return -0.1


Overlap = Literal["giou", "iou"]
OVERLAPS: dict[str, Callable[..., np.ndarray]] = {"giou": giou_matrix, "iou": iou_matrix}


def matched_mean_overlap(pred: Sequence[Box], true: Sequence[Box], overlap: Overlap = "giou") -> float:
    """Mean over the m predicted boxes of their GIoU (or plain IoU) with a one-to-one (Hungarian) match.

    The match maximises the total overlap; predicted boxes left without a partner (m > n) add 0, so
    extra boxes dilute the mean. With one box on either side the optimum is simply the best pair.
    """
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {sorted(OVERLAPS)}, got {overlap!r}")
    m, n = len(pred), len(true)
    if m == 0 or n == 0:
        return 0.0
    matrix = OVERLAPS[overlap](pred, true)
    if m == 1 or n == 1:
        return float(matrix.max()) / m
    rows, cols = linear_sum_assignment(-matrix)
    return float(matrix[rows, cols].sum()) / m


def r_loc(pred: Sequence[Box], true: Sequence[Box], is_anomalous: bool, overlap: Overlap = "giou") -> float:
    """R_loc: localisation reward, in [-0.1, 1] (method.md section 3).

    Normal images, and anomalous ones without annotated boxes, pay for picking exactly one
    region to examine (0.5), nothing for none and -0.1 for several. Otherwise r = matched mean
    GIoU + 0.3 * r_count, mapped by clip((r + 0.5) / 1.5, 0, 1): any r >= 1 (e.g. GIoU >= 0.7 with
    the right count) already earns the maximum 1. `overlap="iou"` replaces GIoU by plain IoU (no
    enclosing-box term: a box that misses earns the same wherever it lies) — a lever, not the paper's.
    """
    m, n = len(pred), len(true)
    if not is_anomalous or n == 0:
        if m == 0:
            return 0.0
        return LOC_ONE_REGION if m == 1 else LOC_TOO_MANY
    if m == 0:
        return 0.0
    r = matched_mean_overlap(pred, true, overlap) + LOC_COUNT_WEIGHT * r_count(m, n)
    return float(np.clip((r + 0.5) / 1.5, 0.0, 1.0))


def inside_image(boxes: Sequence[Box], image_size: tuple[int, int]) -> bool:
    """Every coordinate within [0, W] x [0, H] (the box convention of `schemas.rendering`)."""
    width, height = image_size
    slack = INSIDE_TOLERANCE * max(width, height, 1)
    for x1, y1, x2, y2 in boxes:
        for x in (x1, x2):
            if not -slack <= x <= width + slack:
                return False
        for y in (y1, y2):
            if not -slack <= y <= height + slack:
                return False
    return True


def r_fmt(
    region: str | None,
    examination: str | None,
    answer_text: str | None,
    boxes: Sequence[Box],
    region_has_brackets: bool,
    image_size: tuple[int, int],
) -> float:
    """R_fmt: format reward, at most 1.2 (method.md section 3).

    region: +0.3 non-empty, +0.1 more if longer than 10 characters (after stripping);
    examination: +0.2 non-empty, +0.1 more if longer than 10;
    answer (stripped, lower-cased): +0.2 exactly "a" or "b", else +0.1 if it contains a or b
    (substring, as in R_cls); a missing `<answer>` stage earns nothing here (choice: unlike
    R_cls, the format reward pays for the tag, and the whole response nearly always holds an "a");
    boxes: +0.2 for at least one box in the region stage, +0.1 more if every coordinate is inside
    the image; or +0.1 when the region stage only holds brackets that did not parse as a box.
    """
    tenths = 0  # counted in tenths so that the maximum is exactly 1.2, not 1.2000000000000002
    if region is not None and (length := len(region.strip())) > 0:
        tenths += 3 + (1 if length > 10 else 0)
    if examination is not None and (length := len(examination.strip())) > 0:
        tenths += 2 + (1 if length > 10 else 0)
    if answer_text is not None:
        pred = answer_text.strip().lower()
        if pred in ("a", "b"):
            tenths += 2
        elif "a" in pred or "b" in pred:
            tenths += 1
    if boxes:
        tenths += 2 + (1 if inside_image(boxes, image_size) else 0)
    elif region_has_brackets:
        tenths += 1
    return tenths / 10
