"""W&B tables of sampled responses: the image with true and predicted boxes, rewards, advantage.

A researcher debugging a reward needs to see what the model wrote and where it pointed; scalar
curves cannot show a reward being gamed by ever larger boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anomaly_rl.data.records import Box


def _wandb_boxes(boxes: Sequence[Box], size: tuple[int, int], class_id: int, caption: str) -> list[dict[str, Any]]:
    w, h = size
    return [
        {
            "position": {"minX": b[0] / w, "minY": b[1] / h, "maxX": b[2] / w, "maxY": b[3] / h},
            "class_id": class_id,
            "box_caption": caption,
        }
        for b in boxes
    ]


def log_rollout_table(
    step: int,
    prepared: Any,
    rollout: Any,
    parsed: Sequence[Any],
    rewards: dict[str, np.ndarray],
    advantages: torch.Tensor,
    max_rows: int = 24,
) -> None:
    """Log one table to the active W&B run (a no-op without one, e.g. under logger=csv)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    from PIL import Image

    group_size = rollout.group_size
    components = [k for k in rewards if k != "total"]
    table = wandb.Table(
        columns=["step", "image", "category", "label", "response", *components, "total", "advantage"]
    )
    for row in range(min(max_rows, len(parsed))):
        sample = prepared.samples[row // group_size]
        image = Image.open(sample.image_path).convert("RGB")
        picture = wandb.Image(
            image,
            boxes={
                "truth": {"box_data": _wandb_boxes(sample.boxes, sample.image_size, 0, "true")},
                "prediction": {"box_data": _wandb_boxes(parsed[row].boxes, sample.image_size, 1, "pred")},
            },
            classes=[{"id": 0, "name": "true"}, {"id": 1, "name": "predicted"}],
        )
        table.add_data(
            step,
            picture,
            sample.category,
            sample.label,
            rollout.texts[row],
            *[float(rewards[c][row]) for c in components],
            float(rewards["total"][row]),
            float(advantages[row]),
        )
    wandb.log({"train/samples": table})
