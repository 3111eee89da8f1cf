"""Per-token log-probabilities of given completions: policy, reference and SFT teacher forcing.

One function serves all three: a full forward pass of prompt + completion per row, reusing the image
features computed once in `encode_prompts` (inputs_embeds), so scoring never runs the vision tower.
The output head runs apart from the decoder, a block of positions at a time, with the chosen
token's log-prob taken as its logit minus the logsumexp (`chosen_token_logprobs`): at Qwen2.5's
vocabulary of 151,936 the full-vocabulary float32 logits of a batch, and the several copies the
plain log_softmax chain keeps for backward, would be the largest tensors of a training step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from anomaly_rl.models.processing import EncodedPrompts, prompt_embeddings, unwrap_model
from anomaly_rl.rollout.transformers_backend import suppression_mask

# One float32 [block, vocab] working copy of the output head's logits: 441 positions at Qwen2.5's
# vocabulary of 151,936. Large enough that each block's head matmul ([441, H] x [H, V]) stays an
# efficient GEMM on a GPU; small next to a 3B model's weights and activations.
HEAD_BLOCK_BYTES = 256 * 2**20


class ScoringError(ValueError):
    """Completions do not fit the encoded prompts."""


def _check_rows(
    enc: EncodedPrompts, completion_ids: Tensor, completion_mask: Tensor, group_size: int
) -> None:
    if completion_ids.shape != completion_mask.shape or completion_ids.ndim != 2:
        raise ScoringError(
            f"completion_ids {tuple(completion_ids.shape)} and mask {tuple(completion_mask.shape)} must be equal [N, T]"
        )
    if completion_ids.shape[0] != enc.num_prompts * group_size:
        raise ScoringError(
            f"{completion_ids.shape[0]} completions for {enc.num_prompts} prompts x group_size {group_size}"
        )


def _completion_hidden(
    model: nn.Module,
    enc: EncodedPrompts,
    prompt_embeds: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    rows: Tensor,
    group_size: int,
) -> Tensor:
    """[n, T, H] final hidden states predicting completion token t of each row in `rows` (teacher forcing).

    The decoder body is called without the output head: the head is applied by the caller, block by
    block, so that the [n, T, vocab] logits of the whole chunk never exist at once.
    """
    base = unwrap_model(model)
    prompt_rows = rows // group_size
    ids, cmask = completion_ids[rows], completion_mask[rows]
    t_len = ids.shape[1]
    embeds = torch.cat([prompt_embeds[prompt_rows], base.get_input_embeddings()(ids)], dim=1)
    attention = torch.cat([enc.attention_mask[prompt_rows], cmask.to(enc.attention_mask.dtype)], dim=1)
    steps = torch.arange(t_len, device=ids.device)
    completion_pos = (enc.next_position[prompt_rows].unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)
    position = torch.cat([enc.position_ids[:, prompt_rows], completion_pos], dim=2)
    out = base.model(inputs_embeds=embeds, attention_mask=attention, position_ids=position, use_cache=False)
    # Position P-1+t predicts completion token t: the last T+1 positions without the final one.
    return out.last_hidden_state[:, -(t_len + 1) : -1]


def default_block_tokens(vocab_size: int, block_bytes: int = HEAD_BLOCK_BYTES) -> int:
    """Token positions per output-head block: one float32 [block, vocab] working copy fits `block_bytes`."""
    return max(1, block_bytes // (4 * vocab_size))


class _ChosenTokenLogprob(torch.autograd.Function):
    """log p(chosen token) = z_c / tau - logsumexp(z / tau) over the non-suppressed vocabulary.

    Forward works in one float32 copy of the block's logits (masked, scaled, exponentiated in
    place) and saves for backward the logits as they came (model dtype) and the [n] logsumexp;
    chosen_token_logprobs checkpoints each block, so these are saved only while the block is
    recomputed during backward. Backward rebuilds the softmax in one new float32 copy and turns it
    into the gradient in place: d logp / d z_j = (1[j = c, c allowed] - p_j) / tau, with p_j = 0
    for suppressed j, the gradient of the old masked_fill -> divide -> log_softmax -> gather chain.
    The entropy (optional) is computed from the same copy under no gradient: it is a logged
    statistic, never a loss term here.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        tokens: Tensor,
        suppress: Tensor,
        temperature: float,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        z = logits.to(torch.float32, copy=True)  # the one working copy; `logits` stays untouched
        z.masked_fill_(suppress, float("-inf"))
        if temperature != 1.0:
            z.div_(temperature)
        chosen = z.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top = z.amax(dim=1, keepdim=True)
        z.sub_(top).exp_()  # exp(z - max): in (0, 1], exactly 0 for suppressed tokens
        total = z.sum(dim=1)
        lse = top.squeeze(1) + total.log()
        logp = chosen - lse
        if with_entropy:
            # With e_j = exp(z_j - max) and s = sum e: p_j = e_j / s and
            # H = -sum p log p = log s + sum(-e log e) / s  (entr(0) = 0 covers suppressed tokens).
            entropy = total.log() + torch.special.entr(z, out=z).sum(dim=1) / total
        else:
            entropy = torch.zeros_like(logp)
        ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, tokens, suppress, lse)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        logits, tokens, suppress, lse = ctx.saved_tensors
        scale = grad_logp.float() / ctx.temperature
        z = logits.to(torch.float32, copy=True)
        z.masked_fill_(suppress, float("-inf"))
        if ctx.temperature != 1.0:
            z.div_(ctx.temperature)
        z.sub_(lse.unsqueeze(1)).exp_()  # softmax p, 0 where suppressed
        z.mul_(-scale.unsqueeze(1))
        allowed = (~suppress[tokens]).float()  # a suppressed chosen token scores -inf: no gradient
        z.scatter_add_(1, tokens.unsqueeze(1), (scale * allowed).unsqueeze(1))
        return z.to(logits.dtype), None, None, None, None


