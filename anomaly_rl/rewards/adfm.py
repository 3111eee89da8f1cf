"""AD-FM's fine-grained reward: R = w_cls * R_cls + w_loc * R_loc + w_fmt * R_fmt (method.md 3)."""

from __future__ import annotations

from anomaly_rl.data.records import Sample
from anomaly_rl.rewards.base import WeightedReward, prediction_text
from anomaly_rl.rewards.components import FMT_MAX, LOC_TOO_MANY, OVERLAPS, Overlap, r_cls, r_fmt, r_loc
from anomaly_rl.schemas.parsed import ParsedResponse


class AdfmReward(WeightedReward):
    """Components "cls" (R_cls), "loc" (R_loc) and "fmt" (R_fmt), default weights 1, 1, 1.

    The region stage is `<think>` and the examination stage `<rethink>` (the adfm schema); with
    another schema the missing stages simply earn no format reward. Boxes must already be in
    original pixels. `loc_overlap="iou"` scores boxes by plain IoU instead of GIoU (a lever of the
    adaptation study: no pull towards a missed defect from the enclosing-box term).
    """

    component_bounds = {"cls": (0.0, 1.0), "loc": (LOC_TOO_MANY, 1.0), "fmt": (0.0, FMT_MAX)}
    classification_key = "cls"

    def __init__(self, w_cls: float = 1.0, w_loc: float = 1.0, w_fmt: float = 1.0,
                 loc_overlap: Overlap = "giou") -> None:
        if loc_overlap not in OVERLAPS:
            raise ValueError(f"reward.loc_overlap must be one of {sorted(OVERLAPS)}, got {loc_overlap!r}")
        super().__init__({"cls": w_cls, "loc": w_loc, "fmt": w_fmt})
        self.loc_overlap = loc_overlap

    def components(self, parsed: ParsedResponse, sample: Sample) -> dict[str, float]:
        return {
            "cls": r_cls(prediction_text(parsed), sample.answer_letter),
            "loc": r_loc(parsed.boxes, sample.boxes, sample.is_anomalous, self.loc_overlap),
            "fmt": r_fmt(
                parsed.think,
                parsed.rethink,
                parsed.answer_text,
                parsed.boxes,
                parsed.region_has_brackets,
                sample.image_size,
            ),
        }
