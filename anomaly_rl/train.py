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

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel

from anomaly_rl.callbacks import UNBOUNDED_STEPS, StepCheckpoint
from anomaly_rl.checkpoints import weights_folder
from anomaly_rl.data.datamodule import load_prompt_batch
from anomaly_rl.evaluation.placement import on_accelerator, placement_trainer
from anomaly_rl.evaluation.report import comparison_markdown, log_wandb_summary
from anomaly_rl.evaluation.runner import evaluate_to_folder, median_box_baseline
from anomaly_rl.evaluation.wandb_tables import log_rollout_table
from anomaly_rl.grpo.module import GRPOModule
from anomaly_rl.grpo.settings import GRPOSettings
from anomaly_rl.models.loading import check_model_folder, load_model_and_processor
from anomaly_rl.models.processing import unwrap_model
from anomaly_rl.models.weights import bake_adapter, load_policy_weights, save_policy
from anomaly_rl.rollout.backends import make_rollout_backend
from anomaly_rl.rollout.logprobs import make_reference, needs_reference_copy, reference_context
from anomaly_rl.sft.module import SFTModule
from anomaly_rl.sft.settings import SFTSettings
from anomaly_rl.training.batches import ResumableBatches
from anomaly_rl.training.distributed import barrier, broadcast_from_zero, check_divisible, is_rank_zero
from anomaly_rl.utils.instantiate import instantiate_callbacks, instantiate_loggers
from anomaly_rl.utils.task import job_config, save_resolved_config, task_wrapper, write_json

log = logging.getLogger("anomaly_rl")


class MissingSettingError(ValueError):
    """A setting the chosen config needs from the user (a model folder, a dataset root) is unset."""


def preflight(cfg: DictConfig) -> None:
    """Stop at once, saying what to set, before any data is read or model is built."""
    missing = []
    model_name = str(cfg.model.get("name", "tiny"))
    if model_name != "tiny" and not cfg.model.get("path"):
        repo = cfg.model.get("hf_repo") or "the model's Hugging Face repository"
        missing.append(
            f"model.path=<folder with the {model_name} weights> "
            f"(download once: huggingface-cli download {repo} --local-dir <folder>)"
        )
    if "root" in cfg.data.keys() and OmegaConf.is_missing(cfg.data, "root"):
        missing.append(f"data.root=<folder of the {cfg.data.get('reader', 'dataset')} dataset>")
    if missing:
        raise MissingSettingError("this configuration needs: " + "; ".join(missing))
    if cfg.model.get("path"):  # a wrong folder fails now, not after the dataset has been read
        check_model_folder(cfg.model)


class RunState:
    """Which phases of a run are finished, and the evaluation rows so far (`state.json`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = {"completed": [], "rows": {}, "seconds": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def done(self, phase: str) -> bool:
        return phase in self.data["completed"]

    def finish(self, phase: str, seconds: float | None = None) -> None:
        if phase not in self.data["completed"]:
            self.data["completed"].append(phase)
        if seconds is not None:
            self.data["seconds"][phase] = seconds
        self._write()

    def add_row(self, name: str, metrics: dict[str, Any]) -> None:
        self.data["rows"][name] = metrics
        self._write()

    def _write(self) -> None:
        # Every process keeps the state in memory (they take the same branches); rank 0 writes it.
        if is_rank_zero():
            write_json(self.path, self.data)


def reference_factory(model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The frozen reference: the adapter switched off under LoRA, else a frozen copy of the start."""
    frozen_copy = make_reference(model) if needs_reference_copy(model) else None
    return lambda: reference_context(model, frozen_copy)


def _phase_trainer(
    cfg: DictConfig,
    run_dir: Path,
    phase: str,
    max_optimizer_steps: int,
    max_minutes: float | None,
    checkpoint_every: int,
) -> tuple[L.Trainer, StepCheckpoint]:
    checkpoint = StepCheckpoint(
        run_dir / "checkpoints" / phase,
        every=checkpoint_every,
        pause_after_steps=cfg.get("pause_after_steps"),
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    hyperparameters = OmegaConf.to_container(job_config(cfg), resolve=True)
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.CSVLogger):
            logger._version = phase  # one CSV folder per phase: each phase's steps start again at 0
        logger.log_hyperparams(hyperparameters)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=max_optimizer_steps,
        max_epochs=-1,
        max_time=_duration(max_minutes) if max_minutes else None,
        logger=loggers or False,
        callbacks=[*instantiate_callbacks(cfg.get("callbacks")), checkpoint],
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    return trainer, checkpoint


