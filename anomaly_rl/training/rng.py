"""Every global random stream, as plain tensors and numbers a weights-only checkpoint load accepts."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"], saved["cached"])
    )
    random.setstate(as_tuples(state["python"]))


def as_tuples(value: Any) -> Any:
    """random.setstate needs tuples; a checkpoint round trip may hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(as_tuples(v) for v in value)
    return value
