"""`python -m anomaly_rl.train`: SFT warm start -> evaluate -> GRPO -> evaluate [-> SFT control].

The run folder (Hydra's timestamped output dir) receives the resolved config, per-phase
checkpoints, the trained weights (`sft/`, `final/`), one evaluation folder per row and
`results.json` / `results.md` with the rows side by side. `resume=RUN_DIR` continues an
interrupted run in its own folder: finished phases are loaded, not redone.

Several processes (`trainer=ddp_cpu`, `trainer=ddp`): Lightning starts the others by running this
same command again at the first `fit`, so every process walks through the same phases; each
`fit` trains data parallel, and everything else that writes the run folder or evaluates is done by
rank 0 alone while the others wait for it (`barrier`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from anomaly_rl.callbacks import UNBOUNDED_STEPS
from anomaly_rl.data.datamodule import load_prompt_batch
from anomaly_rl.evaluation.placement import on_accelerator, placement_trainer
from anomaly_rl.evaluation.report import comparison_markdown, log_wandb_summary
from anomaly_rl.evaluation.runner import evaluate_to_folder, median_box_baseline
from anomaly_rl.evaluation.wandb_tables import log_rollout_table
from anomaly_rl.grpo.module import GRPOModule
from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.processing import unwrap_model
from anomaly_rl.models.weights import bake_adapter, load_policy_weights, save_policy
from anomaly_rl.phases.settings import check_settings, preflight, sft_settings
from anomaly_rl.phases.start import check_init_from, kl_anchor, reference_factory, shipped_warm_start
from anomaly_rl.phases.state import Paused, RunState, resolve_run_dir, stopped_early
from anomaly_rl.phases.trainer import expected_processes, fit_phase, phase_trainer
from anomaly_rl.rollout.backends import make_rollout_backend
from anomaly_rl.sft.module import SFTModule
from anomaly_rl.sft.settings import SFTSettings
from anomaly_rl.training.batches import ResumableBatches
from anomaly_rl.training.distributed import barrier, is_rank_zero
from anomaly_rl.utils.task import save_resolved_config, task_wrapper, write_json

log = logging.getLogger("anomaly_rl")


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every phase the config asks for; returns the evaluation rows (or where it paused)."""
    try:
        return _run_phases(cfg)
    except Paused as paused:
        log.info(str(paused))
        return {"paused": str(paused), "rows": {}}


