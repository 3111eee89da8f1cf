"""The contract every RolloutBackend must meet, run against each backend.

A new backend (vLLM, ...) joins by adding a factory to BACKENDS; everything above rollout/ relies on
exactly these properties of the Rollout it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from anomaly_rl.models.processing import (
    EncodedPrompts,
    encode_prompts,
    never_sampled_token_ids,
    stop_token_ids,
)
from anomaly_rl.rollout.backends import ROLLOUT_BACKENDS, UnknownBackendError, make_rollout_backend
from anomaly_rl.rollout.base import Rollout, RolloutBackend
from anomaly_rl.rollout.logprobs import completion_logprobs
from anomaly_rl.rollout.static_backend import StaticCacheBackend
from anomaly_rl.rollout.transformers_backend import SamplingError, TransformersBackend

CUDA = torch.cuda.is_available()

BACKENDS: dict[str, Callable[[], RolloutBackend]] = {
    "eager": TransformersBackend,
    "static": lambda: StaticCacheBackend(cuda_graph=False),
    "static_cuda_graph": lambda: StaticCacheBackend(cuda_graph=True),
}
DEVICES = {"eager": "cpu", "static": "cpu", "static_cuda_graph": "cuda"}
G = 4


@dataclass
class Setup:
    name: str
    backend: RolloutBackend
    model: nn.Module
    processor: object
    enc: EncodedPrompts
    never: list[int]
    eos: list[int]  # tokens the random model likes: as stop tokens they end some rows early


def frequent_tokens(model: nn.Module, enc: EncodedPrompts, never: list[int], k: int) -> list[int]:
    with torch.no_grad():
        logits = model(
            inputs_embeds=model.get_input_embeddings()(enc.input_ids), attention_mask=enc.attention_mask
        ).logits[:, -1]
    logits[:, never] = -math.inf
    return logits.mean(0).topk(k).indices.tolist()


@pytest.fixture(
    scope="module",
    params=[
        "eager",
        "static",
        pytest.param("static_cuda_graph", marks=pytest.mark.skipif(not CUDA, reason="needs a GPU")),
    ],
)
def setup(request, rollout_dir, prompts, helpers) -> Iterator[Setup]:
    name = request.param
    model, processor = helpers.load(rollout_dir)
    model = model.to(DEVICES[name]).eval()
    enc = encode_prompts(model, processor, *prompts)
    never = never_sampled_token_ids(processor, model.config.text_config.vocab_size, stop_token_ids(processor))
    yield Setup(name, BACKENDS[name](), model, processor, enc, never, frequent_tokens(model, enc, never, 25))


def run(s: Setup, *, seed: int | None = 0, **overrides) -> Rollout:
    kw = {
        "max_new_tokens": 12,
        "temperature": 0.8,
        "top_p": 0.9,
        "eos_token_ids": s.eos,
        "suppress_token_ids": s.never,
        **overrides,
    }
    generator = None if seed is None else torch.Generator(device=s.enc.input_ids.device).manual_seed(seed)
    return s.backend.sample(s.model, s.enc, G, generator=generator, **kw)


def favour(model: nn.Module, token_ids: list[int]):
    """Make `token_ids` by far the likeliest next tokens (a hook on lm_head's output)."""

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., token_ids] += 50.0
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_registry_names_every_backend() -> None:
    assert set(ROLLOUT_BACKENDS) == {"eager", "static"}
    assert isinstance(make_rollout_backend("eager"), TransformersBackend)
    assert isinstance(make_rollout_backend("static"), StaticCacheBackend)
    with pytest.raises(UnknownBackendError, match="algo.rollout_backend='vllm' is not one of eager, static"):
        make_rollout_backend("vllm")


def test_implements_the_protocol(setup: Setup) -> None:
    assert isinstance(setup.backend, RolloutBackend)


def test_shapes_dtypes_and_group_structure(setup: Setup) -> None:
    r = run(setup)
    n = setup.enc.num_prompts * G
    width = int(r.completion_lengths.max())
    assert isinstance(r, Rollout) and r.group_size == G and r.num_prompts == setup.enc.num_prompts
    assert r.completion_ids.shape == r.completion_mask.shape == r.sampling_logp.shape == (n, width)
    assert r.completion_ids.dtype == torch.long and r.completion_mask.dtype == torch.long
    assert r.sampling_logp.dtype == torch.float32 and r.truncated.dtype == torch.bool
    assert r.truncated.shape == (n,) and len(r.texts) == n
    assert torch.equal(r.prompt_ids, setup.enc.input_ids) and torch.equal(r.prompt_mask, setup.enc.attention_mask)
    assert r.prompt_index.tolist() == [b for b in range(setup.enc.num_prompts) for _ in range(G)]
    assert not r.completion_ids.requires_grad and not r.sampling_logp.requires_grad


