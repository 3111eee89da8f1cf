"""The R1 baseline schema (AnomalyR1, VLM-R1): free reasoning, then the answer."""

from __future__ import annotations

from anomaly_rl.schemas.base import Schema


class R1Schema(Schema):
    """`<think>` reasoning `</think><answer>` a|b `</answer>`; boxes in the reasoning are read, not required."""

    name = "r1"
    tags = ("think", "answer")
    region_tag = "think"
    requires_box = False