def _run_phases(cfg: DictConfig) -> dict[str, Any]:
    preflight(cfg)
    cfg, run_dir = resolve_run_dir(cfg)
    init_folder = check_init_from(cfg.get("init_from"))
    # Every setting is checked before any data is generated or weights are loaded (minutes for a
    # real model): a typo costs a second, not a start evaluation.
    schema = hydra.utils.instantiate(cfg.schema)
    algo = str(cfg.algo.name)
    processes = expected_processes(cfg.trainer) or 1
    settings, warm_start_settings = check_settings(cfg, int(getattr(schema, "min_new_tokens", 1)), processes)
    if not cfg.get("resume") and is_rank_zero():
        save_resolved_config(cfg, run_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    state = RunState(run_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    if is_rank_zero() and hasattr(datamodule, "write_image_records"):  # for `evaluate ckpt=<run>` leakage checks
        datamodule.write_image_records(run_dir)
    model, processor = load_model_and_processor(cfg.model)
    reward = hydra.utils.instantiate(cfg.reward)
    log.info("run folder: %s", run_dir)

    placement = placement_trainer(cfg.trainer)

    def evaluate_row(name: str) -> None:
        # Every process evaluates its shard on its accelerator (one process before the first fit
        # has started the others), and rank 0 writes the row.
        if not cfg.eval.enabled or name in state.data["rows"]:
            return
        with on_accelerator(model, placement):
            metrics = evaluate_to_folder(
                model, processor, schema, datamodule, run_dir / f"eval_{name}",
                split=str(cfg.eval.split), batch_size=int(cfg.eval.batch_size),
                max_new_tokens=int(cfg.eval.max_new_tokens), limit=cfg.eval.get("limit"),
            )
        state.add_row(name, metrics["overall"])
        barrier()

    def run_sft(phase: str, sft: SFTSettings, max_minutes: float | None = None, max_steps: int | None = None) -> None:
        if state.done(phase):
            load_policy_weights(model, run_dir / phase)
            return
        if max_steps is not None:
            sft = dataclasses.replace(sft, max_steps=max_steps)
        batches = ResumableBatches(datamodule.train_samples, sft.batch_size, int(cfg.seed), load_prompt_batch)
        module = SFTModule(model, processor, schema, batches, sft)
        minutes = max_minutes if max_minutes is not None else sft.max_minutes
        trainer, checkpoint = phase_trainer(cfg, run_dir, phase, sft.max_steps, minutes, sft.checkpoint_every)
        seconds = fit_phase(module, trainer, checkpoint)
        if stopped_early(module.step_index, sft.max_steps, trainer):
            raise Paused(phase, module.step_index)
        if is_rank_zero():
            save_policy(model, processor, run_dir / phase)
        state.finish(phase, seconds)

    # ------------------------------------------------------------------ phases
    if init_folder is not None:
        log.info("initialising from %s", init_folder)
        load_policy_weights(model, init_folder, processor)
    if algo == "sft":
        run_sft("final", settings)
        evaluate_row("sft")
    else:
        warm_start = bool(cfg.warm_start.enabled) and init_folder is None
        shipped, train_warm_start = shipped_warm_start(cfg) if warm_start else (None, False)
        if shipped is not None and not state.done("sft"):
            log.info("warm start: loading %s (warm_start.checkpoint=null trains it here instead)", shipped)
            load_policy_weights(model, shipped, processor)
            if is_rank_zero():
                save_policy(model, processor, run_dir / "sft")
            state.finish("sft", 0.0)
        elif warm_start and (train_warm_start or state.done("sft")):  # state.done: reloaded, not retrained
            run_sft("sft", warm_start_settings)
        anchor = kl_anchor(cfg, model, state, run_dir, init_folder)
        if anchor is not None:
            # The KL then pulls towards the warm start, not the pretrained model (README: KL under LoRA).
            log.info("model.lora.merge_warm_start: folding the adapter of %s into the base weights", anchor)
            bake_adapter(model, anchor)
        start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.eval.before_grpo:
            evaluate_row("start")
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        if not state.done("final"):
            if not settings.train_vision:
                # GRPO's reward is noisy; keeping the (SFT-trained) vision tower fixed spends the signal
                # on the decisions made from what it sees, and lets one feature pass serve each step.
                unwrap_model(model).model.visual.requires_grad_(False)
            batches = ResumableBatches(
                datamodule.train_samples, settings.prompts_per_step, int(cfg.seed), load_prompt_batch
            )
            module = GRPOModule(
                model, processor, schema, reward, batches, settings, reference_factory(model),
                rollout_backend=make_rollout_backend(settings.rollout_backend), sample_logger=log_rollout_table,
            )
            updates = settings.max_steps * settings.num_iterations * settings.mini_batches
            trainer, checkpoint = phase_trainer(
                cfg, run_dir, "grpo", updates, settings.max_minutes, settings.checkpoint_every
            )
            seconds = fit_phase(module, trainer, checkpoint)
            if stopped_early(module.rollout_step, settings.max_steps, trainer):
                raise Paused("grpo", module.rollout_step)
            if is_rank_zero():
                save_policy(model, processor, run_dir / "final")
                write_json(run_dir / "grpo_history.json", module.history)
            state.finish("final", seconds)
        else:
            load_policy_weights(model, run_dir / "final")
        if cfg.eval.after_grpo:
            evaluate_row("grpo")
        if cfg.control.enabled:
            # The honest baseline: the same wall time spent on more SFT from the same start.
            model.load_state_dict(start_weights)
            for name, parameter in model.named_parameters():  # what GRPO froze, more SFT trains again
                parameter.requires_grad_(trainable[name])
            grpo_seconds = float(state.data["seconds"].get("final", 0.0))
            control = sft_settings(
                OmegaConf.merge(
                    cfg.warm_start,
                    {"warmup_steps": 0, "lr_schedule": "constant", "optimizer": {"lr": float(cfg.control.lr)}},
                )
            )
            run_sft("control", control, max_minutes=grpo_seconds / 60.0, max_steps=UNBOUNDED_STEPS)
            evaluate_row("sft_control")

    rows = dict(state.data["rows"])
    if cfg.eval.enabled and hasattr(datamodule, "test_samples"):
        rows["median_box"] = {"box_mIoU": median_box_baseline(datamodule.train_samples, datamodule.test_samples)}
    results = {"run_dir": str(run_dir), "rows": rows, "seconds": state.data["seconds"]}
    if is_rank_zero():  # the other processes have no evaluation rows: rank 0 reports the run
        write_json(run_dir / "results.json", results)
        log_wandb_summary(run_dir)  # every row, also those evaluated before the W&B run existed
        if any(name != "median_box" for name in rows):
            table = comparison_markdown(rows)
            (run_dir / "results.md").write_text(table + "\n", encoding="utf-8")
            print(table)
    barrier()
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    grpo = results["rows"].get("grpo") or results["rows"].get("sft") or {}
    value = grpo.get("image_BalancedAccuracy")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
