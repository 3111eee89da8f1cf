"""The "binary feedback" baseline: accuracy 1/0 plus format 1/0 (method.md 3)."""

from __future__ import annotations

from anomaly_rl.data.records import Sample
from anomaly_rl.rewards.base import WeightedReward, exact_accuracy
from anomaly_rl.schemas.parsed import ParsedResponse


class BinaryReward(WeightedReward):
    """Components "accuracy" (exact right letter) and "format" (`ParsedResponse.follows_schema`).

    follows_schema is the schema's own verdict: its tags each once and in order, nothing else
    outside them, an answer of exactly a or b (and, for adfm, a box). Most groups of G responses
    score identically under this reward once the policy is decent: the waste AD-FM reduces.
    """

    component_bounds = {"accuracy": (0.0, 1.0), "format": (0.0, 1.0)}
    classification_key = "accuracy"

    def __init__(self, w_accuracy: float = 1.0, w_format: float = 1.0) -> None:
        super().__init__({"accuracy": w_accuracy, "format": w_format})

    def components(self, parsed: ParsedResponse, sample: Sample) -> dict[str, float]:
        return {
            "accuracy": exact_accuracy(parsed, sample),
            "format": 1.0 if parsed.follows_schema else 0.0,
        }
