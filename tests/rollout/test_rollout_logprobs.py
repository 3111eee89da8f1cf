"""Scoring completions: reference models, gradients, entropy, teacher forcing, answer probabilities."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from anomaly_rl.models.processing import encode_prompts, never_sampled_token_ids, stop_token_ids
from anomaly_rl.rollout.logprobs import (
    ScoringError,
    answer_probabilities,
    completion_logprobs,
    make_reference,
    needs_reference_copy,
    reference_context,
    tokenize_completions,
)
from anomaly_rl.rollout.transformers_backend import sample

TARGETS = [
    "<think>Check [10, 20, 40, 50].</think><rethink>A scratch.</rethink><answer>a</answer>",
    "<answer>b</answer>",
    "<think>normal [0, 0, 112, 112]</think><answer>b</answer>",
]


@pytest.fixture(scope="module")
def enc(loaded, prompts):
    model, processor = loaded
    return encode_prompts(model, processor, *prompts)


@pytest.fixture(scope="module")
def targets(loaded):
    _, processor = loaded
    return tokenize_completions(processor, TARGETS)


def reference_forward(model, processor, prompts, ids, mask):
    """Independent scoring: transformers' own forward from pixels and ids (no cached features, no
    explicit positions); returns [N, T, V] logits predicting each completion token."""
    texts, images = prompts
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    p = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(
            input_ids=torch.cat([batch["input_ids"], ids], 1),
            attention_mask=torch.cat([batch["attention_mask"], mask], 1),
            mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
    return logits[:, p - 1 : -1]


def test_tokenize_completions_hand_worked(loaded, targets) -> None:
    _, processor = loaded
    tok = processor.tokenizer
    ids, mask = targets
    end = tok.convert_tokens_to_ids("<|im_end|>")
    second = tok.encode("<answer>b</answer>", add_special_tokens=False) + [end]
    assert len(second) == 4  # <answer> b </answer> <|im_end|>
    assert ids[1, :4].tolist() == second and mask[1].tolist() == [1] * 4 + [0] * (ids.shape[1] - 4)
    assert bool((ids[1, 4:] == tok.pad_token_id).all())
    for row, text in enumerate(TARGETS):
        n = int(mask[row].sum())
        assert tok.decode(ids[row, :n].tolist(), skip_special_tokens=True) == text


def test_teacher_forcing_matches_transformers_forward(loaded, prompts, enc, targets) -> None:
    model, processor = loaded
    ids, mask = targets
    logp, entropy = completion_logprobs(model, enc, ids, mask, 1, return_entropy=True)
    logits = reference_forward(model, processor, prompts, ids, mask)
    expected_logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    probs = torch.softmax(logits, -1)
    expected_entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1) * mask
    torch.testing.assert_close(logp, expected_logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-4, rtol=0)
    assert bool((logp[mask == 0] == 0).all()) and bool((entropy[mask == 0] == 0).all())


def test_chunking_does_not_change_results(loaded, enc) -> None:
    model, _ = loaded
    rollout = sample(model, enc, 3, max_new_tokens=6, eos_token_ids=[])
    one = completion_logprobs(model, enc, rollout.completion_ids, rollout.completion_mask, 3, chunk_size=1)
    all_ = completion_logprobs(model, enc, rollout.completion_ids, rollout.completion_mask, 3, chunk_size=100)
    torch.testing.assert_close(one, all_, atol=1e-5, rtol=0)


def test_policy_logprobs_are_differentiable(loaded, enc, targets) -> None:
    model, _ = loaded
    ids, mask = targets
    model.zero_grad()
    completion_logprobs(model, enc, ids, mask, 1).sum().backward()
    lm = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert lm.grad is not None and lm.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.visual.parameters())  # frozen vision tower
    model.zero_grad()


def test_lora_reference_equals_base_model_exactly(rollout_dir, prompts, helpers) -> None:
    base, processor = helpers.load(rollout_dir)
    policy, _ = helpers.load(
        rollout_dir, name="qwen2_5_vl_3b", finetune="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}
    )
    base.eval(), policy.eval()
    assert isinstance(policy, PeftModel) and not needs_reference_copy(policy)
    with torch.no_grad():  # a trained adapter: B != 0, so the policy differs from the base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    enc = encode_prompts(policy, processor, *prompts)
    ids, mask = tokenize_completions(processor, TARGETS)
    base_logp = completion_logprobs(base, enc, ids, mask, 1)
    policy_logp = completion_logprobs(policy, enc, ids, mask, 1)
    with reference_context(policy) as ref:
        assert ref is policy and not torch.is_grad_enabled()
        ref_logp = completion_logprobs(ref, enc, ids, mask, 1)
    assert not torch.allclose(policy_logp, base_logp, atol=1e-3)
    assert torch.equal(ref_logp, base_logp)
    # the adapter is back on afterwards
    torch.testing.assert_close(completion_logprobs(policy, enc, ids, mask, 1), policy_logp, atol=0, rtol=0)


def test_full_finetuning_reference_is_a_frozen_copy(loaded, enc, targets) -> None:
    model, _ = loaded
    ids, mask = targets
    assert needs_reference_copy(model)
    with pytest.raises(ScoringError, match="make_reference"):
        with reference_context(model):
            pass
    ref = make_reference(model)
    assert not any(p.requires_grad for p in ref.parameters())
    before = completion_logprobs(model, enc, ids, mask, 1).detach()
    w = model.model.language_model.layers[0].mlp.up_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(0.5)  # an optimizer step on the policy
    try:
        with reference_context(model, ref) as r:
            assert r is ref
            torch.testing.assert_close(completion_logprobs(r, enc, ids, mask, 1), before, atol=0, rtol=0)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_answer_probabilities_match_the_models_logits(loaded, prompts, enc, targets) -> None:
    model, processor = loaded
    tok = processor.tokenizer
    ids, mask = targets
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    answer_open = tok.convert_tokens_to_ids("<answer>")
    positions = torch.tensor([row.tolist().index(answer_open) + 1 for row in ids])
    probs = answer_probabilities(model, enc, ids, mask, positions, [a, b])
    logits = reference_forward(model, processor, prompts, ids, mask)
    expected = torch.softmax(logits[torch.arange(3), positions][:, [a, b]], -1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_scoring_errors(loaded, enc, targets) -> None:
    model, _ = loaded
    ids, mask = targets
    with pytest.raises(ScoringError, match="group_size"):
        completion_logprobs(model, enc, ids, mask, 2)
    with pytest.raises(ScoringError, match="temperature"):
        completion_logprobs(model, enc, ids, mask, 1, temperature=0.0)
    with pytest.raises(ScoringError, match="positions"):
        answer_probabilities(model, enc, ids, mask, torch.tensor([0, 1, 99]), [1, 2])


def test_suppressed_tokens_score_minus_infinity(loaded, enc, targets) -> None:
    model, processor = loaded
    ids, mask = targets
    never = never_sampled_token_ids(processor, model.config.text_config.vocab_size, stop_token_ids(processor))
    bad = ids.clone()
    bad[0, 0] = never[0]
    logp = completion_logprobs(model, enc, bad, mask, 1, suppress_token_ids=never)
    assert logp[0, 0].item() == float("-inf") and torch.isfinite(logp[1:]).all()
