"""The GRPO loop under settings that used to go wrong silently: non-finite gradients, resume with a
reward that moves the weights, the LoRA reference's image features, settings checked at start."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from anomaly_rl.train import train
from tests.small_run import SMALL, algo_settings, compose_config, compose_small_run


class DenseTextReward:
    """A reward for a random model that still varies within a group: the share of some characters
    in the text, plus a 0/1 classification component that is often flat (dynamic sampling keys on it).

    Hydra passes it the keys of the composed reward config (w_cls, ...); they are ignored.
    """

    classification_key = "cls"

    def __init__(self, **_: Any) -> None:
        pass

    def __call__(self, parsed: Sequence[Any], samples: Sequence[Any]) -> dict[str, np.ndarray]:
        texts = [p.text for p in parsed]
        share = np.array([sum(c in "ab[]<>" for c in t) / (1 + len(t)) for t in texts])
        cls = np.array([float("a" in t[:3]) for t in texts])
        return {"share": share, "cls": cls, "total": share + cls}


DENSE = "reward._target_=tests.grpo.test_loop_guards.DenseTextReward"


def _all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=False)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def test_non_finite_gradient_with_a_finite_loss_stops_before_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A term whose value is 0 and whose gradient is NaN (sqrt at 0, times 0) at the third update.

    Before the guard, clip_grad_norm_ returned NaN without raising, optimizer.step() wrote NaN
    weights, and the next periodic checkpoint overwrote last.ckpt with them.
    """
    import anomaly_rl.grpo.module as module
    from anomaly_rl.training.errors import NonFiniteGradientError

    real_loss = module.policy_loss
    calls = {"n": 0}

    def loss_with_a_nan_gradient(logp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        loss, stats = real_loss(logp, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            loss = loss + torch.sqrt((logp * 0).sum())  # value 0, gradient inf * 0 = NaN
        return loss, stats

    monkeypatch.setattr(module, "policy_loss", loss_with_a_nan_gradient)
    cfg = compose_small_run(tmp_path, "nan", ["warm_start.enabled=false", "eval.enabled=false", "algo.max_steps=6", DENSE])
    with pytest.raises(NonFiniteGradientError, match="GRPO step 2"):
        train(cfg)
    last = tmp_path / "nan" / "checkpoints" / "grpo" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=False)["anomaly_rl"]["rollout_step"] == 2
    assert _all_finite(last)
    assert not (tmp_path / "nan" / "final").exists()
    assert "non-finite gradient" in (tmp_path / "nan" / "failure.txt").read_text()


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path: Path) -> None:
    from anomaly_rl.callbacks import StepCheckpoint
    from anomaly_rl.training.errors import NonFiniteWeightsError

    layer = torch.nn.Linear(2, 2)
    saved: list[Path] = []
    trainer = SimpleNamespace(
        lightning_module=layer, is_global_zero=True, save_checkpoint=lambda path: saved.append(Path(path))
    )
    checkpoint = StepCheckpoint(tmp_path, every=1)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="weight"):
        checkpoint.save(trainer)  # type: ignore[arg-type]
    assert not saved
    layer.weight.requires_grad_(False)  # frozen tensors cannot have been broken by training
    with torch.no_grad():
        layer.bias[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="bias"):
        checkpoint.save(trainer)  # type: ignore[arg-type]


