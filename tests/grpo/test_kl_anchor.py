"""What the KL is measured against under LoRA: the pretrained model by default (the adapter switched
off), the warm start with `model.lora.merge_warm_start=true` (its adapter folded into the base
weights before GRPO trains a fresh one) — and a run saved that way reloads to the policy it trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from anomaly_rl.train import train
from tests.grpo.test_loop_guards import DENSE
from tests.grpo.test_step_reference import plain_token_logprobs
from tests.small_run import compose_small_run

LORA = [
    "model.finetune=lora", "model.lora.r=4", "model.lora.alpha=8",
    "warm_start.max_steps=3", "warm_start.optimizer.lr=3e-2", "warm_start.warmup_steps=0",
    "eval.enabled=false", "algo.max_steps=1", "algo.beta=0.04", "algo.log_samples_every=1", DENSE,
]


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge: bool) -> dict[str, Any]:
    import anomaly_rl.grpo.module as grpo_module
    import anomaly_rl.phases.run as run_module

    captured: dict[str, Any] = {}
    real_loss = grpo_module.policy_loss

    def recording_loss(logp: torch.Tensor, old: Any, ref: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        captured.setdefault("ref", ref.detach().clone())
        return real_loss(logp, old, ref, *args, **kwargs)

    def keep(step: int, prepared: Any, rollout: Any, *rest: Any) -> None:
        captured.update(prepared=prepared, rollout=rollout)

    monkeypatch.setattr(grpo_module, "policy_loss", recording_loss)
    monkeypatch.setattr(run_module, "log_rollout_table", keep)
    cfg = compose_small_run(tmp_path, "run", [*LORA, f"model.lora.merge_warm_start={str(merge).lower()}"])
    train(cfg)
    captured["cfg"] = cfg
    captured["run"] = tmp_path / "run"
    return captured


def _fresh(cfg: Any) -> tuple[Any, Any]:
    from anomaly_rl.models.loading import load_model_and_processor

    return load_model_and_processor(cfg.model)


def _logp(model: Any, got: dict[str, Any], processor: Any) -> torch.Tensor:
    from anomaly_rl.models.processing import never_sampled_token_ids, stop_token_ids, unwrap_model

    rollout = got["rollout"]
    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    suppress = never_sampled_token_ids(processor, vocab, stop_token_ids(processor))
    with torch.no_grad():
        return plain_token_logprobs(model, rollout, got["prepared"].encoded, list(range(rollout.completion_ids.shape[0])),
                                    list(suppress), temperature=float(got["cfg"].algo.temperature),
                                    group_size=int(got["cfg"].algo.group_size))


@pytest.mark.parametrize("merge", [False, True])
def test_the_reference_is_the_base_model_or_the_warm_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge: bool) -> None:
    from anomaly_rl.models.weights import load_policy_weights

    got = _run(tmp_path, monkeypatch, merge)
    model, processor = _fresh(got["cfg"])
    with model.disable_adapter():
        base = _logp(model, got, processor)
    load_policy_weights(model, got["run"] / "sft", processor)
    warm_start = _logp(model, got, processor)
    assert (base - warm_start).abs().max() > 1e-3, "the warm start must differ from the base for this test to tell"
    expected = warm_start if merge else base
    torch.testing.assert_close(got["ref"], expected, rtol=0, atol=1e-4)


def test_a_run_trained_on_a_folded_warm_start_reloads_to_its_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """final/ holds the GRPO adapter and, under baked/0, the warm-start adapter it was trained on top
    of; loading final/ into a fresh model gives the policy of the run's last checkpoint."""
    from anomaly_rl.models.weights import load_policy_weights

    got = _run(tmp_path, monkeypatch, merge=True)
    final = got["run"] / "final"
    assert (final / "baked" / "0" / "adapter_model.safetensors").is_file()
    reloaded, processor = _fresh(got["cfg"])
    load_policy_weights(reloaded, final, processor)
    load_policy_weights(reloaded, final, processor)  # loading again must not fold the warm start in twice
    from_checkpoint, _ = _fresh(got["cfg"])
    state = torch.load(got["run"] / "checkpoints" / "grpo" / "last.ckpt", weights_only=False)["state_dict"]
    from_checkpoint.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()})
    torch.testing.assert_close(_logp(reloaded, got, processor), _logp(from_checkpoint, got, processor), rtol=0, atol=1e-5)
