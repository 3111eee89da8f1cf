"""Ground-truth boxes from pixel masks (method.md section 5).

Box convention used everywhere in the project: (x1, y1, x2, y2) in original-image pixels, where
x1, y1 is the top-left pixel of the region and x2, y2 is its bottom-right pixel + 1 (exclusive).
Pixel i therefore covers the continuous interval [i, i + 1): the width is x2 - x1, a one-pixel
defect at (x, y) is (x, y, x + 1, y + 1), the COCO bbox is [x1, y1, x2 - x1, y2 - y1], and
scaling a box by a resize factor maps the same continuous region (which an inclusive corner
would not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.records import Box

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class BoxConfig:
    """How masks become boxes; both knobs are the paper's unstated choices, so they are config.

    dilation: pixels of square dilation (kernel 2 * dilation + 1) applied before labelling, so
        fragments separated by a gap of at most 2 * dilation background pixels become one defect.
    min_area: components with fewer (undilated) mask pixels than this are dropped as noise.
    """

    dilation: int = 0
    min_area: int = 0

    def __post_init__(self) -> None:
        for name in ("dilation", "min_area"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise DataError(f"boxes.{name} must be a non-negative integer, got {value!r}")

    @classmethod
    def from_any(cls, value: BoxConfig | Mapping[str, Any] | None) -> BoxConfig:
        """Accept the config-file form (a mapping) as well as the object; None means defaults."""
        if value is None:
            return cls()
        if isinstance(value, BoxConfig):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"dilation", "min_area"}
            if unknown:
                raise DataError(f"unknown boxes setting(s) {sorted(unknown)}; valid: dilation, min_area")
            return cls(**{k: int(v) for k, v in value.items()})
        raise DataError(f"boxes must be a mapping {{dilation, min_area}}, got {type(value).__name__}")


def binarise(mask: np.ndarray) -> np.ndarray:
    """Any value > 0 is defect: datasets use 255, 1, or grey-level codes per defect (LOCO)."""
    array = np.asarray(mask)
    if array.ndim == 3:
        # Colour-coded masks: a pixel is defect if any channel is non-zero.
        array = array.max(axis=2)
    if array.ndim != 2:
        raise DataError(f"a mask must be 2-D (or H x W x C), got shape {array.shape}")
    return array > 0


def boxes_from_mask(mask: np.ndarray, dilation: int = 0, min_area: int = 0) -> list[Box]:
    """Tight boxes of the mask's connected defects, in the mask's own pixels.

    Dilation only decides which pixels belong together; each box is fitted to the undilated
    pixels of its merged component, so dilation merges fragments without inflating boxes.
    Components are 8-connected. Boxes come in scipy's label order (raster order of each
    dilated component's first pixel), which is deterministic.
    """
    config = BoxConfig(dilation=int(dilation), min_area=int(min_area))
    binary = binarise(mask)
    if not binary.any():
        return []
    grown = binary
    if config.dilation > 0:
        # A square max filter is separable, so this is linear in the kernel size.
        grown = ndimage.maximum_filter(binary, size=2 * config.dilation + 1, mode="constant", cval=False)
    labels, count = ndimage.label(grown, structure=_EIGHT_CONNECTED)
    labels_on_mask = np.where(binary, labels, 0)
    areas = np.bincount(labels_on_mask.ravel(), minlength=count + 1)
    boxes: list[Box] = []
    for index, region in enumerate(ndimage.find_objects(labels_on_mask, max_label=count), start=1):
        # Every dilated component grew from at least one mask pixel, so region is never None;
        # the guard keeps that assumption from turning into a crash if scipy ever changes.
        if region is None or areas[index] < config.min_area or areas[index] == 0:
            continue
        rows, cols = region
        boxes.append((float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)))
    return boxes
