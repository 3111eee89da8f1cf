"""Group sampling: recorded log-probs, vision once per prompt, suppression, agreement with generate()."""

from __future__ import annotations

import math

import pytest
import torch

from anomaly_rl.models.processing import encode_prompts, never_sampled_token_ids, stop_token_ids
from anomaly_rl.rollout.base import Rollout, RolloutBackend
from anomaly_rl.rollout.logprobs import completion_logprobs
from anomaly_rl.rollout.transformers_backend import SamplingError, TransformersBackend, draw_tokens, sample

G = 4


@pytest.fixture(scope="module")
def enc(loaded, prompts):
    model, processor = loaded
    texts, images = prompts
    return encode_prompts(model, processor, texts, images)


@pytest.fixture(scope="module")
def never(loaded):
    model, processor = loaded
    return never_sampled_token_ids(processor, model.config.text_config.vocab_size, stop_token_ids(processor))


def frequent_stops(model, enc, never, k: int = 25) -> list[int]:
    """The k tokens the random model likes most after the prompts: as stop tokens they end rows early."""
    with torch.no_grad():
        logits = model(
            inputs_embeds=model.get_input_embeddings()(enc.input_ids), attention_mask=enc.attention_mask
        ).logits[:, -1]
    logits[:, never] = -math.inf
    return logits.mean(0).topk(k).indices.tolist()


def test_sampling_logp_is_recomputed_by_scoring(loaded, enc, never) -> None:
    model, _ = loaded
    eos = frequent_stops(model, enc, never)
    rollout = sample(
        model, enc, G, max_new_tokens=12, temperature=0.7, top_p=0.9, eos_token_ids=eos,
        suppress_token_ids=never, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    lengths = rollout.completion_lengths
    assert rollout.completion_ids.shape == (3 * G, int(lengths.max()))
    assert bool((lengths < 12).any()) and bool(rollout.truncated.any())  # early stops and full-length rows
    for row, n in enumerate(lengths.tolist()):
        ids = rollout.completion_ids[row, :n].tolist()
        stopped = not bool(rollout.truncated[row])
        assert stopped == (ids[-1] in eos) and not set(ids[:-1]) & set(eos)  # mask ends with the stop token
        assert stopped or n == 12
        assert bool((rollout.completion_ids[row, n:] == enc.pad_token_id).all())
    recomputed = completion_logprobs(
        model,
        enc,
        rollout.completion_ids,
        rollout.completion_mask,
        G,
        temperature=0.7,
        suppress_token_ids=never,
    )
    torch.testing.assert_close(recomputed, rollout.sampling_logp, atol=1e-4, rtol=0)
    assert bool((rollout.sampling_logp[rollout.completion_mask == 0] == 0).all())


def test_vision_runs_once_per_prompt_not_per_response(loaded, prompts, never, helpers) -> None:
    model, processor = loaded
    texts, images = prompts
    with helpers.VisionCalls(model) as vision:
        enc = encode_prompts(model, processor, texts, images)
        assert vision.calls == 1  # one batched call for the B prompts' images
        rollout = sample(model, enc, G, max_new_tokens=6, eos_token_ids=[], suppress_token_ids=never)
        completion_logprobs(model, enc, rollout.completion_ids, rollout.completion_mask, G, chunk_size=5)
        assert vision.calls == 1  # sampling B*G rows and scoring them reused the features


def test_greedy_groups_are_contiguous_and_match_generate(loaded, prompts, enc, never) -> None:
    """Independent check of prefill, cache expansion, row dropping and mrope decode positions."""
    model, processor = loaded
    stop = stop_token_ids(processor)
    eos = frequent_stops(model, enc, never, k=10) + stop
    rollout = sample(
        model, enc, 3, max_new_tokens=10, temperature=0.0, eos_token_ids=eos, suppress_token_ids=never
    )
    texts, images = prompts
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=10, eos_token_id=eos, suppress_tokens=never,
            pad_token_id=enc.pad_token_id,
        )  # fmt: skip
    theirs = out[:, batch["input_ids"].shape[1] :]
    for b in range(3):
        rows = rollout.completion_ids[3 * b : 3 * b + 3]
        assert bool((rows == rows[0]).all())  # a group is G copies of prompt b under greedy decoding
        n = int(rollout.completion_mask[3 * b].sum())
        assert rows[0, :n].tolist() == theirs[b, :n].tolist()


