"""The VLM-R1-style baseline: accuracy plus the plain IoU of the best predicted box (method.md 3)."""

from __future__ import annotations

from anomaly_rl.data.records import Sample
from anomaly_rl.rewards.base import WeightedReward, exact_accuracy
from anomaly_rl.rewards.components import iou_matrix
from anomaly_rl.schemas.parsed import ParsedResponse


def best_iou(parsed: ParsedResponse, sample: Sample) -> float:
    """The highest IoU between any predicted and any true box; 0 with no box on either side.

    Choice: a normal image (and an anomalous one without annotated boxes) has nothing to find,
    so its IoU term is 0 whatever the response says. It is constant there, so it neither pays
    nor punishes boxes on normal images; the accuracy term does the work. Because only the best
    box counts, extra boxes are free here (unlike R_loc): the known weakness of this baseline.
    """
    if not sample.is_anomalous or not sample.boxes or not parsed.boxes:
        return 0.0
    return float(iou_matrix(parsed.boxes, sample.boxes).max())


class IouReward(WeightedReward):
    """Components "accuracy" (exact right letter) and "iou" (`best_iou`), default weights 1, 1."""

    component_bounds = {"accuracy": (0.0, 1.0), "iou": (0.0, 1.0)}
    classification_key = "accuracy"

    def __init__(self, w_accuracy: float = 1.0, w_iou: float = 1.0) -> None:
        super().__init__({"accuracy": w_accuracy, "iou": w_iou})

    def components(self, parsed: ParsedResponse, sample: Sample) -> dict[str, float]:
        return {"accuracy": exact_accuracy(parsed, sample), "iou": best_iou(parsed, sample)}
