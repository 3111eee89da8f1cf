"""The static-cache backend against the eager loop: same tokens, same per-step logits, M-RoPE positions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from anomaly_rl.models.processing import (
    EncodedPrompts,
    encode_prompts,
    never_sampled_token_ids,
    stop_token_ids,
    unwrap_model,
)
from anomaly_rl.rollout.base import Rollout
from anomaly_rl.rollout.static_backend import StaticCacheBackend
from anomaly_rl.rollout.transformers_backend import SamplingError, TransformersBackend

G = 4
MAX_NEW = 12


def stops_and_never(model: nn.Module, processor, enc: EncodedPrompts) -> tuple[list[int], list[int]]:
    never = never_sampled_token_ids(processor, model.config.text_config.vocab_size, stop_token_ids(processor))
    with torch.no_grad():
        logits = model(
            inputs_embeds=model.get_input_embeddings()(enc.input_ids), attention_mask=enc.attention_mask
        ).logits[:, -1]
    logits[:, never] = -math.inf
    return logits.mean(0).topk(25).indices.tolist(), never


def both(model, enc, eos, never, *, seed: int | None, **kw) -> tuple[Rollout, Rollout, StaticCacheBackend]:
    settings = {"max_new_tokens": MAX_NEW, "temperature": 0.8, "top_p": 0.9, **kw}
    static = StaticCacheBackend()
    rollouts = []
    for backend in (TransformersBackend(), static):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        rollouts.append(
            backend.sample(
                model, enc, G, eos_token_ids=eos, suppress_token_ids=never, generator=generator, **settings
            )
        )
    return rollouts[0], rollouts[1], static


def assert_same(eager: Rollout, static: Rollout) -> None:
    assert torch.equal(static.completion_ids, eager.completion_ids)
    assert torch.equal(static.completion_mask, eager.completion_mask)
    assert torch.equal(static.truncated, eager.truncated) and static.texts == eager.texts
    torch.testing.assert_close(static.sampling_logp, eager.sampling_logp, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def case(loaded, prompts):
    model, processor = loaded
    enc = encode_prompts(model, processor, *prompts)
    eos, never = stops_and_never(model, processor, enc)
    return model, enc, eos, never


@pytest.mark.parametrize(
    ("temperature", "top_p", "seed"), [(0.0, 1.0, None), (0.8, 0.9, 0), (1.0, 1.0, 3), (1.3, 0.95, 11)]
)
def test_same_tokens_as_the_eager_loop(case, temperature, top_p, seed) -> None:
    model, enc, eos, never = case
    eager, static, backend = both(model, enc, eos, never, seed=seed, temperature=temperature, top_p=top_p)
    lengths = eager.completion_lengths
    # Rows stop at different steps, so the eager loop drops rows while the static one keeps them.
    assert len(set(lengths.tolist())) > 1 or temperature == 0.0
    assert_same(eager, static)
    run = backend.last_run
    assert run is not None and run.rows == enc.num_prompts * G and not run.cuda_graph  # CPU: no capture
    assert run.capacity == enc.prompt_length + MAX_NEW  # one fixed buffer for the whole response
    assert run.decode_steps == int(lengths.max()) - 1


def step_logits(model: nn.Module, sample) -> tuple[list[Tensor], Rollout]:
    """The lm_head outputs of every forward pass sample() makes: prefill, then one per decode step."""
    seen: list[Tensor] = []
    handle = unwrap_model(model).lm_head.register_forward_hook(lambda m, a, out: seen.append(out[:, -1].clone()))
    try:
        rollout = sample()
    finally:
        handle.remove()
    return seen, rollout


def test_decode_logits_equal_the_eager_loop_at_every_step(case) -> None:
    """Checks the M-RoPE positions, the attention mask and the cache slots step by step, not only argmaxes."""
    model, enc, eos, never = case
    # Image tokens compress Qwen2.5-VL's positions: the first response token's rotary position is far
    # below its cache slot, so a static path that used the slot as position would differ here.
    assert bool((enc.next_position < enc.prompt_length - 20).all())
    kw = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_p": 1.0, "eos_token_ids": eos, "suppress_token_ids": never}
    eager_logits, eager = step_logits(
        model, lambda: TransformersBackend().sample(model, enc, G, generator=torch.Generator().manual_seed(5), **kw)
    )
    static_logits, static = step_logits(
        model, lambda: StaticCacheBackend().sample(model, enc, G, generator=torch.Generator().manual_seed(5), **kw)
    )
    assert_same(eager, static)
    lengths = eager.completion_lengths
    assert len(eager_logits) == len(static_logits) == int(lengths.max())  # prefill + decode steps
    torch.testing.assert_close(static_logits[0], eager_logits[0], atol=0, rtol=0)  # the same prefill
    for t in range(1, len(eager_logits)):
        active = (lengths > t).nonzero().squeeze(1)  # rows that fed token t-1 and are still running
        assert static_logits[t].shape[0] == enc.num_prompts * G  # static: every row, every step
        assert eager_logits[t].shape[0] == len(active)  # eager: finished rows dropped
        torch.testing.assert_close(static_logits[t][active], eager_logits[t], atol=1e-5, rtol=1e-5)


def test_lora_policy_same_tokens(rollout_dir, prompts, helpers) -> None:
    """The recipe's setting: a peft model with a non-zero adapter."""
    policy, processor = helpers.load(
        rollout_dir, name="qwen2_5_vl_3b", finetune="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}
    )
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    policy.eval()
    enc = encode_prompts(policy, processor, *prompts)
    eos, never = stops_and_never(policy, processor, enc)
    assert_same(*both(policy, enc, eos, never, seed=1)[:2])


def test_eager_attention_same_tokens(rollout_dir, prompts, helpers) -> None:
    """attn_implementation=eager adds the mask to the scores: the static path builds an additive mask."""
    model, processor = helpers.load(rollout_dir, attn_implementation="eager")
    model.eval()
    enc = encode_prompts(model, processor, *prompts)
    eos, never = stops_and_never(model, processor, enc)
    assert_same(*both(model, enc, eos, never, seed=2)[:2])


def test_unsupported_attention_is_refused_by_name(case) -> None:
    model, enc, eos, never = case
    config = model.config.get_text_config()
    saved = config._attn_implementation
    config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(SamplingError, match="algo.rollout_backend=eager"):
            StaticCacheBackend().sample(
                model, enc, G, max_new_tokens=3, temperature=1.0, top_p=1.0, eos_token_ids=[], suppress_token_ids=[]
            )
    finally:
        config._attn_implementation = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_same_tokens_as_eager(rollout_dir, prompts, helpers) -> None:
    model, processor = helpers.load(rollout_dir)
    model = model.cuda().eval()
    enc = encode_prompts(model, processor, *prompts)
    eos, never = stops_and_never(model, processor, enc)
    kw = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_p": 1.0, "eos_token_ids": eos, "suppress_token_ids": never}
    eager = TransformersBackend().sample(model, enc, G, **kw)
    backend = StaticCacheBackend(cuda_graph=True)
    static = backend.sample(model, enc, G, **kw)
    assert backend.last_run is not None and backend.last_run.cuda_graph, backend.last_run
    assert_same(eager, static)
