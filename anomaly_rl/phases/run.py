"""One training run's phases over shared state: the warm start, GRPO, the SFT control, the
evaluation rows between them and the report. `anomaly_rl.train` decides which run; this runs it.

Several processes (`trainer=ddp_cpu`, `trainer=ddp`): Lightning starts the others by running the
same command again at the first `fit`, so every process walks through the same phases; each `fit`
trains data parallel, each evaluation row is predicted in shards by every process that exists, and
rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from anomaly_rl.callbacks import UNBOUNDED_STEPS
from anomaly_rl.data.datamodule import load_prompt_batch
from anomaly_rl.evaluation.placement import on_accelerator
from anomaly_rl.evaluation.report import comparison_markdown, log_wandb_summary
from anomaly_rl.evaluation.runner import evaluate_to_folder, median_box_baseline
from anomaly_rl.evaluation.wandb_tables import log_rollout_table
from anomaly_rl.grpo.module import GRPOModule
from anomaly_rl.grpo.settings import GRPOSettings
from anomaly_rl.models.processing import unwrap_model
from anomaly_rl.models.weights import bake_adapter, load_policy_weights, save_policy
from anomaly_rl.phases.settings import sft_settings
from anomaly_rl.phases.start import kl_anchor, reference_factory, shipped_warm_start
from anomaly_rl.phases.state import Paused, RunState, stopped_early
from anomaly_rl.phases.trainer import fit_phase, phase_trainer
from anomaly_rl.rollout.backends import make_rollout_backend
from anomaly_rl.sft.module import SFTModule
from anomaly_rl.sft.settings import SFTSettings
from anomaly_rl.training.batches import ResumableBatches
from anomaly_rl.training.distributed import barrier, is_rank_zero
from anomaly_rl.utils.task import write_json

log = logging.getLogger("anomaly_rl")


@dataclass
class Run:
    """Everything the phases of one run share; each method is one phase or one evaluation row."""

    cfg: DictConfig
    run_dir: Path
    state: RunState
    model: Any
    processor: Any
    schema: Any
    datamodule: Any
    reward: Any
    placement: L.Trainer  # where evaluation runs: the trainer config's device and precision

    def evaluate_row(self, name: str) -> None:
        """Every process evaluates its shard on its accelerator (one process before the first fit
        has started the others), and rank 0 writes the row."""
        cfg = self.cfg
        if not cfg.eval.enabled or name in self.state.data["rows"]:
            return
        with on_accelerator(self.model, self.placement):
            metrics = evaluate_to_folder(
                self.model, self.processor, self.schema, self.datamodule, self.run_dir / f"eval_{name}",
                split=str(cfg.eval.split), batch_size=int(cfg.eval.batch_size),
                max_new_tokens=int(cfg.eval.max_new_tokens), limit=cfg.eval.get("limit"),
                backend=make_rollout_backend(str(cfg.eval.rollout_backend)),
            )
        self.state.add_row(name, metrics["overall"])
        barrier()

    def sft(self, phase: str, sft: SFTSettings, max_minutes: float | None = None) -> None:
        """An SFT phase into `run_dir/<phase>` (reloaded, not retrained, when already done)."""
        if self.state.done(phase):
            load_policy_weights(self.model, self.run_dir / phase)
            return
        batches = ResumableBatches(self.datamodule.train_samples, sft.batch_size, int(self.cfg.seed), load_prompt_batch)
        module = SFTModule(self.model, self.processor, self.schema, batches, sft)
        minutes = max_minutes if max_minutes is not None else sft.max_minutes
        trainer, checkpoint = phase_trainer(self.cfg, self.run_dir, phase, sft.max_steps, minutes, sft.checkpoint_every)
        seconds = fit_phase(module, trainer, checkpoint)
        if stopped_early(module.step_index, sft.max_steps, trainer):
            raise Paused(phase, module.step_index)
        if is_rank_zero():
            save_policy(self.model, self.processor, self.run_dir / phase)
        self.state.finish(phase, seconds)

    def warm_start(self, settings: SFTSettings | None, init_folder: Path | None) -> None:
        """The SFT warm start: shipped weights loaded, or trained here, or none (init_from, a real
        model without a warm start of its own); then the optional fold of its adapter (KL anchor)."""
        cfg, state = self.cfg, self.state
        enabled = bool(cfg.warm_start.enabled) and init_folder is None
        shipped, train_here = shipped_warm_start(cfg) if enabled else (None, False)
        if shipped is not None and not state.done("sft"):
            log.info("warm start: loading %s (warm_start.checkpoint=null trains it here instead)", shipped)
            load_policy_weights(self.model, shipped, self.processor)
            if is_rank_zero():
                save_policy(self.model, self.processor, self.run_dir / "sft")
            state.finish("sft", 0.0)
        elif enabled and (train_here or state.done("sft")) and settings is not None:  # done: reloaded
            self.sft("sft", settings)
        anchor = kl_anchor(cfg, self.model, state, self.run_dir, init_folder)
        if anchor is not None:
            # The KL then pulls towards the warm start, not the pretrained model (README: KL under LoRA).
            log.info("model.lora.merge_warm_start: folding the adapter of %s into the base weights", anchor)
            bake_adapter(self.model, anchor)

    def grpo(self, settings: GRPOSettings) -> None:
        """GRPO into `run_dir/final` (reloaded when already done)."""
        if self.state.done("final"):
            load_policy_weights(self.model, self.run_dir / "final")
            return
        if not settings.train_vision:
            # GRPO's reward is noisy; keeping the (SFT-trained) vision tower fixed spends the signal
            # on the decisions made from what it sees, and lets one feature pass serve each step.
            unwrap_model(self.model).model.visual.requires_grad_(False)
        batches = ResumableBatches(
            self.datamodule.train_samples, settings.prompts_per_step, int(self.cfg.seed), load_prompt_batch
        )
        module = GRPOModule(
            self.model, self.processor, self.schema, self.reward, batches, settings, reference_factory(self.model),
            rollout_backend=make_rollout_backend(settings.rollout_backend), sample_logger=log_rollout_table,
        )
        updates = settings.max_steps * settings.num_iterations * settings.mini_batches
        trainer, checkpoint = phase_trainer(
            self.cfg, self.run_dir, "grpo", updates, settings.max_minutes, settings.checkpoint_every
        )
        seconds = fit_phase(module, trainer, checkpoint)
        if stopped_early(module.rollout_step, settings.max_steps, trainer):
            raise Paused("grpo", module.rollout_step)
        if is_rank_zero():
            save_policy(self.model, self.processor, self.run_dir / "final")
            write_json(self.run_dir / "grpo_history.json", module.history)
        self.state.finish("final", seconds)

    def control(self, start_weights: dict[str, Any], trainable: dict[str, bool]) -> None:
        """The honest baseline: the same wall time GRPO took, spent on more SFT from the same start."""
        self.model.load_state_dict(start_weights)
        for name, parameter in self.model.named_parameters():  # what GRPO froze, more SFT trains again
            parameter.requires_grad_(trainable[name])
        grpo_seconds = float(self.state.data["seconds"].get("final", 0.0))
        control = sft_settings(
            OmegaConf.merge(
                self.cfg.warm_start,
                {"warmup_steps": 0, "lr_schedule": "constant", "optimizer": {"lr": float(self.cfg.control.lr)}},
            )
        )
        control = dataclasses.replace(control, max_steps=UNBOUNDED_STEPS)
        self.sft("control", control, max_minutes=grpo_seconds / 60.0)

    def report(self) -> dict[str, Any]:
        """results.json / results.md (rank 0) with every row beside the median-box floor."""
        rows = dict(self.state.data["rows"])
        if self.cfg.eval.enabled and hasattr(self.datamodule, "test_samples"):
            rows["median_box"] = {
                "box_mIoU": median_box_baseline(self.datamodule.train_samples, self.datamodule.test_samples)
            }
        results = {"run_dir": str(self.run_dir), "rows": rows, "seconds": self.state.data["seconds"]}
        if is_rank_zero():  # the other processes have no evaluation rows: rank 0 reports the run
            write_json(self.run_dir / "results.json", results)
            log_wandb_summary(self.run_dir)  # every row, also those evaluated before the W&B run existed
            if any(name != "median_box" for name in rows):
                table = comparison_markdown(rows)
                (self.run_dir / "results.md").write_text(table + "\n", encoding="utf-8")
                print(table)
        barrier()
        return results
