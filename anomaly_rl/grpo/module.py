"""The GRPO LightningModule: it orchestrates one step and holds no maths of its own.

rollout -> parse -> reward -> advantages -> (reference log-probs) -> mu x mini-batch updates.
Each arrow is a function tested on its own (rollout/, schemas/, rewards/, grpo/advantages.py,
grpo/loss.py); this file wires them, times them and logs what they return.

Data parallel (several processes, `trainer=ddp_cpu` / `trainer=ddp`): every process samples whole
groups for its own prompts of the global batch, the gradients are combined by
`training/distributed.py` with the loss's own weights before clipping, and the logged metrics are
computed once over every process's rows (see `step_metrics`), identical on every process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from anomaly_rl.data.records import Sample
from anomaly_rl.grpo.advantages import group_advantages, zero_variance_groups
from anomaly_rl.grpo.loss import policy_loss
from anomaly_rl.grpo.metrics import StepRecord, box_areas, step_metrics
from anomaly_rl.grpo.settings import GRPOSettings
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
from anomaly_rl.training.batches import ResumableBatches
from anomaly_rl.training.distributed import (
    check_divisible,
    gather_objects,
    is_distributed,
    is_rank_zero,
    loss_weight,
    own_process_state,
    process_states,
    rank,
    rank_seed,
    world_size,
)
from anomaly_rl.training.prompts import (
    PreparedPrompts,
    parse_in_original_frame,
    prepare_prompts,
    select_prompts,
)
from anomaly_rl.training.rng import capture_rng, restore_rng
from anomaly_rl.training.update import optimizer_and_schedule, optimizer_update

log = logging.getLogger("anomaly_rl")

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


def reference_shares_image_features(policy: torch.nn.Module) -> bool:
    """True when the reference's image features equal the policy's at every step, so that the
    features computed once per prompt for sampling can serve the reference too.

    That holds only when the vision tower never trains and no adapter touches it: under LoRA the
    reference is the policy with its adapters off, and an adapter in the vision tower (even a
    frozen one, trained in the warm start) changes what the reference would see.
    """
    if not vision_is_frozen(policy):
        return False
    visual = unwrap_model(policy).model.visual
    return not any("lora_" in name for name, _ in visual.named_parameters())


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
        # This process's own view of the last step, before anything is combined across processes:
        # its prompts, the advantages of its rows and its local metrics (for debugging a rank).
        self.local_step: dict[str, Any] = {}

    # ----------------------------------------------------------------- Lightning plumbing
    def setup(self, stage: str) -> None:
        # The process group exists from here on: take this process's share of every batch.
        processes = world_size()
        if processes > 1:
            check_divisible(self.batches.batch_size, self.settings.mini_batches, processes, "algo.prompts_per_step")
        self.batches.shard(rank(), processes, self.settings.mini_batches)

    def train_dataloader(self) -> ResumableBatches:
        self.batches.start_index = self.rollout_step
        return self.batches

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode; LoRA dropout and the like must be active while training.
        self.policy.train()

    def configure_optimizers(self) -> Any:
        st = self.settings
        updates_per_step = st.num_iterations * st.mini_batches  # the schedule counts optimiser updates
        return optimizer_and_schedule(
            self.policy, st.optimizer, st.warmup_steps * updates_per_step, st.max_steps * updates_per_step,
            st.lr_schedule, st.min_lr_ratio,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Bit-identical resume needs every random stream, not only the weights and optimiser.
        checkpoint["anomaly_rl"] = process_states(
            {
                "rollout_step": self.rollout_step,
                "sampling_generator": self.sampling_generator.get_state(),
                "rng": capture_rng(),
            }
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["anomaly_rl"]
        self.rollout_step = int(saved["rollout_step"])
        self.batches.start_index = self.rollout_step
        self._sampling_generator = None
        state = own_process_state(saved)
        if state is not None:
            self._pending_generator_state = state["sampling_generator"]
            restore_rng(state["rng"])

    @property
    def sampling_generator(self) -> torch.Generator:
        if self._sampling_generator is None:
            device = next(self.policy.parameters()).device
            # Each process draws its own stream (rank 0's is the one-process stream).
            generator = torch.Generator(device=device).manual_seed(rank_seed(self.batches.seed, rank()))
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
        reference: bool = False,
    ) -> Any:
        prompts = prompts or slice(0, len(prepared.samples))
        encoded = select_prompts(prepared.encoded, prompts)
        if (reference and not reference_shares_image_features(self.policy)) or (
            torch.is_grad_enabled() and not vision_is_frozen(self.policy)
        ):
            # A training vision tower changes every update: its features are recomputed (once per
            # prompt per update) so that they carry this update's gradient. The reference sees the
            # images through its own vision tower (the frozen copy's, or the base weights with the
            # adapter off) unless that tower is provably the policy's.
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
        if s.dynamic_sampling.enabled:
            prepared, rollout, parsed, rewards, dynamic_rounds = self._resample_flat_groups(
                prepared, rollout, parsed, rewards
            )
        total = torch.as_tensor(rewards["total"], dtype=torch.float32)
        # Rewards are scored on the CPU; the loss runs where the policy's log-probs are.
        advantages = self._advantages(total).to(rollout.completion_ids.device)
        t_score = time.perf_counter()

        # One rollout feeding more than one optimiser step (mu > 1 or several mini-batches) needs the
        # log-probs of the policy that sampled it: after the first step the policy has moved, and a
        # ratio against logp.detach() would be pinned at 1 (no clipping, a wrong gradient).
        old_logp = None
        if s.num_iterations > 1 or s.mini_batches > 1:
            with torch.no_grad():
                old_logp = self._logprobs(self.policy, prepared, rollout)
        ref_logp = None
        if s.beta > 0:
            with torch.no_grad(), self.reference_context() as reference:
                ref_logp = self._logprobs(reference, prepared, rollout, reference=True)

        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        n_prompts = len(prepared.samples)
        per_mini = max(1, n_prompts // s.mini_batches)
        update_stats: list[dict[str, float]] = []
        for iteration in range(s.num_iterations):
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
                    # Dr. GRPO's divisor is a constant of the run, not the width of this batch: the
                    # same token then gets the same gradient however long its neighbours are.
                    max_completion_length=s.max_new_tokens if s.loss_type == "dr_grpo" else None,
                )
                grad_norm = optimizer_update(
                    self,
                    optimizer,
                    scheduler,
                    loss,
                    trainable,
                    loss_weight(mask, s.loss_type),
                    s.max_grad_norm,
                    f"GRPO step {self.rollout_step} (iteration {iteration}, prompts {prompts.start}-{prompts.stop - 1})",
                )
                token_entropy = (entropy * mask).sum() / mask.sum().clamp(min=1)
                update_stats.append(
                    {
                        "loss": float(loss.detach()),
                        "grad_norm": grad_norm,
                        "entropy": float(token_entropy.detach()),
                        **{k: float(v) for k, v in stats.items()},
                    }
                )
        t_update = time.perf_counter()
        self.rollout_step += 1
        record = StepRecord(
            {k: np.asarray(v) for k, v in rewards.items()},
            rollout.completion_lengths.cpu(),
            rollout.truncated.cpu(),
            update_stats,
            dynamic_rounds,
            t_rollout - t_start,
            t_score - t_rollout,
            t_update - t_score,
            *box_areas(parsed, _repeat(prepared.samples, s.group_size)),
        )
        metrics = self._metrics(gather_objects(record))
        self.local_step = {
            "prompts": [str(sample.image_path) for sample in prepared.samples],
            "advantages": advantages.tolist(),
            "metrics": self._metrics([record]) if is_distributed() else metrics,
        }
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, batch_size=n_prompts * world_size())
        if (
            self.sample_logger
            and is_rank_zero()  # one table per step, of rank 0's rows
            and s.log_samples_every
            and (self.rollout_step - 1) % s.log_samples_every == 0
        ):
            self.sample_logger(self.rollout_step, prepared, rollout, parsed, rewards, advantages)

    def _metrics(self, records: Sequence[StepRecord]) -> dict[str, float]:
        return step_metrics(
            records,
            self.settings.group_size,
            self.rollout_step,
            self.optimizers().param_groups[0]["lr"],
            getattr(self.reward, "classification_key", None),
        )

    def _advantages(self, total: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages of this process's rows.

        Each process holds whole groups, so "group" and "none" scaling need nothing from the
        others; "batch" scaling divides by the std of the global batch, so the advantages are
        computed over every process's rewards (rank order) and this process's rows kept.
        """
        s = self.settings
        if not is_distributed():
            return group_advantages(total, s.group_size, scale=s.scale_rewards, eps=s.advantage_eps, baseline=s.advantage_baseline)
        everyone = gather_objects(total)
        start = sum(t.numel() for t in everyone[: rank()])
        full = group_advantages(
            torch.cat(everyone), s.group_size, scale=s.scale_rewards, eps=s.advantage_eps, baseline=s.advantage_baseline
        )
        return full[start : start + total.numel()]

    def _resample_flat_groups(
        self,
        prepared: PreparedPrompts,
        rollout: Rollout,
        parsed: list[ParsedResponse],
        rewards: dict[str, np.ndarray],
    ) -> tuple[PreparedPrompts, Rollout, list[ParsedResponse], dict[str, np.ndarray], int]:
        """DAPO's dynamic sampling, keyed on the classification reward (not the shaped total).

        Groups whose classification reward is flat teach the decision nothing; they are sampled
        again, up to `dynamic_sampling.max_rounds` times, and a group still flat afterwards is kept (its
        advantages may still be non-zero through the other components) — the count is logged.
        """
        s = self.settings
        key = getattr(self.reward, "classification_key", "cls")
        rounds = 0
        while rounds < s.dynamic_sampling.max_rounds:
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