def test_masks_stop_tokens_padding_and_truncation(setup: Setup) -> None:
    r = run(setup)
    lengths = r.completion_lengths
    assert bool((lengths < 12).any()) and bool(r.truncated.any())  # both cases are exercised
    tok = setup.processor.tokenizer
    for row, n in enumerate(lengths.tolist()):
        mask = r.completion_mask[row].tolist()
        assert mask == [1] * n + [0] * (len(mask) - n)  # a prefix of ones, never a hole
        ids = r.completion_ids[row, :n].tolist()
        stopped = not bool(r.truncated[row])
        assert not set(ids[:-1]) & set(setup.eos)  # nothing after a stop token
        assert stopped == (ids[-1] in setup.eos)  # the stop token is inside the mask
        assert stopped or n == 12  # truncated means max_new_tokens ran out
        assert bool((r.completion_ids[row, n:] == setup.enc.pad_token_id).all())
        assert bool((r.sampling_logp[row, n:] == 0).all())
        assert bool((r.sampling_logp[row, :n] < 0).all())  # real log-probs where the mask is 1
        assert r.texts[row] == tok.decode(ids, skip_special_tokens=True)


def test_sampling_logp_is_what_a_scoring_pass_computes(setup: Setup) -> None:
    r = run(setup, temperature=0.7)
    scored = completion_logprobs(
        setup.model, setup.enc, r.completion_ids, r.completion_mask, G, temperature=0.7,
        suppress_token_ids=setup.never,
    )  # fmt: skip
    torch.testing.assert_close(scored, r.sampling_logp, atol=1e-4, rtol=0)


def test_greedy_rows_of_a_group_are_identical(setup: Setup) -> None:
    r = run(setup, temperature=0.0, seed=None)
    for b in range(setup.enc.num_prompts):
        rows = r.completion_ids[b * G : (b + 1) * G]
        assert bool((rows == rows[0]).all())
    # Greedy log-probs are scored at temperature 1.
    scored = completion_logprobs(
        setup.model, setup.enc, r.completion_ids, r.completion_mask, G, suppress_token_ids=setup.never
    )
    torch.testing.assert_close(scored, r.sampling_logp, atol=1e-4, rtol=0)


def test_seeded_sampling_is_deterministic(setup: Setup) -> None:
    a, b, other = run(setup, seed=7), run(setup, seed=7), run(setup, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.equal(a.sampling_logp, b.sampling_logp)
    assert not torch.equal(a.completion_ids, other.completion_ids)  # the seed is actually used


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_max_new_tokens_and_forced_length(setup: Setup, max_new_tokens: int) -> None:
    forced = run(setup, max_new_tokens=max_new_tokens, eos_token_ids=[])
    assert forced.completion_ids.shape == (setup.enc.num_prompts * G, max_new_tokens)
    assert bool(forced.completion_mask.all()) and bool(forced.truncated.all())
    free = run(setup, max_new_tokens=max_new_tokens)
    assert free.completion_ids.shape[1] <= max_new_tokens


def test_never_sampled_tokens_are_never_sampled(setup: Setup) -> None:
    handle = favour(setup.model, setup.never)
    try:
        free = run(setup, suppress_token_ids=[], eos_token_ids=[], max_new_tokens=6)
        kept = run(setup, eos_token_ids=[], max_new_tokens=6)
    finally:
        handle.remove()
    never = torch.tensor(setup.never, device=free.completion_ids.device)
    assert bool(torch.isin(free.completion_ids, never).all())  # the hook works: the test can fail
    assert not bool(torch.isin(kept.completion_ids, never).any())


def test_a_stop_token_first_ends_every_row(setup: Setup) -> None:
    stop = stop_token_ids(setup.processor)
    handle = favour(setup.model, stop)
    try:
        r = run(setup, temperature=0.0, seed=None, eos_token_ids=stop)
    finally:
        handle.remove()
    n = setup.enc.num_prompts * G
    assert r.completion_ids.shape == (n, 1) and r.completion_ids[:, 0].tolist() == stop * n
    assert not bool(r.truncated.any()) and r.texts == [""] * n


def test_model_mode_is_restored_and_vision_is_not_run(setup: Setup, helpers) -> None:
    setup.model.train()
    try:
        with helpers.VisionCalls(setup.model) as vision:
            run(setup, max_new_tokens=3)
        assert vision.calls == 0  # image features come from encode_prompts
        assert setup.model.training
    finally:
        setup.model.eval()


def test_bad_settings_are_refused(setup: Setup) -> None:
    with pytest.raises(SamplingError, match="both stop tokens and never-sampled"):
        run(setup, eos_token_ids=[5], suppress_token_ids=[5])
    with pytest.raises(SamplingError, match="top_p"):
        run(setup, top_p=0.0)
    with pytest.raises(SamplingError, match="max_new_tokens"):
        run(setup, max_new_tokens=0)
