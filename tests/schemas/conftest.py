"""Schemas built from the shipped yaml, and a sample builder, for the schema tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from anomaly_rl.data.records import Box, Sample
from anomaly_rl.schemas.base import Schema
from anomaly_rl.schemas.config import SCHEMA_NAMES, load_schema


def build_sample(
    label: str = "anomalous",
    boxes: tuple[Box, ...] = ((10.0, 20.0, 30.0, 40.0),),
    size: tuple[int, int] = (100, 80),
    category: str = "metal_nut",
    defect: str = "scratch_head",
) -> Sample:
    if label == "normal":
        boxes, defect = (), "good"
    return Sample("img.png", label, category, defect, None, tuple(boxes), size, "train")  # type: ignore[arg-type]


@pytest.fixture
def sample_builder() -> Callable[..., Sample]:
    return build_sample


@pytest.fixture(scope="session")
def schemas() -> dict[str, Schema]:
    return {name: load_schema(name) for name in SCHEMA_NAMES}
