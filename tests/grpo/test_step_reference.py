"""One GRPO step through the module, recomputed by an independent plain-PyTorch implementation.

The module samples a rollout, scores it, computes advantages, old / reference log-probs and the
clipped surrogate over mu x mini-batch updates. This test takes the same rollout (the texts and
token ids the module sampled) and recomputes every update from scratch, with nothing from
anomaly_rl's maths: rewards from the texts, group advantages with `statistics`-style formulas,
per-token log-probs from a plain Hugging Face forward pass over prompt + completion token ids and
pixel values (not our shared-prefix, cached-image-feature path), the loss of method.md section 4
written out per token, autograd for the gradient, and plain SGD to follow the policy from one
update to the next. Loss and gradient of every update must agree to 1e-6.

The model runs in float64 so that the two computation orders cannot differ by more than rounding
noise far below the tolerance; a real defect (an old log-prob pinned to the current policy, a
divisor that depends on the batch width, a wrong advantage) moves the numbers by 1e-3 or more.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

from tests.small_run import algo_settings, compose_small_run

GROUP = 3
PROMPTS = 2
TEMPERATURE = 0.9
MAX_NEW_TOKENS = 16  # the run's setting: Dr. GRPO's divisor
SAMPLED_TOKENS = 10  # what the rollout actually samples: narrower than the setting
LR = 2.0  # large, so that a mini-batch's policy differs measurably from the sampling policy
EPS = 0.2
ADV_EPS = 1e-4


def dense_reward(texts: list[str]) -> np.ndarray:
    """A reward that differs between responses of one group (so advantages are not all 0)."""
    return np.array([sum(c in "ab[],0123456789" for c in t) / (1 + len(t)) + 0.01 * len(t) for t in texts])


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradient it applies at every step."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.applied: list[list[torch.Tensor]] = []

    def step(self, closure: Any = None) -> Any:
        self.applied.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any, list[Any]]:
    import hydra

    from anomaly_rl.models.loading import load_model_and_processor

    tmp = tmp_path_factory.mktemp("step_reference")
    cfg = compose_small_run(tmp, "ref", [])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    model = model.double()
    schema = hydra.utils.instantiate(cfg.schema)
    samples = [s for s in datamodule.train_samples if s.is_anomalous][:1] + [
        s for s in datamodule.train_samples if not s.is_anomalous
    ][:1]
    return model, processor, schema, samples


def _run_module_step(
    small_model: tuple[Any, Any, Any, list[Any]], loss_type: str, beta: float, mu: int, mini_batches: int
) -> dict[str, Any]:
    import lightning as L

    import anomaly_rl.grpo.module as grpo_module
    from anomaly_rl.data.datamodule import load_prompt_batch as load_batch
    from anomaly_rl.grpo.module import GRPOModule
    from anomaly_rl.rollout.logprobs import make_reference, reference_context
    from anomaly_rl.rollout.transformers_backend import TransformersBackend
    from anomaly_rl.training.batches import ResumableBatches

    base_model, processor, schema, samples = small_model
    model = copy.deepcopy(base_model)
    start = copy.deepcopy(base_model)
    reference = make_reference(model)
    settings = algo_settings(
        group_size=GROUP, prompts_per_step=PROMPTS, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS,
        beta=beta, eps_low=EPS, eps_high=EPS, loss_type=loss_type, scale_rewards="group",
        advantage_eps=ADV_EPS, num_iterations=mu, mini_batches=mini_batches, max_grad_norm=1e12,
        max_steps=1, warmup_steps=0, lr_schedule="constant", log_samples_every=1,
        optimizer=lambda ps: RecordingSGD(ps, lr=LR),
    )
    captured: dict[str, Any] = {"losses": []}

    def reward(parsed: list[Any], batch_samples: list[Any]) -> dict[str, np.ndarray]:
        values = dense_reward([p.text for p in parsed])
        return {"total": values}

    def keep(step: int, prepared: Any, rollout: Any, parsed: Any, rewards: Any, advantages: Any) -> None:
        captured.update(prepared=prepared, rollout=rollout, advantages=advantages.clone())

    real_loss = grpo_module.policy_loss

    def recording_loss(*args: Any, **kwargs: Any) -> Any:
        loss, stats = real_loss(*args, **kwargs)
        captured["losses"].append(float(loss.detach()))
        return loss, stats

    class ShortRollouts(TransformersBackend):
        """Completions narrower than max_new_tokens (a random model seldom stops by itself), so
        that a divisor taken from the batch width differs from the run's constant."""

        def sample(self, *args: Any, **kwargs: Any) -> Any:
            return super().sample(*args, **{**kwargs, "max_new_tokens": SAMPLED_TOKENS})

    batches = ResumableBatches(samples, PROMPTS, 0, load_batch)
    module = GRPOModule(
        model, processor, schema, reward, batches, settings, lambda: reference_context(model, reference),
        rollout_backend=ShortRollouts(), sample_logger=keep,
    )
    trainer = L.Trainer(max_steps=mu * mini_batches, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    grpo_module.policy_loss = recording_loss
    try:
        trainer.fit(module)
    finally:
        grpo_module.policy_loss = real_loss
    captured["grads"] = module.optimizers().optimizer.applied
    captured["suppress"] = list(module.suppress_token_ids)
    captured["start"] = start
    captured["trained"] = model
    return captured


# ------------------------------------------------------------------ the independent implementation
def plain_token_logprobs(model: torch.nn.Module, rollout: Any, encoded: Any, rows: list[int],
                         suppress: list[int], temperature: float = TEMPERATURE, group_size: int = GROUP) -> torch.Tensor:
    """[len(rows), T] log-probs of the sampled tokens from ONE ordinary forward pass of the HF model
    over the full token ids (prompt + completion) and the raw pixels, temperature and the
    never-sampled tokens applied as in sampling."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prompt_index = [r // group_size for r in rows]
    ids = torch.cat([rollout.prompt_ids[prompt_index], rollout.completion_ids[rows]], dim=1)
    mask = torch.cat([rollout.prompt_mask[prompt_index], rollout.completion_mask[rows]], dim=1)
    # Each row gets its own copy of its prompt's pixels (one image per prompt here).
    patches = (encoded.image_grid_thw.prod(dim=1)).tolist()
    offsets = np.cumsum([0, *patches])
    pixels = torch.cat([encoded.pixel_values[offsets[p]: offsets[p + 1]] for p in prompt_index])
    grid = encoded.image_grid_thw[prompt_index]
    image_token = encoded.image_token_id
    logits = base(
        input_ids=ids, attention_mask=mask, pixel_values=pixels.to(base.dtype), image_grid_thw=grid,
        mm_token_type_ids=(ids == image_token).int(),
    ).logits
    prompt_len = rollout.prompt_ids.shape[1]
    width = rollout.completion_ids.shape[1]
    logits = logits[:, prompt_len - 1: prompt_len - 1 + width].clone()
    logits[..., suppress] = -math.inf
    logp = torch.log_softmax(logits / temperature, dim=-1)
    token = logp.gather(-1, rollout.completion_ids[rows].unsqueeze(-1)).squeeze(-1)
    return torch.where(rollout.completion_mask[rows].bool(), token, torch.zeros_like(token))


def plain_advantages(texts: list[str]) -> torch.Tensor:
    rewards = dense_reward(texts)
    out = []
    for g in range(0, len(rewards), GROUP):
        group = rewards[g: g + GROUP]
        spread = group.max() - group.min()
        std = float(np.std(group, ddof=1))
        out += [0.0 if spread <= 1e-6 else (r - group.mean()) / (std + ADV_EPS) for r in group]
    return torch.tensor(out, dtype=torch.float64)


def plain_loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
               mask: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    per_sequence = []
    for i in range(logp.shape[0]):
        seq = torch.zeros((), dtype=torch.float64)
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - EPS, 1 + EPS)
            term = -torch.minimum(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            seq = seq + term
        per_sequence.append((seq, int(mask[i].sum())))
        total = total + seq
    if loss_type == "grpo":
        return sum(s / n for s, n in per_sequence) / len(per_sequence)
    if loss_type == "dapo":
        return total / sum(n for _, n in per_sequence)
    return total / (len(per_sequence) * MAX_NEW_TOKENS)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("mu", "mini_batches"), [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_one_step_equals_an_independent_implementation(
    small_model: Any, loss_type: str, beta: float, mu: int, mini_batches: int
) -> None:
    got = _run_module_step(small_model, loss_type, beta, mu, mini_batches)
    rollout, encoded = got["rollout"], got["prepared"].encoded
    suppress = got["suppress"]
    rows_all = list(range(rollout.completion_ids.shape[0]))
    mask = rollout.completion_mask.bool()
    assert mask.sum(1).min() >= 1
    assert rollout.completion_ids.shape[1] <= SAMPLED_TOKENS < MAX_NEW_TOKENS

    advantages = plain_advantages(rollout.texts)
    # The module scores rewards in float32 (they come from Python floats): equal to float32 rounding.
    torch.testing.assert_close(got["advantages"].double(), advantages, rtol=0, atol=1e-6)
    assert advantages.abs().sum() > 0, "a reward without spread would test nothing"

    policy = copy.deepcopy(got["start"])
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        sampling_logp = plain_token_logprobs(policy, rollout, encoded, rows_all, suppress)
        ref = sampling_logp.clone() if beta else None  # the reference is the start of GRPO
    # The rollout's own sampling log-probs are the same distribution, computed incrementally.
    torch.testing.assert_close(rollout.sampling_logp.double(), sampling_logp, rtol=0, atol=1e-6)

    updates = mu * mini_batches
    assert len(got["grads"]) == updates and len(got["losses"]) == updates
    per_mini = PROMPTS // mini_batches
    k = 0
    moved = 0.0
    for _ in range(mu):
        for start in range(0, PROMPTS, per_mini):
            rows = list(range(start * GROUP, (start + per_mini) * GROUP))
            logp = plain_token_logprobs(policy, rollout, encoded, rows, suppress)
            # One rollout, one optimiser step: old = logp.detach(); else the sampling policy's.
            old = logp.detach() if updates == 1 else sampling_logp[rows]
            moved = max(moved, float((logp.detach() - sampling_logp[rows]).abs().max()))
            loss = plain_loss(logp, old, None if ref is None else ref[rows], advantages[rows],
                              mask[rows], beta, loss_type)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            assert abs(float(loss) - got["losses"][k]) <= 1e-6, (k, float(loss), got["losses"][k])
            for p, mine, theirs in zip(params, grads, got["grads"][k], strict=True):
                expected = torch.zeros_like(p) if mine is None else mine
                torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-6)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p -= LR * g
            k += 1
    if updates > 1:
        assert moved > 1e-3, "the policy must move between updates, or old log-probs are not tested"
    for (name, a), b in zip(got["trained"].named_parameters(), policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
