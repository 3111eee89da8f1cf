"""Evaluation placement: the trainer's device and precision, and shards that reassemble in order."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from anomaly_rl.evaluation.placement import on_accelerator, placement_trainer, shard, unshard


@given(st.lists(st.integers(), max_size=40), st.integers(min_value=1, max_value=8))
def test_shards_are_disjoint_balanced_and_reassemble_in_order(items: list[int], processes: int) -> None:
    shards = [shard(items, p, processes) for p in range(processes)]
    assert sorted(len(s) for s in shards)[-1] - sorted(len(s) for s in shards)[0] <= 1
    assert unshard(shards) == items


def test_evaluation_runs_at_the_trainer_precision() -> None:
    trainer = placement_trainer(OmegaConf.create({"_target_": "lightning.Trainer", "accelerator": "cpu",
                                                  "devices": 1, "precision": "bf16-mixed"}))
    model = torch.nn.Linear(4, 4)
    with on_accelerator(model, trainer) as device:
        assert device == torch.device("cpu")
        assert torch.is_autocast_enabled("cpu")
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
