"""Group sampling with plain transformers: prefill each prompt once, then decode G continuations.

Why not `model.generate(num_return_sequences=G)`: it copies every prompt G times before the first
forward pass, so the vision tower and the prefill run B*G times instead of B. Here the prompt is
prefilled once, its KV cache is repeated G times, and a small sampling loop decodes all B*G rows,
recording the log-probability of every drawn token (GRPO's pi_old) on the way.

The settings check, the prefill, the token draw and the DecodeRecord are shared with the static
backend (static_backend.py), which differs only in how a decode step runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from anomaly_rl.models.processing import EncodedPrompts, prompt_embeddings, unwrap_model
from anomaly_rl.rollout.base import Rollout


class SamplingError(ValueError):
    """Invalid sampling settings."""


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; use whichever this version takes."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes into a buffer with room for the whole response.

    transformers' DynamicLayer concatenates the full cache at every decoded token (O(length) copies
    per step; a third of decode time for the tiny model). This layer reserves `reserve` extra slots
    at prefill and exposes views of the filled part, so each step writes only the new token.
    """

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._len = 0

    def _expose(self) -> None:
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self._len + n > self._k.shape[-2]:
            b, h, _, _ = key_states.shape
            capacity = self._len + n + self.reserve
            k = key_states.new_empty((b, h, capacity, key_states.shape[-1]))
            v = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
            if self._len:
                k[:, :, : self._len] = self._k[:, :, : self._len]
                v[:, :, : self._len] = self._v[:, :, : self._len]
            self._k, self._v = k, v
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._expose()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._len:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._expose()

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._len:
            self._k, self._v = self._k[indices], self._v[indices]
            self._expose()


def _decode_cache(model: nn.Module, reserve: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers preallocate room for `reserve` new tokens."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(reserve) for _ in cache.layers]
    return cache


def suppression_mask(vocab_size: int, suppress_token_ids: Sequence[int], device: torch.device) -> Tensor:
    """[V] bool, True for tokens that must never be drawn."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if len(suppress_token_ids):
        mask[torch.as_tensor(list(suppress_token_ids), device=device)] = True
    return mask


def draw_tokens(
    logits: Tensor, suppress: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row; return (tokens [N], their log-probs [N]).

    The log-prob is read from the temperature-scaled, suppression-masked distribution before top-p
    filtering (see Rollout.sampling_logp).
    """
    logits = logits.float().masked_fill(suppress, float("-inf"))
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        probs = logp.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass
            # strictly before it already reaches top_p (so the most likely token always stays).
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1)


def check_settings(
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: Sequence[int],
    suppress_token_ids: Sequence[int],
) -> None:
    """Raise SamplingError for settings no backend can honour (shared by every backend)."""
    if group_size < 1 or max_new_tokens < 1:
        raise SamplingError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise SamplingError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    clash = set(eos_token_ids) & set(suppress_token_ids)
    if clash:
        raise SamplingError(f"tokens {sorted(clash)} are both stop tokens and never-sampled tokens")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Sample in eval mode (dropout off, so that sampling_logp is the policy's log-prob), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def prefill(model: nn.Module, enc: EncodedPrompts, group_size: int, max_new_tokens: int) -> tuple[Tensor, Any]:
    """Run the B prompts once and repeat their cache G times: (logits [B*G, V] of token 0, the cache).

    Rows b*G .. b*G+G-1 share prompt b's keys/values. The cache's full-attention layers have room for
    `max_new_tokens` more tokens (_PreallocatedLayer), which the static backend adopts as its buffers.
    """
    base = unwrap_model(model)
    out = base(
        inputs_embeds=prompt_embeddings(model, enc),
        attention_mask=enc.attention_mask,
        position_ids=enc.position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kwarg(base): _decode_cache(base, max_new_tokens)},
    )
    cache = _returned_cache(out)
    cache.batch_repeat_interleave(group_size)
    return out.logits[:, -1].repeat_interleave(group_size, dim=0), cache