def expected_processes(trainer_cfg: DictConfig) -> int | None:
    """The number of training processes the trainer config asks for, None when only Lightning
    knows it ("auto", -1); then the per-process checks run when training starts instead."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices) * nodes if int(devices) > 0 else None
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    return None


def _duration(minutes: float) -> str:
    """Lightning's "DD:HH:MM:SS" (a dict or timedelta would not survive Hydra's instantiate)."""
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days:02d}:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _fit(module: L.LightningModule, trainer: L.Trainer, checkpoint: StepCheckpoint) -> float:
    ckpt_path = str(checkpoint.last) if checkpoint.last.is_file() else None
    if ckpt_path:
        log.info("resuming %s from %s", type(module).__name__, ckpt_path)
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=ckpt_path)
    return time.perf_counter() - start


WARM_START_SWITCHES = ("enabled", "checkpoint")
"""Keys of the `warm_start` block that say whether and from where, not how: not SFT settings."""


def sft_settings(block: DictConfig) -> SFTSettings:
    """The SFT settings of `algo` (algo=sft), `warm_start` or the control (conf/algo/sft.yaml)."""
    keys = [k for k in block if k not in WARM_START_SWITCHES]
    return hydra.utils.instantiate(OmegaConf.masked_copy(block, keys))


def _eval_problems(eval_cfg: DictConfig) -> list[str]:
    limit = eval_cfg.get("limit")
    checks = [
        (str(eval_cfg.split) in ("train", "val", "test"), f"split must be train, val or test, got {eval_cfg.split!r}"),
        (int(eval_cfg.batch_size) >= 1, f"batch_size must be >= 1, got {eval_cfg.batch_size}"),
        (int(eval_cfg.max_new_tokens) >= 1, f"max_new_tokens must be >= 1, got {eval_cfg.max_new_tokens}"),
        (limit is None or int(limit) >= 1, f"limit must be null or >= 1, got {limit}"),
    ]
    return [f"eval.{message}" for ok, message in checks if not ok]


def check_settings(
    cfg: DictConfig, min_new_tokens: int, processes: int
) -> tuple[GRPOSettings | SFTSettings, SFTSettings | None]:
    """Instantiate and validate every algo.*, warm_start.*, control.* and eval.* setting at once.

    Returns the settings of the main phase and those of the warm start (None when no phase uses
    them). Raises ValueError listing every problem found, before any data or weights are loaded.
    """
    algo = str(cfg.algo.name)
    problems: list[str] = []
    warm_start: SFTSettings | None = None
    if algo == "grpo":
        settings: GRPOSettings | SFTSettings = hydra.utils.instantiate(cfg.algo)
        problems += settings.problems(min_new_tokens)
        if cfg.warm_start.enabled or cfg.control.enabled:
            warm_start = sft_settings(cfg.warm_start)
            problems += warm_start.problems("warm_start")
        if cfg.control.enabled and float(cfg.control.lr) <= 0:
            problems.append(f"control.lr must be > 0, got {cfg.control.lr}")
    elif algo == "sft":
        settings = sft_settings(cfg.algo)
        problems += settings.problems("algo")
    else:
        raise ValueError(f"algo.name must be grpo or sft, got {algo!r}")
    if cfg.eval.enabled:
        problems += _eval_problems(cfg.eval)
    if problems:
        raise ValueError("; ".join(problems))
    if processes > 1:  # each process takes whole groups, and an equal share of every SFT batch
        if isinstance(settings, GRPOSettings):
            check_divisible(settings.prompts_per_step, settings.mini_batches, processes, "algo.prompts_per_step")
        else:
            check_divisible(settings.batch_size, 1, processes, "algo.batch_size")
        if warm_start is not None:
            check_divisible(warm_start.batch_size, 1, processes, "warm_start.batch_size")
    return settings, warm_start


def _resolve_run_dir(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """A resumed run continues in its own folder, under the config it was started with."""
    if not cfg.get("resume"):
        return cfg, Path(cfg.paths.output_dir)
    run_dir = Path(cfg.resume).expanduser().resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no config.yaml there — not a run folder of anomaly_rl.train")
    resumed = OmegaConf.load(saved)
    with open_dict(resumed):
        resumed.resume = str(run_dir)
        if cfg.get("pause_after_steps") is not None:
            resumed.pause_after_steps = cfg.pause_after_steps
        else:
            resumed.pause_after_steps = None
    return resumed, run_dir


def _shipped_warm_start(cfg: DictConfig) -> tuple[Path | None, bool]:
    """Where the SFT warm start comes from: (weights to load or None, whether to train it here).

    `warm_start.checkpoint` holds weights trained for one model — the committed one for the tiny
    model. Weights never fit another model (other tokenizer, other shapes), so when the folder
    records (meta.json, or the run config beside it) another `model.name` than this run's, it is not
    loaded, and no warm start is trained either: the `warm_start.*` recipe beside it is sized for
    that model too (1,200 SFT steps at lr 1e-3 for the tiny one). The run's model then starts GRPO
    from its own pretrained weights, as the real-model recipes do.
    """
    # Imported here so that this rule stays in one place of this file.
    from anomaly_rl.models.weights import has_trained_weights, recorded_model_name

    folder = cfg.warm_start.get("checkpoint")
    if not folder:
        return None, True
    folder = Path(folder).expanduser()
    if not has_trained_weights(folder):
        log.warning("warm_start.checkpoint=%s holds no trained weights: training the warm start instead", folder)
        return None, True
    model_name, made_for = str(cfg.model.name), recorded_model_name(folder)
    if made_for is None:
        log.warning(
            "warm_start.checkpoint=%s does not record which model it was trained for: loading it into "
            "model.name=%s (its tokenizer is checked)", folder, model_name,
        )
        return folder, False
    if made_for != model_name:
        log.warning(
            "warm start skipped: warm_start.checkpoint=%s was trained for model.name=%s, this run trains "
            "model.name=%s, whose GRPO starts from its own pretrained weights (warm_start.enabled=false "
            "says so without this warning; warm_start.checkpoint=null trains an SFT warm start here, "
            "sized by warm_start.*)", folder, made_for, model_name,
        )
        return None, False
    return folder, False


def _kl_anchor(
    cfg: DictConfig, model: torch.nn.Module, state: RunState, run_dir: Path, init_folder: Path | None
) -> Path | None:
    """The saved adapter to fold into the base weights before GRPO (`model.lora.merge_warm_start`).

    Under LoRA, GRPO's reference is the policy with its adapter switched off: the pretrained model,
    not the warm start. Folding the warm-start adapter into the base weights (and training a fresh
    adapter on top) makes the reference the warm start, as under full fine-tuning.
    """
    if not cfg.model.get("lora", {}).get("merge_warm_start", False):
        return None
    if not isinstance(model, PeftModel):
        log.warning("model.lora.merge_warm_start=true does nothing under model.finetune=full: the reference "
                    "is always a frozen copy of the start of GRPO there")
        return None
    source = run_dir / "sft" if state.done("sft") else init_folder
    if source is None:
        log.info("model.lora.merge_warm_start: no warm start or init_from adapter to fold in")
    return source


def _check_init_from(init_from: str | None) -> Path | None:
    if not init_from:
        return None
    try:
        return weights_folder(init_from)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"init_from={init_from}: {error}") from error


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run every phase the config asks for; returns the evaluation rows (or where it paused)."""
    try:
        return _run_phases(cfg)
    except _Paused as paused:
        log.info(str(paused))
        return {"paused": str(paused), "rows": {}}


