"""The interface every reward offers the trainer, the evaluator and the score CLI.

A reward maps N parsed responses (boxes already in original pixels) and their N samples to named
float64 arrays: each component on its own (they are logged separately) and "total", the number
GRPO optimises. `classification_key` names the component dynamic sampling keys on (method.md 4);
`bounds` gives the closed range of every array, which tests and sanity checks rely on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from anomaly_rl.data.records import Sample
from anomaly_rl.schemas.parsed import ParsedResponse

TOTAL = "total"


def prediction_text(parsed: ParsedResponse) -> str:
    """What classification reads: the `<answer>` contents, or the whole response without that tag."""
    return parsed.answer_text if parsed.answer_text is not None else parsed.text


def exact_accuracy(parsed: ParsedResponse, sample: Sample) -> float:
    """1 when the prediction text, stripped and lower-cased, is exactly the right letter, else 0."""
    return 1.0 if prediction_text(parsed).strip().lower() == sample.answer_letter else 0.0


def weighted_bounds(
    bounds: Mapping[str, tuple[float, float]], weights: Mapping[str, float]
) -> tuple[float, float]:
    """The range of sum(w_k * component_k), given each component's range (weights may be negative)."""
    low = sum(min(w * bounds[k][0], w * bounds[k][1]) for k, w in weights.items())
    high = sum(max(w * bounds[k][0], w * bounds[k][1]) for k, w in weights.items())
    return float(low), float(high)


class Reward:
    """Base of all rewards: per-response component functions, combined into arrays.

    Subclasses set `component_bounds` and `classification_key`, implement `components` (one dict of
    floats per response) and `combine` (the total from the component arrays).
    """

    component_bounds: ClassVar[dict[str, tuple[float, float]]]
    classification_key: ClassVar[str]

    @property
    def bounds(self) -> dict[str, tuple[float, float]]:
        return {**self.component_bounds, TOTAL: self.total_bounds()}

    def total_bounds(self) -> tuple[float, float]:
        raise NotImplementedError

    def components(self, parsed: ParsedResponse, sample: Sample) -> dict[str, float]:
        raise NotImplementedError

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, parsed: Sequence[ParsedResponse], samples: Sequence[Sample]) -> dict[str, np.ndarray]:
        if len(parsed) != len(samples):
            raise ValueError(f"{type(self).__name__}: {len(parsed)} responses for {len(samples)} samples")
        names = list(self.component_bounds)
        rows = [self.components(p, s) for p, s in zip(parsed, samples, strict=True)]
        values = {k: np.fromiter((row[k] for row in rows), dtype=np.float64, count=len(rows)) for k in names}
        values[TOTAL] = np.asarray(self.combine(values), dtype=np.float64)
        return values


class WeightedReward(Reward):
    """A reward whose total is a weighted sum of its components (`weights` names each one)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        unknown = set(weights) ^ set(self.component_bounds)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: weights must name exactly {sorted(self.component_bounds)}"
            )
        for name, w in weights.items():
            if not np.isfinite(w):
                raise ValueError(f"{type(self).__name__}: weight for {name!r} must be finite, got {w}")
        self.weights = {k: float(w) for k, w in weights.items()}

    def total_bounds(self) -> tuple[float, float]:
        return weighted_bounds(self.component_bounds, self.weights)

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        total = np.zeros_like(next(iter(values.values())), dtype=np.float64)
        for name, w in self.weights.items():
            total = total + w * values[name]
        return total

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={w}' for k, w in self.weights.items())})"
