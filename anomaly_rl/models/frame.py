"""The single place where boxes move between original-image pixels and the model's input frame.

Prompts state the model frame's size, rewards and metrics score in original pixels, prediction
draws in original pixels: all of them go through `Frame`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from anomaly_rl.data.records import Box


@dataclass(frozen=True)
class Frame:
    """Scale between an original image (w, h) and the size the model sees after resizing."""

    original_size: tuple[int, int]
    model_size: tuple[int, int]

    @property
    def scale_x(self) -> float:
        return self.model_size[0] / self.original_size[0]

    @property
    def scale_y(self) -> float:
        return self.model_size[1] / self.original_size[1]

    def to_model(self, boxes: Iterable[Box]) -> tuple[Box, ...]:
        sx, sy = self.scale_x, self.scale_y
        return tuple((b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in boxes)

    def to_original(self, boxes: Iterable[Box]) -> tuple[Box, ...]:
        sx, sy = self.scale_x, self.scale_y
        return tuple((b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy) for b in boxes)