def _run_phases(cfg: DictConfig) -> dict[str, Any]:
    preflight(cfg)
    cfg, run_dir = _resolve_run_dir(cfg)
    init_folder = _check_init_from(cfg.get("init_from"))
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
        trainer, checkpoint = _phase_trainer(cfg, run_dir, phase, sft.max_steps, minutes, sft.checkpoint_every)
        seconds = _fit(module, trainer, checkpoint)
        if _stopped_early(module.step_index, sft.max_steps, trainer):
            raise _Paused(phase, module.step_index)
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
        shipped, train_warm_start = _shipped_warm_start(cfg) if warm_start else (None, False)
        if shipped is not None and not state.done("sft"):
            log.info("warm start: loading %s (warm_start.checkpoint=null trains it here instead)", shipped)
            load_policy_weights(model, shipped, processor)
            if is_rank_zero():
                save_policy(model, processor, run_dir / "sft")
            state.finish("sft", 0.0)
        elif warm_start and (train_warm_start or state.done("sft")):  # state.done: reloaded, not retrained
            run_sft("sft", warm_start_settings)
        anchor = _kl_anchor(cfg, model, state, run_dir, init_folder)
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
            trainer, checkpoint = _phase_trainer(
                cfg, run_dir, "grpo", updates, settings.max_minutes, settings.checkpoint_every
            )
            seconds = _fit(module, trainer, checkpoint)
            if _stopped_early(module.rollout_step, settings.max_steps, trainer):
                raise _Paused("grpo", module.rollout_step)
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


class _Paused(Exception):
    """A phase stopped before its step budget (pause_after_steps): not a failure, resume later."""

    def __init__(self, phase: str, step: int) -> None:
        super().__init__(f"phase {phase} paused at step {step}; continue with resume=<run folder>")


def _stopped_early(step: int, max_steps: int, trainer: L.Trainer) -> bool:
    """A pause (not the step budget, not the time budget); rank 0's verdict, so that every process
    takes the same branch (each one's own clock could disagree about the time budget)."""
    return bool(broadcast_from_zero(step < max_steps and not _timed_out(trainer)))


def _timed_out(trainer: L.Trainer) -> bool:
    """True when the phase ended on its `max_minutes` budget (Lightning's Timer callback)."""
    timers = [c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer)]
    return any((t.time_remaining() or 0.0) <= 0 for t in timers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    grpo = results["rows"].get("grpo") or results["rows"].get("sft") or {}
    value = grpo.get("image_BalancedAccuracy")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
