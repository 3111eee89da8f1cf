"""Per-token log-probabilities of given completions: policy, reference and SFT teacher forcing.

One function serves all three: a full forward pass of prompt + completion per row, reusing the image
features computed once in `encode_prompts` (inputs_embeds), so scoring never runs the vision tower.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn

from anomaly_rl.models.processing import EncodedPrompts, prompt_embeddings, unwrap_model
from anomaly_rl.rollout.transformers_backend import suppression_mask


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


def _completion_logits(
    model: nn.Module,
    enc: EncodedPrompts,
    prompt_embeds: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    rows: Tensor,
    group_size: int,
) -> Tensor:
    """[n, T, V] logits predicting completion token t of each row in `rows` (teacher forcing)."""
    base = unwrap_model(model)
    prompt_rows = rows // group_size
    ids, cmask = completion_ids[rows], completion_mask[rows]
    t_len = ids.shape[1]
    embeds = torch.cat([prompt_embeds[prompt_rows], base.get_input_embeddings()(ids)], dim=1)
    attention = torch.cat([enc.attention_mask[prompt_rows], cmask.to(enc.attention_mask.dtype)], dim=1)
    steps = torch.arange(t_len, device=ids.device)
    completion_pos = (enc.next_position[prompt_rows].unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)
    position = torch.cat([enc.position_ids[:, prompt_rows], completion_pos], dim=2)
    # The last T+1 positions: position P-1+t predicts completion token t; the final one is unused.
    out = base(
        inputs_embeds=embeds,
        attention_mask=attention,
        position_ids=position,
        use_cache=False,
        logits_to_keep=t_len + 1,
    )
    return out.logits[:, :-1]


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
) -> Tensor | tuple[Tensor, Tensor]:
    """[N, T] log p(completion token t | prompt, tokens < t), 0 where the mask is 0.

    Row n continues prompt n // group_size. Logits are divided by `temperature` and never-sampled
    tokens are set to -inf before the log-softmax, exactly as in sampling, so that with the same
    settings this recomputes Rollout.sampling_logp. Differentiable when grad is enabled.

    Rows are processed `chunk_size` at a time: this bounds the [rows, T, vocab] logits and their
    log-softmax, the largest tensors for real vocabularies. Autograd still keeps each chunk's
    activations until backward; to bound those too, call this per micro-batch and backward each.
    When the vision tower trains, enc.image_features carry one graph shared by all chunks: take a
    single backward over the total (or pass retain_graph=True).
    With return_entropy, also returns the [N, T] entropy of the same distributions (0 on padding).
    """
    _check_rows(enc, completion_ids, completion_mask, group_size)
    if temperature <= 0:
        raise ScoringError(
            f"scoring temperature must be > 0, got {temperature} (greedy samples score at 1.0)"
        )
    n_rows = completion_ids.shape[0]
    embeds = prompt_embeddings(model, enc)
    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    suppress = suppression_mask(vocab, suppress_token_ids, completion_ids.device)
    logps, entropies = [], []
    for start in range(0, n_rows, max(1, chunk_size)):
        rows = torch.arange(start, min(start + chunk_size, n_rows), device=completion_ids.device)
        logits = _completion_logits(model, enc, embeds, completion_ids, completion_mask, rows, group_size)
        logits = logits.float().masked_fill(suppress, float("-inf")) / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        mask = completion_mask[rows].bool()
        token_logp = logp_all.gather(-1, completion_ids[rows].unsqueeze(-1)).squeeze(-1)
        logps.append(token_logp.masked_fill(~mask, 0.0))
        if return_entropy:
            entropy = torch.special.entr(logp_all.exp()).sum(dim=-1)
            entropies.append(entropy.masked_fill(~mask, 0.0))
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
        logits = _completion_logits(model, enc, embeds, ids, mask, rows, group_size)
    at = logits[rows, positions].float()
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
