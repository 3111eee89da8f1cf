"""Lean completion log-probs: the same values and gradients as the old full-vocabulary computation,
and a peak memory set by the head block, not by the batch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from anomaly_rl.models.processing import (
    encode_prompts,
    never_sampled_token_ids,
    prompt_embeddings,
    stop_token_ids,
    unwrap_model,
)
from anomaly_rl.rollout.logprobs import chosen_token_logprobs, completion_logprobs
from anomaly_rl.rollout.profiling import cpu_peak_bytes
from anomaly_rl.rollout.transformers_backend import suppression_mask

# --------------------------------------------------------------------------- the old implementation
# Kept verbatim (apart from names) from anomaly_rl/rollout/logprobs.py before the lean head: full
# [rows, T, V] logits per chunk, cast to float32, masked, divided, log_softmax kept for backward,
# entropy with gradient.


def old_completion_logits(model, enc, prompt_embeds, completion_ids, completion_mask, rows, group_size) -> Tensor:
    base = unwrap_model(model)
    prompt_rows = rows // group_size
    ids, cmask = completion_ids[rows], completion_mask[rows]
    t_len = ids.shape[1]
    embeds = torch.cat([prompt_embeds[prompt_rows], base.get_input_embeddings()(ids)], dim=1)
    attention = torch.cat([enc.attention_mask[prompt_rows], cmask.to(enc.attention_mask.dtype)], dim=1)
    steps = torch.arange(t_len, device=ids.device)
    completion_pos = (enc.next_position[prompt_rows].unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)
    position = torch.cat([enc.position_ids[:, prompt_rows], completion_pos], dim=2)
    out = base(
        inputs_embeds=embeds,
        attention_mask=attention,
        position_ids=position,
        use_cache=False,
        logits_to_keep=t_len + 1,
    )
    return out.logits[:, :-1]


def old_head(logits: Tensor, ids: Tensor, mask: Tensor, suppress: Tensor, temperature: float):
    logits = logits.float().masked_fill(suppress, float("-inf")) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    token_logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    entropy = torch.special.entr(logp_all.exp()).sum(dim=-1).masked_fill(~mask, 0.0)
    return token_logp, entropy


def old_completion_logprobs(
    model, enc, completion_ids, completion_mask, group_size, *, temperature=1.0, suppress_token_ids=(), chunk_size=8
):
    n_rows = completion_ids.shape[0]
    embeds = prompt_embeddings(model, enc)
    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    suppress = suppression_mask(vocab, suppress_token_ids, completion_ids.device)
    logps, entropies = [], []
    for start in range(0, n_rows, max(1, chunk_size)):
        rows = torch.arange(start, min(start + chunk_size, n_rows), device=completion_ids.device)
        logits = old_completion_logits(model, enc, embeds, completion_ids, completion_mask, rows, group_size)
        logp, entropy = old_head(logits, completion_ids[rows], completion_mask[rows].bool(), suppress, temperature)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps, dim=0), torch.cat(entropies, dim=0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def enc(loaded, prompts):
    model, processor = loaded
    return encode_prompts(model, processor, *prompts)


@pytest.fixture(scope="module")
def never(loaded) -> list[int]:
    model, processor = loaded
    return never_sampled_token_ids(processor, model.config.text_config.vocab_size, stop_token_ids(processor))


def completions(vocab: int, never: Sequence[int], lengths: Sequence[int], seed: int) -> tuple[Tensor, Tensor]:
    """Random allowed tokens, right-padded rows of the given lengths (padding id 0 must not matter)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(vocab)) - set(never)))
    width = max(lengths)
    ids = allowed[torch.randint(len(allowed), (len(lengths), width), generator=g)]
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids.masked_fill(mask == 0, 0), mask


