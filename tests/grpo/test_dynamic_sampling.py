"""Dynamic sampling: groups whose classification reward is flat are sampled again, up to a limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anomaly_rl.grpo.module import replace_groups
from anomaly_rl.rollout.base import Rollout
from tests.small_run import algo_settings, compose_small_run


def _rollout(width: int, fill: int, group_size: int, groups: int, tag: str) -> Rollout:
    rows = group_size * groups
    return Rollout(
        prompt_ids=torch.zeros(groups, 3, dtype=torch.long),
        prompt_mask=torch.ones(groups, 3, dtype=torch.long),
        completion_ids=torch.full((rows, width), fill, dtype=torch.long),
        completion_mask=torch.ones(rows, width, dtype=torch.long),
        sampling_logp=torch.full((rows, width), -float(fill)),
        texts=[f"{tag}{i}" for i in range(rows)],
        truncated=torch.tensor([tag == "fresh"] * rows),
        group_size=group_size,
    )


def test_replace_groups_takes_the_flagged_groups_from_the_fresh_rollout() -> None:
    old = _rollout(width=2, fill=5, group_size=2, groups=3, tag="old")
    fresh = _rollout(width=4, fill=7, group_size=2, groups=3, tag="fresh")
    merged = replace_groups(old, torch.tensor([False, True, False]), fresh, pad_id=0)
    # Group 1 (rows 2, 3) comes from `fresh`; the others keep their rows, padded to the wider width.
    assert merged.texts == ["old0", "old1", "fresh2", "fresh3", "old4", "old5"]
    assert merged.completion_ids.shape == (6, 4)
    expected_ids = torch.tensor([[5, 5, 0, 0]] * 2 + [[7, 7, 7, 7]] * 2 + [[5, 5, 0, 0]] * 2)
    torch.testing.assert_close(merged.completion_ids, expected_ids)
    expected_mask = torch.tensor([[1, 1, 0, 0]] * 2 + [[1, 1, 1, 1]] * 2 + [[1, 1, 0, 0]] * 2)
    torch.testing.assert_close(merged.completion_mask, expected_mask)
    assert merged.sampling_logp[2, 3] == -7.0 and merged.sampling_logp[0, 3] == 0.0
    assert merged.truncated.tolist() == [False, False, True, True, False, False]


def _module(tmp_path: Path, reward: Any, max_rounds: int) -> Any:
    import hydra

    from anomaly_rl.data.datamodule import AnomalyDataModule
    from anomaly_rl.data.datamodule import load_prompt_batch as load_batch
    from anomaly_rl.grpo.module import GRPOModule
    from anomaly_rl.models.loading import load_model_and_processor
    from anomaly_rl.training.batches import ResumableBatches

    cfg = compose_small_run(tmp_path, "dyn", [])
    datamodule: AnomalyDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    settings = algo_settings(
        group_size=3, prompts_per_step=2, temperature=1.0, max_new_tokens=8, beta=0.0, max_steps=1,
        lr_schedule="constant", dynamic_sampling={"enabled": True, "max_rounds": max_rounds}, log_samples_every=1,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4),
    )
    batches = ResumableBatches(datamodule.train_samples[:2], 2, 0, load_batch)
    schema = hydra.utils.instantiate(cfg.schema)
    trained: list[list[str]] = []

    def keep_texts(step: int, prepared: Any, rollout: Rollout, *rest: Any) -> None:
        trained.append(list(rollout.texts))

    module = GRPOModule(model, processor, schema, reward, batches, settings, None, sample_logger=keep_texts)
    module.trained_texts = trained
    return module


def _fit_one_step(module: Any) -> list[str]:
    """Run one GRPO step; return the texts of every rollout the module sampled, in order."""
    import lightning as L

    sampled: list[list[str]] = []
    original = module._sample

    def counting(prepared: Any) -> Rollout:
        rollout = original(prepared)
        sampled.append(list(rollout.texts))
        return rollout

    module._sample = counting
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    return sampled


def _reward(cls_of_call: Any) -> Any:
    """A reward whose classification component is chosen per call (the n-th scoring of a step)."""
    calls = {"n": 0}

    def reward(parsed: list[Any], samples: list[Any]) -> dict[str, np.ndarray]:
        cls = np.asarray(cls_of_call(calls["n"], len(parsed)), dtype=float)
        calls["n"] += 1
        return {"cls": cls, "total": cls + np.arange(len(parsed)) * 0.01}

    return reward


@pytest.mark.parametrize(
    ("cls_of_call", "max_rounds", "expected_rounds"),
    [
        # Every group differs: nothing is resampled.
        (lambda call, n: [i % 2 for i in range(n)], 3, 0),
        # Flat on the first scoring, varied on the second: one round of resampling.
        (lambda call, n: [0] * n if call == 0 else [i % 2 for i in range(n)], 3, 1),
        # Always flat: resampled up to the limit, then kept.
        (lambda call, n: [1] * n, 2, 2),
    ],
)
def test_flat_groups_are_sampled_again_up_to_the_limit(
    tmp_path: Path, cls_of_call: Any, max_rounds: int, expected_rounds: int
) -> None:
    module = _module(tmp_path, _reward(cls_of_call), max_rounds)
    sampled = _fit_one_step(module)
    assert len(sampled) == 1 + expected_rounds
    assert module.history[-1]["train/dynamic_sampling_rounds"] == expected_rounds
    # Every group was flat in each resampled round, so what trained is the last sample in full.
    assert module.trained_texts == [sampled[-1]]
    if expected_rounds:
        assert sampled[-1] != sampled[0]  # a fresh draw, not the first responses again