def chosen_token_logprobs(
    hidden: Tensor,
    head: nn.Module,
    tokens: Tensor,
    *,
    suppress: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    block_tokens: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(log p [n], entropy [n] or None) of `tokens` under head(hidden), `block_tokens` positions at a time.

    hidden: [n, H] final hidden states, one per scored position; tokens: [n] the token to score at each;
    suppress: [V] bool, tokens set to -inf before the softmax. The result equals
    log_softmax(head(hidden).float().masked_fill(suppress, -inf) / temperature)[tokens] (and its
    gradient), but each block's logits are computed, used and dropped: when gradients are needed the
    block is checkpointed (only its [block, H] hidden states are kept; the head and the softmax are
    recomputed in backward), so the peak memory is set by the block, not by n. The entropy is
    returned detached.
    """
    n = hidden.shape[0]
    vocab = int(suppress.shape[0])
    block = block_tokens or default_block_tokens(vocab)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    logps: list[Tensor] = []
    entropies: list[Tensor] = []
    for start in range(0, n, block):
        h, tok = hidden[start : start + block], tokens[start : start + block]
        if needs_grad:
            # The first call computes the entropy; the recompute during backward only needs log p.
            first = [True]

            def run(h: Tensor, tok: Tensor, first: list[bool] = first) -> tuple[Tensor, Tensor]:
                want, first[0] = with_entropy and first[0], False
                return _ChosenTokenLogprob.apply(head(h), tok, suppress, temperature, want)

            logp, entropy = checkpoint(run, h, tok, use_reentrant=False)
        else:
            logp, entropy = _ChosenTokenLogprob.apply(head(h), tok, suppress, temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    if not with_entropy:
        return logp, None
    return logp, (torch.cat(entropies) if entropies else empty)


def completion_logprobs(
    model: nn.Module,
    enc: EncodedPrompts,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    *,
    temperature: float = 1.0,
    suppress_token_ids: Sequence[int] = (),
    chunk_size: int = 8,
    return_entropy: bool = False,
    head_block_tokens: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """[N, T] log p(completion token t | prompt, tokens < t), 0 where the mask is 0.

    Row n continues prompt n // group_size. Logits are divided by `temperature` and never-sampled
    tokens are set to -inf before the log-softmax, exactly as in sampling, so that with the same
    settings this recomputes Rollout.sampling_logp. Differentiable when grad is enabled.

    Memory: the decoder runs `chunk_size` rows at a time; the output head then runs only on the
    positions the mask keeps, `head_block_tokens` of them at a time (default: a 256 MiB float32
    block, 441 positions at vocab 151,936) through `chosen_token_logprobs`, which keeps nothing of
    size vocab for backward. So the full-vocabulary logits of a chunk never exist at once, and the
    head's peak is set by the block, not by the batch. Autograd still keeps each chunk's decoder
    activations until backward; to bound those too, call this per micro-batch and backward each.
    When the vision tower trains, enc.image_features carry one graph shared by all chunks: take a
    single backward over the total (or pass retain_graph=True).
    With return_entropy, also returns the [N, T] entropy of the same distributions (0 on padding),
    detached: it is reported, not trained on.
    """
    _check_rows(enc, completion_ids, completion_mask, group_size)
    if temperature <= 0:
        raise ScoringError(
            f"scoring temperature must be > 0, got {temperature} (greedy samples score at 1.0)"
        )
    n_rows = completion_ids.shape[0]
    embeds = prompt_embeddings(model, enc)
    head = unwrap_model(model).get_output_embeddings()
    suppress = suppression_mask(head.weight.shape[0], suppress_token_ids, completion_ids.device)
    logps, entropies = [], []
    for start in range(0, n_rows, max(1, chunk_size)):
        rows = torch.arange(start, min(start + chunk_size, n_rows), device=completion_ids.device)
        hidden = _completion_hidden(model, enc, embeds, completion_ids, completion_mask, rows, group_size)
        mask = completion_mask[rows].bool()
        logp, entropy = chosen_token_logprobs(
            hidden[mask],
            head,
            completion_ids[rows][mask],
            suppress=suppress,
            temperature=temperature,
            with_entropy=return_entropy,
            block_tokens=head_block_tokens,
        )
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        logps.append(zeros.masked_scatter(mask, logp))
        if entropy is not None:
            entropies.append(zeros.masked_scatter(mask, entropy))
    logp = torch.cat(logps, dim=0)
    return (logp, torch.cat(entropies, dim=0)) if return_entropy else logp


def answer_probabilities(
    model: nn.Module,
    enc: EncodedPrompts,
    completion_ids: Tensor,
    completion_mask: Tensor,
    positions: Tensor,
    candidate_token_ids: Sequence[int],
    *,
    group_size: int = 1,
) -> Tensor:
    """[N, C] probabilities of the candidate tokens at completion position positions[n], renormalised.

    E.g. p(answer "a") for AUROC: positions = index of the answer letter inside the completion,
    candidates = ids of "a" and "b"; the softmax is taken over the candidates' logits only.
    """
    _check_rows(enc, completion_ids, completion_mask, group_size)
    positions = positions.to(completion_ids.device).long()
    if positions.shape != (completion_ids.shape[0],):
        raise ScoringError(f"positions must be [N={completion_ids.shape[0]}], got {tuple(positions.shape)}")
    if bool((positions < 0).any()) or bool((positions >= completion_ids.shape[1]).any()):
        raise ScoringError(f"positions must lie in 0..{completion_ids.shape[1] - 1}")
    if not candidate_token_ids:
        raise ScoringError("no candidate tokens")
    # Only tokens before the furthest position are needed as context.
    t_len = int(positions.max()) + 1
    ids, mask = completion_ids[:, :t_len], completion_mask[:, :t_len]
    rows = torch.arange(ids.shape[0], device=ids.device)
    with torch.no_grad():
        embeds = prompt_embeddings(model, enc)
        hidden = _completion_hidden(model, enc, embeds, ids, mask, rows, group_size)
        # The head only where an answer is read: [N, V], not [N, T, V].
        at = unwrap_model(model).get_output_embeddings()(hidden[rows, positions]).float()
    cand = torch.as_tensor(list(candidate_token_ids), device=at.device)
    return torch.softmax(at[:, cand], dim=-1)


def tokenize_completions(
    processor: Any, texts: Sequence[str], eos: str | int | None = "<|im_end|>"
) -> tuple[Tensor, Tensor]:
    """(ids [N, T], mask [N, T]) right-padded targets for teacher forcing, each ended by `eos`.

    The chat template closes an assistant turn with <|im_end|>; ending SFT targets with it teaches
    the model to stop, and matches the stop token used when sampling.
    """
    tok = processor.tokenizer
    eos_id = tok.convert_tokens_to_ids(eos) if isinstance(eos, str) else eos
    rows = [tok.encode(t, add_special_tokens=False) + ([eos_id] if eos_id is not None else []) for t in texts]
    if not rows:
        raise ScoringError("no completion texts to tokenize")
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def make_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` for full fine-tuning, where no adapter can be switched off."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def needs_reference_copy(model: nn.Module) -> bool:
    """True under full fine-tuning: the reference must then be a copy (make_reference)."""
    return not isinstance(model, PeftModel)


@contextmanager
def reference_context(model: nn.Module, ref_model: nn.Module | None = None) -> Iterator[nn.Module]:
    """Yield the module that computes reference log-probs, without gradients.

    Under LoRA: the policy itself with its adapter disabled (no second copy in memory; the base
    weights are bit-identical to the reference). Under full fine-tuning: `ref_model` from
    make_reference. The trainer writes `with reference_context(policy, ref) as r: completion_logprobs(r, ...)`
    and need not know which case it is in.
    """
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        elif isinstance(model, PeftModel):
            with model.disable_adapter():
                yield model
        else:
            raise ScoringError(
                "full fine-tuning needs a reference copy: pass ref_model=make_reference(model)"
            )
