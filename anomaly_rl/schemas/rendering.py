"""How boxes are written in responses: integer corners, optionally on a coarse grid, inside the image.

Box convention (project-wide): corners are continuous pixel coordinates, pixel column i spans
[i, i + 1), so the whole W x H image is [0, 0, W, H] and every coordinate of a box inside the
image lies in [0, W] x [0, H]. This is the convention `Frame` scales (a plain multiplication) and
the one R_fmt's "every coordinate inside the image" checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from anomaly_rl.data.records import Box

IntBox = tuple[int, int, int, int]


def format_box(box: Sequence[int], separator: str = ", ") -> str:
    return "[" + separator.join(str(int(v)) for v in box) + "]"


def format_boxes(boxes: Sequence[Sequence[int]], separator: str = ", ") -> str:
    """Boxes one after another, "[1, 2, 3, 4], [5, 6, 7, 8]"; `separator` is inside each box."""
    return ", ".join(format_box(b, separator) for b in boxes)


def _snap(value: float, grid: int, limit: int) -> int:
    """Nearest multiple of `grid` (half up, not banker's rounding) within [0, limit]."""
    snapped = int(math.floor(value / grid + 0.5)) * grid
    return min(max(snapped, 0), limit)


def _snap_span(low: float, high: float, grid: int, limit: int) -> tuple[int, int]:
    lo, hi = sorted((_snap(low, grid, limit), _snap(high, grid, limit)))
    if hi == lo:  # a box thinner than the grid must not collapse to zero width: widen by one cell
        if hi + grid <= limit:
            hi += grid
        elif lo - grid >= 0:
            lo -= grid
    return lo, hi


def snap_box(box: Box, size: tuple[int, int], grid: int = 1) -> IntBox:
    """A model-frame box as the integers a response writes: rounded to `grid`, clamped to the image.

    The upper limit is the largest multiple of `grid` not beyond the image edge, so snapped
    coordinates are always multiples of `grid` and always inside the image.
    """
    if grid < 1:
        raise ValueError(f"box_grid must be a positive integer, got {grid}")
    width, height = size
    x_limit, y_limit = (width // grid) * grid, (height // grid) * grid
    x1, x2 = _snap_span(box[0], box[2], grid, x_limit)
    y1, y2 = _snap_span(box[1], box[3], grid, y_limit)
    return x1, y1, x2, y2


def whole_image_box(size: tuple[int, int], grid: int = 1) -> IntBox:
    """The one region a normal image's response names: the whole image, deterministic by design.

    A random region would make the SFT target noise (findings.md); R_loc pays 0.5 for exactly one
    box on a normal image whatever the box is, so the whole image costs nothing.
    """
    return snap_box((0.0, 0.0, float(size[0]), float(size[1])), size, grid)