def grads_of(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------- equality with the old computation


@pytest.mark.parametrize(
    ("temperature", "chunk_size", "block", "suppressed"),
    [(1.0, 8, None, False), (0.7, 2, 3, True), (1.3, 4, 1, True)],
)
def test_completion_logprobs_and_gradients_equal_the_old_computation(
    loaded, enc, never, temperature, chunk_size, block, suppressed
) -> None:
    model, _ = loaded
    group = 2
    vocab = model.config.text_config.vocab_size
    ids, mask = completions(vocab, never, [5, 2, 7, 7, 1, 4], seed=int(temperature * 10))
    suppress = never if suppressed else ()
    # A loss that weighs every position differently, so a gradient landing on the wrong row, position
    # or token shows.
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    model.train()
    try:
        old_logp, old_entropy = old_completion_logprobs(
            model, enc, ids, mask, group, temperature=temperature, suppress_token_ids=suppress, chunk_size=chunk_size
        )
        old_grads = grads_of(model, (old_logp * weights).sum())
        logp, entropy = completion_logprobs(
            model, enc, ids, mask, group, temperature=temperature, suppress_token_ids=suppress,
            chunk_size=chunk_size, return_entropy=True, head_block_tokens=block,
        )  # fmt: skip
        new_grads = grads_of(model, (logp * weights).sum())
    finally:
        model.eval()
    torch.testing.assert_close(logp.detach(), old_logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, old_entropy.detach(), atol=1e-5, rtol=0)
    assert not entropy.requires_grad  # a reported statistic: no graph kept for it
    assert bool((logp[mask == 0] == 0).all()) and bool((entropy[mask == 0] == 0).all())
    assert old_grads.keys() == new_grads.keys() and len(new_grads) > 10
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_reference_pass_without_gradient_equals_the_old_one(loaded, enc, never) -> None:
    model, _ = loaded
    ids, mask = completions(model.config.text_config.vocab_size, never, [3, 6, 2], seed=5)
    with torch.no_grad():
        old_logp, _ = old_completion_logprobs(model, enc, ids, mask, 1, temperature=0.9, suppress_token_ids=never)
        logp = completion_logprobs(model, enc, ids, mask, 1, temperature=0.9, suppress_token_ids=never)
    torch.testing.assert_close(logp, old_logp, atol=1e-5, rtol=0)


def random_head(vocab: int, hidden: int, dtype: torch.dtype, seed: int, trainable: bool) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False).to(dtype)
    head.weight.requires_grad_(trainable)
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chosen_token_logprobs_head_equals_log_softmax(dtype) -> None:
    """The head alone at a larger vocabulary, the head's weight trained too, in float32 and bfloat16."""
    vocab, width, n = 3000, 16, 50
    head = random_head(vocab, width, dtype, seed=0, trainable=True)
    g = torch.Generator().manual_seed(2)
    hidden = (3 * torch.randn(n, width, generator=g)).to(dtype).requires_grad_(True)
    suppress = torch.zeros(vocab, dtype=torch.bool)
    suppress[torch.randperm(vocab, generator=g)[:500]] = True
    allowed = (~suppress).nonzero().squeeze(1)
    tokens = allowed[torch.randint(len(allowed), (n,), generator=g)]
    # One never-sampled target (an SFT target could hold one): log p = -inf, and the old chain's
    # masked_fill gave its own logit no gradient while every other logit still got -p_j.
    tokens[3] = suppress.nonzero()[0, 0]
    weights = torch.randn(n, generator=g)
    every = torch.ones(n, 1, dtype=torch.bool)

    old_logp, old_entropy = old_head(head(hidden).unsqueeze(1), tokens.unsqueeze(1), every, suppress, 0.8)
    old_logp, old_entropy = old_logp.squeeze(1), old_entropy.squeeze(1)
    (old_logp * weights).sum().backward()
    old_dh, old_dw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    logp, entropy = chosen_token_logprobs(
        hidden, head, tokens, suppress=suppress, temperature=0.8, with_entropy=True, block_tokens=7
    )
    (logp * weights).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(logp.detach(), old_logp.detach(), **tol)
    assert logp[3].item() == float("-inf") and torch.isfinite(logp[torch.arange(n) != 3]).all()
    torch.testing.assert_close(entropy, old_entropy.detach(), **tol)
    assert torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(hidden.grad, old_dh, **tol)
    torch.testing.assert_close(head.weight.grad, old_dw, **tol)
    assert hidden.grad.dtype == dtype


# --------------------------------------------------------------------------- peak memory


def head_pass_peak(n: int, block: int, *, old: bool, vocab: int = 16384, width: int = 8) -> int:
    """CPU allocator peak (bytes above the start) of forward + backward of the head part for n positions.

    The vocabulary is large and the hidden size tiny, so everything of size vocab dominates and
    the inputs' and hidden gradients' growth with n is negligible (n x 8 floats).
    """
    head = random_head(vocab, width, torch.float32, seed=0, trainable=False)  # frozen, as under LoRA
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, width, generator=g).requires_grad_(True)
    tokens = torch.randint(vocab, (n,), generator=g)
    suppress = torch.zeros(vocab, dtype=torch.bool)

    def run() -> None:
        if old:
            logp, entropy = old_head(
                head(hidden).unsqueeze(1), tokens.unsqueeze(1), torch.ones(n, 1, dtype=torch.bool), suppress, 0.9
            )
        else:
            logp, entropy = chosen_token_logprobs(
                hidden, head, tokens, suppress=suppress, temperature=0.9, with_entropy=True, block_tokens=block
            )
        logp.sum().backward()

    return cpu_peak_bytes(run)[1]


def test_peak_memory_grows_with_the_block_not_with_the_batch() -> None:
    vocab = 16384
    block_bytes = 32 * vocab * 4  # one float32 [32, vocab] block: 2 MiB
    small, large = head_pass_peak(64, 32, old=False), head_pass_peak(1024, 32, old=False)
    wider = head_pass_peak(1024, 128, old=False)
    old_small, old_large = head_pass_peak(64, 32, old=True), head_pass_peak(1024, 32, old=True)
    # The measurement itself: the old computation holds several full-vocabulary copies of all rows.
    assert old_large - old_small > 3 * (1024 - 64) * vocab * 4
    # 16x the positions, same block: the peak moves by less than 1 % of one float32 full-vocabulary
    # copy of the added positions (what remains is hidden-sized: n x 8 floats of gradients).
    assert abs(large - small) < 0.01 * (1024 - 64) * vocab * 4
    # 4x the block, same positions: the peak grows by at least three more blocks' working copies.
    assert wider - large > 3 * block_bytes
    # And the lean pass stays within a few blocks: logits, the float32 copy and the gradient.
    assert large < 5 * block_bytes
    assert old_large > 20 * large
