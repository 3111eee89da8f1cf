"""AD-FM's multi-stage schema: region identification with boxes, focused examination, answer."""

from __future__ import annotations

from anomaly_rl.schemas.base import Schema


class AdfmSchema(Schema):
    """`<think>` regions as boxes `</think><rethink>` examination `</rethink><answer>` a|b `</answer>`."""

    name = "adfm"
    tags = ("think", "rethink", "answer")
    region_tag = "think"
    requires_box = True
