"""The one sample record every reader produces and every later floor consumes.

Boxes are always kept in original-image pixels; the conversion to the model's input frame
lives in `anomaly_rl.models.frame` and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Box = tuple[float, float, float, float]
"""Absolute pixel corners (x1, y1, x2, y2): x1,y1 the top-left pixel, x2,y2 the bottom-right pixel + 1.

Corners are continuous edges: pixel i covers [i, i+1), so a box's width is x2 - x1, the whole
image is [0, 0, W, H] and the COCO bbox is [x1, y1, x2 - x1, y2 - y1].
"""

Label = Literal["normal", "anomalous"]
NORMAL: Label = "normal"
ANOMALOUS: Label = "anomalous"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with everything the method needs to prompt and to score it."""

    image_path: str
    label: Label
    category: str
    defect_type: str  # "good" for normal images
    mask_path: str | None
    boxes: tuple[Box, ...]  # original-image pixels; empty for normal images
    image_size: tuple[int, int]  # (width, height) of the original image
    split: str  # "train" | "val" | "test"
    reference_paths: tuple[str, ...] = field(default=())  # normal images shown beside the query

    @property
    def is_anomalous(self) -> bool:
        return self.label == ANOMALOUS

    @property
    def answer_letter(self) -> str:
        """The right multiple-choice letter: "a" = has a defect, "b" = has none."""
        return "a" if self.is_anomalous else "b"

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["boxes"] = [list(b) for b in self.boxes]
        record["image_size"] = list(self.image_size)
        record["reference_paths"] = list(self.reference_paths)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Sample:
        return cls(
            image_path=str(record["image_path"]),
            label=record["label"],
            category=str(record["category"]),
            defect_type=str(record["defect_type"]),
            mask_path=record.get("mask_path"),
            boxes=tuple(tuple(float(v) for v in b) for b in record.get("boxes", ())),  # type: ignore[misc]
            image_size=(int(record["image_size"][0]), int(record["image_size"][1])),
            split=str(record["split"]),
            reference_paths=tuple(record.get("reference_paths", ())),
        )
