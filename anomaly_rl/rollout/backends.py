"""Rollout backends by name: the value of `algo.rollout_backend`.

eager   TransformersBackend: token-by-token eager decoding, finished rows dropped as they stop.
static  StaticCacheBackend: a static KV cache; on CUDA each decode step is replayed from a CUDA
        graph. Same tokens as eager for greedy and seeded sampling; faster where decoding is bound
        by per-token launch overhead (a GPU), no faster on a CPU.
A vLLM backend would be one more entry returning the same Rollout (rollout/base.py).
"""

from __future__ import annotations

from collections.abc import Callable

from anomaly_rl.rollout.base import RolloutBackend
from anomaly_rl.rollout.static_backend import StaticCacheBackend
from anomaly_rl.rollout.transformers_backend import TransformersBackend

ROLLOUT_BACKENDS: dict[str, Callable[[], RolloutBackend]] = {
    "eager": TransformersBackend,
    "static": StaticCacheBackend,
}


class UnknownBackendError(ValueError):
    """algo.rollout_backend names no backend."""


def make_rollout_backend(name: str) -> RolloutBackend:
    """The backend `algo.rollout_backend` names."""
    try:
        factory = ROLLOUT_BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(
            f"algo.rollout_backend={name!r} is not one of {', '.join(sorted(ROLLOUT_BACKENDS))}"
        ) from None
    return factory()
