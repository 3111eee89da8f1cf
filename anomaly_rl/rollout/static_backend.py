"""Group sampling with a static KV cache and, on a GPU, the decode step replayed from a CUDA graph.

Why: on one H100 the eager loop spent ~100 ms per decoded token for 12 rows of the 3B model
(experiments/bench/README.md): the GPU waits on Python and ~1,000 kernel launches per token, not
on arithmetic. A CUDA graph replays a whole decode step with one launch, but only for fixed shapes
and fixed addresses. So here:

- the prompts are prefilled exactly as in the eager backend (one pass over the B prompts with the
  image features computed once in `encode_prompts`; the vision tower never runs here), and the
  prefill cache, repeated G times, already has room for max_new_tokens more tokens: its buffers
  become the static cache ([B*G, kv_heads, P + max_new_tokens, head_dim] per layer);
- one decode step reads only fixed buffers: the fed tokens [N, 1], a step counter, the attention
  mask [N, 1, 1, P + max_new_tokens] (prompt padding hidden, slots not yet written hidden), and
  writes the new keys/values at slot P + t with index_copy_ (no growing tensors, no host sync);
- finished rows stay in the batch (shapes must not change) and their outputs are ignored; the
  sampler still draws for the active rows only, in the eager loop's order, so that a seeded
  generator gives the same tokens as the eager backend;
- token sampling (draw_tokens) runs outside the graph: it is a handful of kernels and keeps the
  generator handling identical to the eager path.

Positions: completion token t of row n sits at next_position[n] + t on all three M-RoPE axes,
exactly as in the eager loop and in scoring (image tokens compress Qwen2.5-VL's positions, so this
is not the cache slot P + t).

On a CPU, or with cuda_graph=False, the same step function runs eagerly on the same static
buffers; this is what the CPU tests exercise. The graph is captured once per `sample` call (the
prompt width P differs between calls), after one warm-up step, which costs about one decode step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from anomaly_rl.models.processing import EncodedPrompts, unwrap_model
from anomaly_rl.rollout.base import Rollout
from anomaly_rl.rollout.transformers_backend import (
    DecodeRecord,
    SamplingError,
    _cache_kwarg,
    _PreallocatedLayer,
    check_settings,
    draw_tokens,
    eval_mode,
    prefill,
    suppression_mask,
)

# Attention implementations whose masks this path builds itself (a 4D mask is passed through as is).
_SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: nn.Module) -> str:
    """The language model's attention implementation, checked against what this path supports.

    flash_attention_2 takes 2D masks and unpads rows by their lengths, which needs host-side shapes
    at every step; sdpa and eager take the 4D mask built here as is.
    """
    config = unwrap_model(model).config
    attention = getattr(config.get_text_config(), "_attn_implementation", None) or config._attn_implementation
    if attention not in _SUPPORTED_ATTENTION:
        raise SamplingError(
            f"the static rollout backend supports attn_implementation {' or '.join(_SUPPORTED_ATTENTION)}, "
            f"got {attention!r}: use algo.rollout_backend=eager or model.attn_implementation=sdpa"
        )
    return attention


class _StaticLayer(DynamicLayer):
    """A full-attention KV layer of fixed capacity, written one slot per step at `write_pos`.

    Attention always sees the whole buffer; the 4D attention mask hides the slots not yet written,
    so no tensor changes shape or address between steps.
    """

    def __init__(self, keys: Tensor, values: Tensor, write_pos: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.write_pos = write_pos  # [1] long, on the cache's device, shared by all layers
        self.device = keys.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        self.keys.index_copy_(2, self.write_pos, key_states)
        self.values.index_copy_(2, self.write_pos, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.keys.shape[-2])


@dataclass
class StaticRunInfo:
    """What the last `sample` call did (for tests and benchmarks)."""

    rows: int
    capacity: int  # P + max_new_tokens cache slots per row
    decode_steps: int
    cuda_graph: bool  # True when the decode steps were replayed from a captured graph
    graph_error: str | None = None  # why capture was abandoned, if it was


class StaticDecoder:
    """One decode step of fixed shapes: tokens [N] in, logits [N, V] out, over a static cache.

    Built from the prefill cache (after its G-fold repeat). `__call__(t, tokens)` feeds token t of
    every row (finished rows feed anything) and returns the logits of token t + 1.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: Any,
        prompt_mask: Tensor,
        next_position: Tensor,
        max_new_tokens: int,
        *,
        cuda_graph: bool,
    ) -> None:
        self.base = unwrap_model(model)
        attention = attention_implementation(model)
        if not all(type(layer) is _PreallocatedLayer for layer in cache.layers):
            raise SamplingError(
                "the static rollout backend needs a full-attention KV cache in every layer "
                "(no sliding-window or linear-attention layers): use algo.rollout_backend=eager"
            )
        n_rows, width = prompt_mask.shape
        device = prompt_mask.device
        self.capacity = width + max_new_tokens
        self.prompt_width = width
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.write_pos = torch.full((1,), width, dtype=torch.long, device=device)
        self.tokens = torch.zeros((n_rows, 1), dtype=torch.long, device=device)
        self.next_position = next_position.clone()
        for layer in cache.layers:
            if layer._k.shape[-2] < self.capacity:
                raise SamplingError("prefill cache has less room than max_new_tokens")  # a bug, not a setting
            # The response slots were allocated uninitialised: masked-out attention weights are 0,
            # but 0 x NaN garbage would still be NaN.
            layer._k[:, :, width:].zero_()
            layer._v[:, :, width:].zero_()
        cache.layers = [
            _StaticLayer(layer._k[:, :, : self.capacity], layer._v[:, :, : self.capacity], self.write_pos)
            for layer in cache.layers
        ]
        self.cache = cache
        self.cache_kw = _cache_kwarg(self.base)
        # Which slots each row may attend to: its prompt (not the left padding), then the response
        # slots as they are written.
        visible = torch.zeros((n_rows, self.capacity), dtype=torch.bool, device=device)
        visible[:, :width] = prompt_mask.bool()
        if attention == "sdpa":
            self.mask = visible.view(n_rows, 1, 1, self.capacity)  # bool: True = attend
            self._unmask_value: bool | float = True
        else:  # eager attention adds the mask to the scores
            dtype = cache.layers[0].keys.dtype
            self.mask = torch.zeros((n_rows, 1, 1, self.capacity), dtype=dtype, device=device)
            self.mask.masked_fill_(~visible.view(n_rows, 1, 1, self.capacity), torch.finfo(dtype).min)
            self._unmask_value = 0.0
        self.use_graph = cuda_graph and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: Tensor | None = None
        self.graph_error: str | None = None

    def _step(self) -> Tensor:
        """The work of one step, reading and writing only the fixed buffers (what the graph records)."""
        torch.add(self.step_index.view(1), self.prompt_width, out=self.write_pos)
        self.mask.index_fill_(3, self.write_pos, self._unmask_value)
        position = (self.next_position + self.step_index).view(1, -1, 1).expand(3, -1, 1)
        out = self.base(
            input_ids=self.tokens,
            attention_mask=self.mask,
            position_ids=position,
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        return out.logits[:, -1]

    def _capture(self) -> None:
        """Warm up once (for real: it is step t's own work, and repeating it is harmless), then record.

        Autocast's weight-cast cache must be off while recording (PyTorch's CUDA-graph rules): a
        cast cached during capture would point into the graph's private memory.
        """
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            self.graph_logits = self._step()
        self.graph = graph

    def __call__(self, t: int, tokens: Tensor) -> Tensor:
        self.step_index.fill_(t)
        self.tokens.copy_(tokens.view(-1, 1))
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except Exception as error:  # noqa: BLE001 - any capture failure falls back to the same step, eagerly
                self.use_graph, self.graph, self.graph_logits = False, None, None
                self.graph_error = f"{type(error).__name__}: {error}"
                warnings.warn(f"CUDA graph capture failed, decoding eagerly on the static cache: {error}", stacklevel=2)
        if self.graph is not None:
            self.graph.replay()
            assert self.graph_logits is not None
            return self.graph_logits
        return self._step()


class StaticCacheBackend:
    """RolloutBackend with a static KV cache and (on CUDA) a CUDA-graph decode step.

    Gives the eager backend's tokens for greedy decoding and for seeded sampling (same prefill, same
    draws on the same active rows in the same order); decodes finished rows until the whole batch
    has stopped, which costs compute the eager loop saves, and saves the per-token launch overhead
    the eager loop pays. `cuda_graph=False` keeps the static cache without capture.
    """

    def __init__(self, cuda_graph: bool = True) -> None:
        self.cuda_graph = cuda_graph
        self.last_run: StaticRunInfo | None = None

    @torch.no_grad()
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
        check_settings(group_size, max_new_tokens, temperature, top_p, eos_token_ids, suppress_token_ids)
        with eval_mode(model):
            return self._sample(
                model, enc, group_size, max_new_tokens, temperature, top_p, eos_token_ids, suppress_token_ids,
                generator,
            )  # fmt: skip

    def _sample(
        self,
        model: nn.Module,
        enc: EncodedPrompts,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_ids: Sequence[int],
        suppress_token_ids: Sequence[int],
        generator: torch.Generator | None,
    ) -> Rollout:
        device = enc.input_ids.device
        attention_implementation(model)  # fail before the prefill, naming the setting
        logits, cache = prefill(model, enc, group_size, max_new_tokens)
        suppress = suppression_mask(logits.shape[-1], suppress_token_ids, device)
        decoder = StaticDecoder(
            model,
            cache,
            enc.attention_mask.repeat_interleave(group_size, dim=0),
            enc.next_position.repeat_interleave(group_size),
            max_new_tokens,
            cuda_graph=self.cuda_graph,
        )
        record = DecodeRecord(enc, group_size, max_new_tokens, eos_token_ids)
        feed = torch.full((enc.num_prompts * group_size,), enc.pad_token_id, dtype=torch.long, device=device)
        steps = 0
        for t in range(max_new_tokens):
            tokens, token_logp = draw_tokens(logits, suppress, temperature, top_p, generator)
            hit = record.record(t, tokens, token_logp)
            stops = int(hit.sum())  # the one device-to-host sync of a step
            if t == max_new_tokens - 1 or stops == len(hit):
                break
            feed[record.active] = tokens  # finished rows keep feeding their last token: ignored
            if stops:
                record.active = record.active[~hit]
            logits = decoder(t, feed)[record.active]
            steps += 1
        self.last_run = StaticRunInfo(
            rows=int(feed.shape[0]),
            capacity=decoder.capacity,
            decode_steps=steps,
            cuda_graph=decoder.graph is not None,
            graph_error=decoder.graph_error,
        )
        return record.rollout()
