"""AnomalyR1's ROAM reward: is the answer right, and does the reasoning agree with it (method.md 3)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from anomaly_rl.data.records import Sample
from anomaly_rl.rewards.base import Reward, exact_accuracy
from anomaly_rl.rewards.decision import reasoning_decision
from anomaly_rl.schemas.parsed import ParsedResponse

BOTH_RIGHT = 1.0
UNDECIDED_RIGHT = 0.8
UNDECIDED_WRONG = 0.05
BOTH_WRONG_AGREEING = 0.1


def roam_score(reasoning: str | None, answer: str | None, right_letter: str) -> float:
    """1.0 reasoning and answer both right; 0.8 no decision in the reasoning, answer right;
    0.05 no decision, answer wrong (or missing); 0.1 both wrong and agreeing; else 0 (they disagree,
    or the reasoning decides but the answer names no letter).
    """
    decision = reasoning_decision(reasoning)
    if decision is None:
        return UNDECIDED_RIGHT if answer == right_letter else UNDECIDED_WRONG
    if decision == right_letter and answer == right_letter:
        return BOTH_RIGHT
    if decision != right_letter and answer == decision:
        return BOTH_WRONG_AGREEING
    return 0.0


def reasoning_text(parsed: ParsedResponse) -> str | None:
    """The reasoning stages joined in order (`<think>` then `<rethink>`); None when there are none."""
    stages = [t for t in (parsed.think, parsed.rethink) if t is not None]
    return "\n".join(stages) if stages else None


class RoamReward(Reward):
    """Components "roam" (the score, also the total) and "accuracy" (exact letter; logged only).

    The answer compared is `ParsedResponse.answer`, the one letter the answer stage names. The
    total is the roam score alone: "accuracy" is there so that dynamic sampling can key on
    classification, as method.md 4 asks.
    """

    component_bounds = {"roam": (0.0, 1.0), "accuracy": (0.0, 1.0)}
    classification_key = "accuracy"

    def total_bounds(self) -> tuple[float, float]:
        return self.component_bounds["roam"]

    def components(self, parsed: ParsedResponse, sample: Sample) -> dict[str, float]:
        return {
            "roam": roam_score(reasoning_text(parsed), parsed.answer, sample.answer_letter),
            "accuracy": exact_accuracy(parsed, sample),
        }

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        return values["roam"].copy()

    def __repr__(self) -> str:
        return "RoamReward()"