def test_resume_with_a_moving_policy_gives_bit_identical_weights(tmp_path: Path) -> None:
    """Pause at step 2 of 4 and resume: the weights equal a straight run's, bit for bit.

    The reward varies within groups (weights move at every step: checked), and mu = 2,
    2 mini-batches and dynamic sampling are on, so the sampling generator, the global RNG, the
    optimiser and the scheduler all matter.

    Mutation check (done by hand once, 2026-12-02): deleting `restore_rng(state["rng"])` and the
    hand-over of the sampling generator's state in GRPOModule.on_load_checkpoint makes this test
    fail (the resumed run samples other responses from step 3 on).
    """
    common = [
        "warm_start.enabled=false", "eval.enabled=false", "algo.max_steps=4", DENSE,
        "algo.num_iterations=2", "algo.mini_batches=2", "algo.dynamic_sampling.enabled=true",
        "algo.dynamic_sampling.max_rounds=1", "algo.optimizer.lr=1e-2", "algo.beta=0.04",
    ]
    train(compose_small_run(tmp_path, "straight", common))
    first = train(compose_small_run(tmp_path, "paused", [*common, "pause_after_steps=2"]))
    assert "paused" in first
    paused_state = torch.load(tmp_path / "paused" / "checkpoints" / "grpo" / "last.ckpt", weights_only=False)
    train(compose_small_run(tmp_path, "ignored", [f"resume={tmp_path / 'paused'}"]))

    history = json.loads((tmp_path / "straight" / "grpo_history.json").read_text())
    assert len(history) == 4
    assert all(step["train/advantage_abs_mean"] > 0 for step in history), "no step would move the weights"

    straight = torch.load(tmp_path / "straight" / "final" / "weights.pt", weights_only=True)
    resumed = torch.load(tmp_path / "paused" / "final" / "weights.pt", weights_only=True)
    at_pause = {k.removeprefix("policy."): v for k, v in paused_state["state_dict"].items()}
    assert straight.keys() == resumed.keys()
    assert any(not torch.equal(straight[k], at_pause[k]) for k in straight), "steps 3-4 must change the weights"
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("algo.eps_low=1.5", "algo.eps_low"),
        ("algo.beta=-0.1", "algo.beta"),
        ("algo.temperature=0", "algo.temperature"),
        ("algo.top_p=0", "algo.top_p"),
        ("algo.lr_schedule=linear", "algo.lr_schedule"),
        ("algo.logprob_chunk_size=0", "algo.logprob_chunk_size"),
        ("algo.optimizer.lr=0", "algo.optimizer.lr"),
        ("algo.scale_rewards=std", "algo.scale_rewards"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.split=holdout", "eval.split"),
        ("warm_start.max_steps=0", "warm_start.max_steps"),
        ("control.lr=0", "control.lr"),
    ],
)
def test_every_setting_is_checked_before_data_or_weights(tmp_path: Path, override: str, setting: str) -> None:
    root = tmp_path / "root"
    cfg = compose_config("train", root, tmp_path / "run", [*SMALL, "control.enabled=true", override])
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        train(cfg)
    assert not (root / "data").exists(), "the dataset was generated before the settings were checked"
    assert not (root / "cache").exists(), "the model was built before the settings were checked"


def test_lora_reference_sees_images_through_the_base_vision_tower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under LoRA with adapters in a trainable vision tower, the reference (adapter off) computes
    its own image features; reusing the policy's (adapter on) gave other log-probs."""
    import hydra
    import lightning as L

    import anomaly_rl.grpo.module as grpo_module
    from anomaly_rl.data.datamodule import load_prompt_batch as load_batch
    from anomaly_rl.grpo.module import GRPOModule, reference_shares_image_features
    from anomaly_rl.models.loading import load_model_and_processor
    from anomaly_rl.rollout.logprobs import reference_context
    from anomaly_rl.training.batches import ResumableBatches
    from tests.grpo.test_step_reference import plain_token_logprobs

    cfg = compose_small_run(tmp_path, "lora", ["model.finetune=lora", "model.freeze_vision=false", "model.lora.r=4"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    vision_lora = [p for n, p in model.named_parameters() if "visual" in n and "lora_B" in n]
    assert vision_lora, "the fixture must put adapters in the vision tower"
    with torch.no_grad():  # a trained adapter: B = 0 would make adapter-on and -off identical
        for p in vision_lora:
            p.normal_(0, 0.5)
    assert not reference_shares_image_features(model)

    captured: dict[str, Any] = {}
    real_loss = grpo_module.policy_loss

    def recording_loss(logp: torch.Tensor, old: Any, ref: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        captured.setdefault("ref", ref.detach().clone())
        return real_loss(logp, old, ref, *args, **kwargs)

    def keep(step: int, prepared: Any, rollout: Any, *rest: Any) -> None:
        captured.update(prepared=prepared, rollout=rollout)

    monkeypatch.setattr(grpo_module, "policy_loss", recording_loss)
    settings = algo_settings(group_size=3, prompts_per_step=2, temperature=0.9, max_new_tokens=8, beta=0.04,
                             max_steps=1, lr_schedule="constant", log_samples_every=1,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    batches = ResumableBatches(datamodule.train_samples[:2], 2, 0, load_batch)
    module = GRPOModule(model, processor, hydra.utils.instantiate(cfg.schema), DenseTextReward(), batches,
                        settings, lambda: reference_context(model), sample_logger=keep)
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module)

    rollout, encoded = captured["rollout"], captured["prepared"].encoded
    rows = list(range(rollout.completion_ids.shape[0]))
    with torch.no_grad(), model.disable_adapter():
        expected = plain_token_logprobs(model, rollout, encoded, rows, list(module.suppress_token_ids),
                                        temperature=0.9, group_size=3)
    torch.testing.assert_close(captured["ref"], expected, rtol=0, atol=1e-4)
