"""The supervised warm start: teacher forcing on the schema's rendered ideal responses.

A from-scratch tiny model cannot be sampled into a valid three-stage answer; GRPO needs a policy
whose samples already parse. Real checkpoints may skip this (`warm_start.enabled=false`).

Data parallel like GRPO (`training/distributed.py`): `batch_size` is the global batch, each process
takes its slice, and the gradients are combined weighted by token counts, which gives the
gradient of the single-process per-token mean.
"""

from __future__ import annotations

import random
import time
from typing import Any

import lightning as L
import torch

from anomaly_rl.rollout.logprobs import completion_logprobs, tokenize_completions
from anomaly_rl.schemas.base import Schema
from anomaly_rl.sft.settings import SFTSettings
from anomaly_rl.training.batches import ResumableBatches
from anomaly_rl.training.distributed import (
    check_divisible,
    loss_weight,
    own_process_state,
    process_states,
    rank,
    rank_seed,
    weighted_mean_over_ranks,
    world_size,
)
from anomaly_rl.training.prompts import prepare_prompts
from anomaly_rl.training.rng import as_tuples, capture_rng, restore_rng
from anomaly_rl.training.update import optimizer_and_schedule, optimizer_update


class SFTModule(L.LightningModule):
    def __init__(
        self,
        policy: torch.nn.Module,
        processor: Any,
        schema: Schema,
        batches: ResumableBatches,
        settings: SFTSettings,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.processor = processor
        self.schema = schema
        self.batches = batches
        self.settings = settings
        self.step_index = 0
        # Target wording is sampled: a seeded stream keeps runs (and resumes) reproducible.
        self.render_rng = random.Random(batches.seed)
        self.history: list[dict[str, float]] = []

    def setup(self, stage: str) -> None:
        processes = world_size()
        if processes > 1:
            check_divisible(self.batches.batch_size, 1, processes, "batch_size of the SFT phase")
            # Each process renders its own samples' targets: its own wording stream.
            self.render_rng = random.Random(rank_seed(self.batches.seed, rank()))
        self.batches.shard(rank(), processes)

    def train_dataloader(self) -> ResumableBatches:
        self.batches.start_index = self.step_index
        return self.batches

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode; LoRA dropout and the like must be active while training.
        self.policy.train()

    def configure_optimizers(self) -> Any:
        st = self.settings
        return optimizer_and_schedule(self.policy, st.optimizer, st.warmup_steps, st.max_steps, st.lr_schedule, st.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["anomaly_rl"] = process_states(
            {"step_index": self.step_index, "render_rng": self.render_rng.getstate(), "rng": capture_rng()}
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["anomaly_rl"]
        self.step_index = int(saved["step_index"])
        self.batches.start_index = self.step_index
        state = own_process_state(saved)
        if state is not None:
            self.render_rng.setstate(as_tuples(state["render_rng"]))
            restore_rng(state["rng"])

    def training_step(self, batch: Any, batch_idx: int) -> None:
        t0 = time.perf_counter()
        prepared = prepare_prompts(
            batch.samples, batch.images, batch.references, self.schema, self.processor, self.policy
        )
        targets = [
            self.schema.render(
                sample,
                frame.to_model(sample.boxes),
                self.render_rng,
                box_grid=self.settings.box_grid,
                model_size=frame.model_size,
            )
            for sample, frame in zip(prepared.samples, prepared.frames, strict=True)
        ]
        ids, mask = tokenize_completions(self.processor, targets)
        logp = completion_logprobs(self.policy, prepared.encoded, ids, mask, 1, temperature=1.0)
        mask_f = mask.float()
        loss = -(logp * mask_f).sum() / mask_f.sum().clamp(min=1)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        # A per-token mean: processes weigh by their token counts (no-op with one process).
        weight = loss_weight(mask_f, "sft")
        optimizer = self.optimizers()
        grad_norm = optimizer_update(
            self, optimizer, self.lr_schedulers(), loss, trainable, weight, self.settings.max_grad_norm,
            f"SFT step {self.step_index}",
        )
        self.step_index += 1
        metrics = {
            "sft/loss": weighted_mean_over_ranks(float(loss.detach()), weight),
            "sft/grad_norm": float(grad_norm),
            "sft/lr": float(optimizer.param_groups[0]["lr"]),
            "time/sft_step_s": time.perf_counter() - t0,  # this process's
        }
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, batch_size=len(targets) * world_size())