class DecodeRecord:
    """What a sampling loop writes, row by row, and the Rollout it becomes.

    `active` holds the rows still decoding, in ascending order; a backend that drops finished rows
    from its batch (the eager loop) or keeps them (the static one) reads and narrows it the same way,
    so both record identical tensors for identical draws.
    """

    def __init__(
        self, enc: EncodedPrompts, group_size: int, max_new_tokens: int, eos_token_ids: Sequence[int]
    ) -> None:
        device = enc.input_ids.device
        n_rows = enc.num_prompts * group_size
        self.enc = enc
        self.group_size = group_size
        self.eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=device)
        self.ids = torch.full((n_rows, max_new_tokens), enc.pad_token_id, dtype=torch.long, device=device)
        self.logps = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=device)
        self.mask = torch.zeros((n_rows, max_new_tokens), dtype=torch.long, device=device)
        self.stopped = torch.zeros(n_rows, dtype=torch.bool, device=device)
        self.active = torch.arange(n_rows, device=device)

    def record(self, t: int, tokens: Tensor, token_logp: Tensor) -> Tensor:
        """Store the tokens drawn for the active rows at step t; return which of them stopped [n_active]."""
        self.ids[self.active, t] = tokens
        self.logps[self.active, t] = token_logp
        self.mask[self.active, t] = 1
        hit = torch.isin(tokens, self.eos) if self.eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        # Indexed by position, not by a boolean mask: no device-to-host sync at every step.
        self.stopped[self.active] = self.stopped[self.active] | hit
        return hit

    def rollout(self) -> Rollout:
        length = int(self.mask.sum(dim=1).max())
        ids, logps, mask = self.ids[:, :length], self.logps[:, :length], self.mask[:, :length]
        texts = self.enc.tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)], skip_special_tokens=True
        )
        return Rollout(
            prompt_ids=self.enc.input_ids,
            prompt_mask=self.enc.attention_mask,
            completion_ids=ids,
            completion_mask=mask,
            sampling_logp=logps,
            texts=texts,
            truncated=~self.stopped,
            group_size=self.group_size,
        )


@torch.no_grad()
def sample(
    model: nn.Module,
    enc: EncodedPrompts,
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    suppress_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample `group_size` responses for each encoded prompt (rows b*G .. b*G+G-1 answer prompt b).

    The model is put in eval mode while sampling (dropout off, so that sampling_logp is the policy's
    log-prob) and restored afterwards. `generator` must live on the model's device. An empty
    `eos_token_ids` forces every row to run max_new_tokens tokens.
    """
    check_settings(group_size, max_new_tokens, temperature, top_p, eos_token_ids, suppress_token_ids)
    with eval_mode(model):
        return _sample(
            model,
            enc,
            group_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_ids=eos_token_ids,
            suppress_token_ids=suppress_token_ids,
            generator=generator,
        )


def _sample(
    model: nn.Module,
    enc: EncodedPrompts,
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: Sequence[int],
    suppress_token_ids: Sequence[int],
    generator: torch.Generator | None,
) -> Rollout:
    base = unwrap_model(model)
    device = enc.input_ids.device
    cache_kw = _cache_kwarg(base)
    logits, cache = prefill(model, enc, group_size, max_new_tokens)
    suppress = suppression_mask(logits.shape[-1], suppress_token_ids, device)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, dim=0)
    next_position = enc.next_position.repeat_interleave(group_size)
    record = DecodeRecord(enc, group_size, max_new_tokens, eos_token_ids)

    for t in range(max_new_tokens):
        tokens, token_logp = draw_tokens(logits, suppress, temperature, top_p, generator)
        hit = record.record(t, tokens, token_logp)
        if t == max_new_tokens - 1 or bool(hit.all()):
            break
        if bool(hit.any()):
            # Drop finished rows from the batch: later steps cost only what is still running.
            keep = (~hit).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            record.active, tokens = record.active[keep], tokens[keep]
        active = record.active
        attention = torch.cat(
            [prompt_mask[active], torch.ones((len(active), t + 1), dtype=prompt_mask.dtype, device=device)],
            dim=1,
        )
        position = (next_position[active] + t).view(1, -1, 1).expand(3, -1, 1)
        out = base(
            input_ids=tokens.unsqueeze(1),
            attention_mask=attention,
            position_ids=position,
            use_cache=True,
            **{cache_kw: cache},
        )
        cache = _returned_cache(out)
        logits = out.logits[:, -1]
    return record.rollout()


class TransformersBackend:
    """The default RolloutBackend: eager decoding, finished rows dropped from the batch as they stop."""

    def sample(
        self,
        model: nn.Module,
        enc: EncodedPrompts,
        group_size: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_ids: Sequence[int],
        suppress_token_ids: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> Rollout:
        return sample(
            model,
            enc,
            group_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_ids=eos_token_ids,
            suppress_token_ids=suppress_token_ids,
            generator=generator,
        )
