"""The no-reasoning baseline schema: the answer alone."""

from __future__ import annotations

from anomaly_rl.schemas.base import Schema


class DirectSchema(Schema):
    """`<answer>` a|b `</answer>`; no stage holds boxes."""

    name = "direct"
    tags = ("answer",)
    region_tag = None
    requires_box = False
