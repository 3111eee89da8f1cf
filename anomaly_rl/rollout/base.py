"""What every sampling backend returns, and the interface it implements.

The eager transformers backend is the default and the static-cache (CUDA graph) backend the fast
one on a GPU; a vLLM backend can implement the same `sample` and return the same `Rollout`, so
nothing above this floor changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from anomaly_rl.models.processing import EncodedPrompts


@dataclass
class Rollout:
    """G sampled responses for each of B prompts. Row n belongs to prompt n // group_size.

    prompt_ids / prompt_mask: [B, P] the left-padded prompts (EncodedPrompts.input_ids/attention_mask).
    completion_ids: [B*G, T] right-padded with the pad token; T = the longest response.
    completion_mask: [B*G, T] 1 for generated tokens INCLUDING the stop token, 0 after it.
    sampling_logp: [B*G, T] log-probability of each sampled token under the distribution it was drawn
        from: log_softmax of the temperature-scaled logits with never-sampled tokens at -inf, taken
        BEFORE top-p filtering (so it is the policy's log-prob at that temperature, which scoring can
        recompute; top-p only decides which tokens may be drawn). Temperature 0 (greedy) uses
        temperature 1 here. 0 where the mask is 0.
    texts: B*G decoded responses, special tokens removed (the stop token is not in the text).
    truncated: [B*G] True where max_new_tokens ran out before a stop token.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    sampling_logp: Tensor
    texts: list[str]
    truncated: Tensor
    group_size: int

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_index(self) -> Tensor:
        """[B*G] the prompt each row answers."""
        return torch.arange(self.num_prompts, device=self.prompt_ids.device).repeat_interleave(
            self.group_size
        )

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)


@runtime_checkable
class RolloutBackend(Protocol):
    """Samples `group_size` responses per encoded prompt.

    The contract (tests/rollout/test_backend_contract.py runs it against every backend): rows
    b*G .. b*G+G-1 answer prompt b; the vision tower is not run (enc carries the image features);
    the model's train/eval mode is restored; no gradient is recorded; the mask is a prefix of ones
    ending at the stop token (inside the mask) or at max_new_tokens (truncated); ids after it are the
    pad token and sampling_logp 0; sampling_logp equals what completion_logprobs recomputes at the
    same temperature and never-sampled set (temperature 1 for greedy); never-sampled tokens are
    never drawn; the same generator seed gives the same tokens; SamplingError for settings that
    cannot be honoured. Implementations: rollout/backends.py (`algo.rollout_backend`).
    """

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
    ) -> Rollout: ...
