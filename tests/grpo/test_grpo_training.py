"""The training loops end to end on a very small model: they learn, resume exactly, fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig

from anomaly_rl.train import train
from tests.small_run import algo_settings, compose_small_run


def compose_run(tmp_path: Path, run: str, overrides: list[str]) -> DictConfig:
    return compose_small_run(tmp_path, run, overrides)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final" / "weights.pt", weights_only=True)


def test_default_pipeline_runs_and_writes_its_run_folder(tmp_path: Path) -> None:
    cfg = compose_run(tmp_path, "run", ["algo.max_steps=2"])
    results = train(cfg)
    run = tmp_path / "run"
    for name in ["config.yaml", "state.json", "results.json", "results.md", "sft/weights.pt", "final/weights.pt"]:
        assert (run / name).is_file(), name
    assert set(results["rows"]) >= {"start", "grpo", "median_box"}
    for row in ("eval_start", "eval_grpo"):
        assert (run / row / "predictions.jsonl").is_file() and (run / row / "metrics.json").is_file()
    assert (run / "checkpoints" / "grpo" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.group_size=1", "algo.group_size"),
        ("algo.mini_batches=3", "algo.mini_batches"),
        ("algo.max_new_tokens=4", "algo.max_new_tokens"),
        ("init_from=/nonexistent/run", "init_from"),
        ("algo.loss_type=ppo", "algo.loss_type"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_setting(tmp_path: Path, override: str, message: str) -> None:
    cfg = compose_run(tmp_path, "bad", [override])
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "bad" / "sft").exists(), "a bad setting must fail before any training"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anomaly_rl.grpo.module as module
    from anomaly_rl.training.errors import NonFiniteLossError

    real_loss = module.policy_loss
    calls = {"n": 0}

    def loss_that_breaks(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 3 else loss), stats

    monkeypatch.setattr(module, "policy_loss", loss_that_breaks)
    cfg = compose_run(tmp_path, "nan", ["warm_start.enabled=false", "eval.enabled=false", "algo.max_steps=5"])
    with pytest.raises(NonFiniteLossError, match="GRPO step 2"):
        train(cfg)
    last = tmp_path / "nan" / "checkpoints" / "grpo" / "last.ckpt"
    assert last.is_file()
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["anomaly_rl"]["rollout_step"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert (tmp_path / "nan" / "failure.txt").is_file()


def test_grpo_raises_the_reward_of_a_fixed_batch(tmp_path: Path) -> None:
    """GRPO on one fixed batch with a dense reward (the share of the letter "a") must raise it."""
    import hydra
    import lightning as L

    from anomaly_rl.data.datamodule import AnomalyDataModule
    from anomaly_rl.data.datamodule import load_prompt_batch as load_batch
    from anomaly_rl.grpo.module import GRPOModule
    from anomaly_rl.models.loading import load_model_and_processor
    from anomaly_rl.rollout.logprobs import make_reference, reference_context
    from anomaly_rl.schemas.adfm import AdfmSchema
    from anomaly_rl.training.batches import ResumableBatches

    cfg = compose_run(tmp_path, "fixed", [])
    datamodule: AnomalyDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    schema: AdfmSchema = hydra.utils.instantiate(cfg.schema)
    def share_of_target(parsed, samples):
        values = np.array([p.text.count("a") / max(1, len(p.text)) for p in parsed], dtype=float)
        return {"target": values, "total": values}

    fixed = datamodule.train_samples[:2]
    batches = ResumableBatches(fixed, 2, 0, load_batch)
    settings = algo_settings(
        group_size=8, prompts_per_step=2, temperature=1.0, max_new_tokens=12, beta=0.0, max_steps=30,
        lr_schedule="constant", optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    )
    reference = make_reference(model)
    module = GRPOModule(model, processor, schema, share_of_target, batches, settings,
                        lambda: reference_context(model, reference))
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    rewards = [h["train/reward"] for h in module.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.05, rewards