def favour(model, token_ids: list[int]):
    """Make `token_ids` by far the likeliest next tokens (a hook on lm_head's output)."""

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., token_ids] += 50.0
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_never_sampled_tokens_are_never_sampled(loaded, enc, never) -> None:
    model, _ = loaded
    handle = favour(model, never)
    try:
        free = sample(model, enc, G, max_new_tokens=8, eos_token_ids=[], suppress_token_ids=[])
        kept = sample(model, enc, G, max_new_tokens=8, eos_token_ids=[], suppress_token_ids=never)
    finally:
        handle.remove()
    assert bool(torch.isin(free.completion_ids, torch.tensor(never)).all())  # the test can fail
    assert not bool(torch.isin(kept.completion_ids, torch.tensor(never)).any())


def test_draw_tokens_top_p_and_temperature_hand_worked() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    none = torch.zeros(4, dtype=torch.bool)
    tokens, logp = draw_tokens(logits, none, 1.0, 0.7, torch.Generator().manual_seed(0))
    # top-p 0.7 keeps {0, 1} (0.5 < 0.7 before token 1; 0.8 >= 0.7 before token 2), renormalised
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.015
    # recorded log-probs are those BEFORE top-p filtering
    torch.testing.assert_close(logp, probs.log()[tokens])
    # temperature 2: p ~ sqrt(p); suppression removes token 0
    suppress = torch.tensor([True, False, False, False])
    tokens, logp = draw_tokens(logits, suppress, 2.0, 1.0, torch.Generator().manual_seed(1))
    tempered = torch.tensor([0.0, 0.3, 0.15, 0.05]).sqrt()
    tempered = tempered / tempered.sum()
    assert 0 not in set(tokens.tolist())
    torch.testing.assert_close(logp, tempered.log()[tokens])
    assert abs((tokens == 1).float().mean().item() - tempered[1].item()) < 0.015
    # temperature 0: argmax, scored at temperature 1
    tokens, logp = draw_tokens(logits[:2], none, 0.0, 1.0, None)
    assert tokens.tolist() == [0, 0] and torch.allclose(logp, probs.log()[[0, 0]])


def test_forced_length_seeds_and_modes(loaded, enc, never) -> None:
    model, processor = loaded
    model.train()
    try:
        kw = {
            "max_new_tokens": 7,
            "temperature": 1.0,
            "top_p": 1.0,
            "eos_token_ids": [],
            "suppress_token_ids": never,
        }
        a = sample(model, enc, 2, generator=torch.Generator().manual_seed(3), **kw)
        assert model.training  # restored after sampling in eval mode
        b = TransformersBackend().sample(model, enc, 2, generator=torch.Generator().manual_seed(3), **kw)
    finally:
        model.eval()
    assert isinstance(a, Rollout) and isinstance(TransformersBackend(), RolloutBackend)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert a.completion_ids.shape == (6, 7) and bool(a.truncated.all()) and bool(a.completion_mask.all())
    assert a.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    tok = processor.tokenizer
    assert a.texts[0] == tok.decode(a.completion_ids[0].tolist(), skip_special_tokens=True)


def test_stop_token_is_masked_in_but_not_in_the_text(loaded, enc, never) -> None:
    model, processor = loaded
    stop = stop_token_ids(processor)
    handle = favour(model, stop)
    try:
        rollout = sample(
            model, enc, 2, max_new_tokens=5, temperature=0.0, eos_token_ids=stop, suppress_token_ids=never
        )
    finally:
        handle.remove()
    assert rollout.completion_ids.shape == (6, 1) and rollout.completion_ids[:, 0].tolist() == stop * 6
    assert rollout.completion_mask.tolist() == [[1]] * 6 and not bool(rollout.truncated.any())
    assert rollout.texts == [""] * 6


def test_bad_settings(loaded, enc) -> None:
    model, _ = loaded
    with pytest.raises(SamplingError, match="both stop tokens and never-sampled"):
        sample(model, enc, 2, max_new_tokens=3, eos_token_ids=[5], suppress_token_ids=[5])
    with pytest.raises(SamplingError, match="top_p"):
        sample(model, enc, 2, max_new_tokens=3, top_p=0.0)
