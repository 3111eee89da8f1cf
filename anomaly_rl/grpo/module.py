"""The GRPO LightningModule: it orchestrates one step and holds no maths of its own.

rollout -> parse -> reward -> advantages -> (reference log-probs) -> mu x mini-batch updates.
Each arrow is a function tested on its own (rollout/, schemas/, rewards/, grpo/advantages.py,
grpo/loss.py); this file wires them, times them and logs what they return.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch

from anomaly_rl.data.records import Sample
from anomaly_rl.grpo.advantages import group_advantages, zero_std_group_fraction, zero_variance_groups
from anomaly_rl.grpo.batches import ResumableBatches
from anomaly_rl.grpo.errors import NonFiniteLossError
from anomaly_rl.grpo.loss import policy_loss
from anomaly_rl.grpo.prompts import PreparedPrompts, parse_in_original_frame, prepare_prompts, select_prompts
from anomaly_rl.grpo.rng import capture_rng, restore_rng
from anomaly_rl.grpo.schedule import lr_factor
from anomaly_rl.models.processing import (
    never_sampled_token_ids,
    stop_token_ids,
    unwrap_model,
    vision_is_frozen,
    with_image_features_from,
)
from anomaly_rl.rollout.base import Rollout, RolloutBackend
from anomaly_rl.rollout.logprobs import completion_logprobs
from anomaly_rl.rollout.transformers_backend import TransformersBackend
from anomaly_rl.schemas.base import Schema
from anomaly_rl.schemas.parsed import ParsedResponse


@dataclass
class GRPOSettings:
    group_size: int = 6
    prompts_per_step: int = 8
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 512
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    advantage_eps: float = 1e-4
    num_iterations: int = 1
    mini_batches: int = 1
    max_grad_norm: float = 1.0
    max_steps: int = 200
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    logprob_chunk_size: int = 16
    dynamic_sampling: bool = False
    dynamic_max_rounds: int = 3
    log_samples_every: int = 50
    num_references: int = 0
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = field(default=None, repr=False)

    def validate(self, min_new_tokens: int) -> None:
        """Fail at start, naming the setting, rather than after minutes of rollouts."""
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 (GRPO compares responses), got {self.group_size}")
        if self.prompts_per_step < 1:
            raise ValueError(f"algo.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.prompts_per_step % self.mini_batches:
            raise ValueError(
                f"algo.prompts_per_step={self.prompts_per_step} is not divisible by "
                f"algo.mini_batches={self.mini_batches}: a group must never span mini-batches"
            )
        if self.max_new_tokens < min_new_tokens:
            raise ValueError(
                f"algo.max_new_tokens={self.max_new_tokens} is too few for the schema, whose shortest "
                f"valid response needs about {min_new_tokens} tokens"
            )
        if self.loss_type not in {"grpo", "dapo", "dr_grpo"}:
            raise ValueError(f"algo.loss_type must be grpo, dapo or dr_grpo, got {self.loss_type!r}")
        if self.scale_rewards not in {"group", "batch", "none"}:
            raise ValueError(f"algo.scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.num_iterations < 1:
            raise ValueError(f"algo.num_iterations must be >= 1, got {self.num_iterations}")


def replace_groups(rollout: Rollout, groups: torch.Tensor, fresh: Rollout, pad_id: int) -> Rollout:
    """`rollout` with the rows of the groups flagged in `groups` taken from `fresh`.

    The two rollouts may have different completion widths; both are padded to the wider one.
    """
    width = max(rollout.completion_ids.shape[1], fresh.completion_ids.shape[1])

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    rows = groups.repeat_interleave(rollout.group_size).to(rollout.completion_ids.device)
    pick = rows.unsqueeze(1)
    return Rollout(
        prompt_ids=rollout.prompt_ids,
        prompt_mask=rollout.prompt_mask,
        completion_ids=torch.where(pick, pad(fresh.completion_ids, pad_id), pad(rollout.completion_ids, pad_id)),
        completion_mask=torch.where(pick, pad(fresh.completion_mask, 0), pad(rollout.completion_mask, 0)),
        sampling_logp=torch.where(pick, pad(fresh.sampling_logp, 0.0), pad(rollout.sampling_logp, 0.0)),
        texts=[f if r else o for o, f, r in zip(rollout.texts, fresh.texts, rows.tolist(), strict=True)],
        truncated=torch.where(rows, fresh.truncated, rollout.truncated),
        group_size=rollout.group_size,
    )


def box_area_metrics(parsed: Sequence[ParsedResponse], samples: Sequence[Sample]) -> dict[str, float]:
    """Mean predicted against true box area on defective images (original pixels).

    A localisation reward can be gamed by ever larger boxes (findings.md: 9x in one prototype);
    this pair of curves shows it as it happens.
    """
    predicted = [(b[2] - b[0]) * (b[3] - b[1]) for p, s in zip(parsed, samples, strict=True) if s.is_anomalous for b in p.boxes]
    true = [(b[2] - b[0]) * (b[3] - b[1]) for s in samples if s.is_anomalous for b in s.boxes]
    metrics = {}
    if predicted:
        metrics["train/box_area_pred_mean"] = float(np.mean(np.clip(predicted, -1e9, 1e9)))
    if true:
        metrics["train/box_area_true_mean"] = float(np.mean(true))
    return metrics


def _repeat(items: Sequence[Any], times: int) -> list[Any]:
    return [item for item in items for _ in range(times)]


class GRPOModule(L.LightningModule):
    """Manual optimisation: one training_step = one generated batch and its mu x mini-batch updates."""

    def __init__(
        self,
        policy: torch.nn.Module,
        processor: Any,
        schema: Schema,
        reward: Callable[[Sequence[ParsedResponse], Sequence[Sample]], dict[str, np.ndarray]],
        batches: ResumableBatches,
        settings: GRPOSettings,
        reference_context: Callable[[], Any],
        rollout_backend: RolloutBackend | None = None,
        sample_logger: Callable[[int, PreparedPrompts, Rollout, list[ParsedResponse], dict, torch.Tensor], None]
        | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.processor = processor
        self.schema = schema
        self.reward = reward
        self.batches = batches
        self.settings = settings
        # A callable entering "reference mode": the adapter disabled under LoRA, or a frozen copy.
        self.reference_context = reference_context
        self.backend = rollout_backend or TransformersBackend()
        self.eos_token_ids = stop_token_ids(processor)
        vocab = unwrap_model(policy).get_output_embeddings().weight.shape[0]
        self.suppress_token_ids = never_sampled_token_ids(processor, vocab, self.eos_token_ids)
        self.sample_logger = sample_logger
        self.rollout_step = 0  # generated batches consumed; batch k of `batches` is used at step k
        # Created on the policy's device at the first rollout (multinomial needs a generator on
        # the device of the probabilities); a resumed run hands its saved state over.
        self._sampling_generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- Lightning plumbing
    def train_dataloader(self) -> ResumableBatches:
        self.batches.start_index = self.rollout_step
        return self.batches

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode; LoRA dropout and the like must be active while training.
        self.policy.train()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (check model.finetune / model.lora)")
        factory = self.settings.optimizer_factory or (lambda ps: torch.optim.AdamW(ps, lr=1e-5))
        optimizer = factory(params)
        updates_per_step = self.settings.num_iterations * self.settings.mini_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_factor(
                self.settings.warmup_steps * updates_per_step,
                self.settings.max_steps * updates_per_step,
                self.settings.lr_schedule,
                self.settings.min_lr_ratio,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Bit-identical resume needs every random stream, not only the weights and optimiser.
        checkpoint["anomaly_rl"] = {
            "rollout_step": self.rollout_step,
            "sampling_generator": self.sampling_generator.get_state(),
            "rng": capture_rng(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["anomaly_rl"]
        self.rollout_step = int(state["rollout_step"])
        self._pending_generator_state = state["sampling_generator"]
        self._sampling_generator = None
        restore_rng(state["rng"])
        self.batches.start_index = self.rollout_step

    @property
    def sampling_generator(self) -> torch.Generator:
        if self._sampling_generator is None:
            device = next(self.policy.parameters()).device
            generator = torch.Generator(device=device).manual_seed(self.batches.seed)
            if self._pending_generator_state is not None:
                generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
            self._sampling_generator = generator
        return self._sampling_generator

    # ----------------------------------------------------------------- one step
    def _sample(self, prepared: PreparedPrompts) -> Rollout:
        s = self.settings
        with torch.no_grad():
            return self.backend.sample(
                self.policy,
                prepared.encoded,
                s.group_size,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                eos_token_ids=self.eos_token_ids,
                suppress_token_ids=self.suppress_token_ids,
                generator=self.sampling_generator,
            )

    def _score(
        self, prepared: PreparedPrompts, rollout: Rollout
    ) -> tuple[list[ParsedResponse], dict[str, np.ndarray]]:
        parsed = parse_in_original_frame(rollout.texts, prepared.frames, self.settings.group_size, self.schema)
        rewards = self.reward(parsed, _repeat(prepared.samples, self.settings.group_size))
        return parsed, rewards

    def _logprobs(
        self,
        model: torch.nn.Module,
        prepared: PreparedPrompts,
        rollout: Rollout,
        prompts: slice | None = None,
        entropy: bool = False,
    ) -> Any:
        prompts = prompts or slice(0, len(prepared.samples))
        encoded = select_prompts(prepared.encoded, prompts)
        if not vision_is_frozen(self.policy) and (torch.is_grad_enabled() or model is not self.policy):
            # A training vision tower changes every update: its features are recomputed (once per
            # prompt per update) so that they carry this update's gradient; a frozen-copy reference
            # sees the images through its own (start-of-GRPO) vision tower.
            encoded = with_image_features_from(model, encoded)
        rows = self._row_slice(prompts)
        return completion_logprobs(
            model,
            encoded,
            rollout.completion_ids[rows],
            rollout.completion_mask[rows],
            self.settings.group_size,
            temperature=self.settings.temperature,
            suppress_token_ids=self.suppress_token_ids,
            chunk_size=self.settings.logprob_chunk_size,
            return_entropy=entropy,
        )

    def _row_slice(self, prompts: slice) -> slice:
        g = self.settings.group_size
        return slice(prompts.start * g, prompts.stop * g)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        s = self.settings
        t_start = time.perf_counter()
        with torch.no_grad():  # features for sampling and scoring; the update recomputes if vision trains
            prepared = prepare_prompts(
                batch.samples, batch.images, batch.references, self.schema, self.processor, self.policy
            )
        rollout = self._sample(prepared)
        t_rollout = time.perf_counter()
        parsed, rewards = self._score(prepared, rollout)

        dynamic_rounds = 0
        if s.dynamic_sampling:
            prepared, rollout, parsed, rewards, dynamic_rounds = self._resample_flat_groups(
                prepared, rollout, parsed, rewards
            )
        total = torch.as_tensor(rewards["total"], dtype=torch.float32)
        advantages = group_advantages(total, s.group_size, scale=s.scale_rewards, eps=s.advantage_eps)
        t_score = time.perf_counter()

        old_logp = None
        if s.num_iterations > 1:
            with torch.no_grad():
                old_logp = self._logprobs(self.policy, prepared, rollout)
        ref_logp = None
        if s.beta > 0:
            with torch.no_grad(), self.reference_context() as reference:
                ref_logp = self._logprobs(reference, prepared, rollout)

        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n_prompts = len(prepared.samples)
        per_mini = max(1, n_prompts // s.mini_batches)
        update_stats: list[dict[str, float]] = []
        for _ in range(s.num_iterations):
            for start in range(0, n_prompts, per_mini):
                prompts = slice(start, min(n_prompts, start + per_mini))
                rows = self._row_slice(prompts)
                logp, entropy = self._logprobs(self.policy, prepared, rollout, prompts, entropy=True)
                mask = rollout.completion_mask[rows].float()
                loss, stats = policy_loss(
                    logp,
                    None if old_logp is None else old_logp[rows],
                    None if ref_logp is None else ref_logp[rows],
                    advantages[rows],
                    mask,
                    eps_low=s.eps_low,
                    eps_high=s.eps_high,
                    beta=s.beta,
                    loss_type=s.loss_type,
                )
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss {loss.item()} at GRPO step {self.rollout_step}; "
                        "the last good checkpoint is kept in the run folder"
                    )
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], s.max_grad_norm
                )
                optimizer.step()
                scheduler.step()
                token_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
                update_stats.append(
                    {
                        "loss": float(loss.detach()),
                        "grad_norm": float(grad_norm),
                        "entropy": float(token_entropy.detach()),
                        **{k: float(v) for k, v in stats.items()},
                    }
                )
        t_update = time.perf_counter()
        self.rollout_step += 1
        metrics = self._step_metrics(
            rollout, rewards, total, update_stats, dynamic_rounds,
            t_rollout - t_start, t_score - t_rollout, t_update - t_score,
        )
        metrics.update(box_area_metrics(parsed, _repeat(prepared.samples, s.group_size)))
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, batch_size=n_prompts)
        if self.sample_logger and s.log_samples_every and (self.rollout_step - 1) % s.log_samples_every == 0:
            self.sample_logger(self.rollout_step, prepared, rollout, parsed, rewards, advantages)

    def _resample_flat_groups(
        self,
        prepared: PreparedPrompts,
        rollout: Rollout,
        parsed: list[ParsedResponse],
        rewards: dict[str, np.ndarray],
    ) -> tuple[PreparedPrompts, Rollout, list[ParsedResponse], dict[str, np.ndarray], int]:
        """DAPO's dynamic sampling, keyed on the classification reward (not the shaped total).

        Groups whose classification reward is flat teach the decision nothing; they are sampled
        again, up to `dynamic_max_rounds` times, and a group still flat afterwards is kept (its
        advantages may still be non-zero through the other components) — the count is logged.
        """
        s = self.settings
        key = getattr(self.reward, "classification_key", "cls")
        rounds = 0
        while rounds < s.dynamic_max_rounds:
            flat = zero_variance_groups(torch.as_tensor(rewards[key], dtype=torch.float32), s.group_size)
            if not bool(flat.any()):
                break
            rounds += 1
            fresh = self._sample(prepared)
            fresh_parsed, fresh_rewards = self._score(prepared, fresh)
            rollout = replace_groups(rollout, flat, fresh, prepared.encoded.pad_token_id)
            row_flat = flat.repeat_interleave(s.group_size).numpy()
            parsed = [fp if f else p for p, fp, f in zip(parsed, fresh_parsed, row_flat, strict=True)]
            rewards = {k: np.where(row_flat, fresh_rewards[k], v) for k, v in rewards.items()}
        return prepared, rollout, parsed, rewards, rounds

    def _step_metrics(
        self,
        rollout: Rollout,
        rewards: dict[str, np.ndarray],
        total: torch.Tensor,
        update_stats: list[dict[str, float]],
        dynamic_rounds: int,
        rollout_seconds: float,
        score_seconds: float,
        update_seconds: float,
    ) -> dict[str, float]:
        s = self.settings
        lengths = rollout.completion_lengths.float()
        metrics: dict[str, float] = {
            "train/rollout_step": float(self.rollout_step),  # an x-axis that no phase restarts
            "train/reward": float(total.mean()),
            "train/reward_std": float(total.std()) if total.numel() > 1 else 0.0,
            "train/zero_std_group_fraction": zero_std_group_fraction(total, s.group_size),
            "train/completion_length_mean": float(lengths.mean()),
            "train/completion_length_max": float(lengths.max()),
            "train/truncation_rate": float(rollout.truncated.float().mean()),
            "train/lr": float(self.optimizers().param_groups[0]["lr"]),
            "train/dynamic_sampling_rounds": float(dynamic_rounds),
            "time/rollout_s": rollout_seconds,
            "time/score_s": score_seconds,
            "time/update_s": update_seconds,
            "time/step_s": rollout_seconds + score_seconds + update_seconds,
            "time/tokens_per_s": float(lengths.sum()) / max(rollout_seconds, 1e-9),
        }
        key = getattr(self.reward, "classification_key", None)
        if key and key in rewards:
            metrics["train/zero_std_group_fraction_cls"] = zero_std_group_fraction(
                torch.as_tensor(rewards[key], dtype=torch.float32), s.group_size
            )
        for name, values in rewards.items():
            if name == "total":
                continue
            metrics[f"train/reward_{name}"] = float(np.mean(values))
            metrics[f"train/reward_{name}_std"] = float(np.std(values))
        for name in update_stats[0] if update_stats else []:
            values = [u[name] for u in update_stats if math.isfinite(u[name])]
            if values:
                metrics[f"train/{name}"] = float(np.mean(values))
        return metrics
