"""`python -m anomaly_rl.train`: SFT warm start -> evaluate -> GRPO -> evaluate [-> SFT control].

The run folder (Hydra's timestamped output dir) receives the resolved config, per-phase
checkpoints, the trained weights (`sft/`, `final/`), one evaluation folder per row and
`results.json` / `results.md` with the rows side by side. `resume=RUN_DIR` continues an
interrupted run in its own folder: finished phases are loaded, not redone.

The phases themselves are `anomaly_rl.phases.run.Run`'s methods; this file checks the settings,
loads data and model, and calls them in order. Several processes (`trainer=ddp_cpu`,
`trainer=ddp`): see phases/run.py.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from anomaly_rl.evaluation.placement import placement_trainer
from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.weights import load_policy_weights
from anomaly_rl.phases.run import Run
from anomaly_rl.phases.settings import check_settings, preflight
from anomaly_rl.phases.start import check_init_from
from anomaly_rl.phases.state import Paused, RunState, resolve_run_dir
from anomaly_rl.phases.trainer import expected_processes, start_processes
from anomaly_rl.sft.settings import SFTSettings
from anomaly_rl.training.distributed import is_rank_zero, rank_zero_first
from anomaly_rl.utils.task import save_resolved_config, task_wrapper

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
    processes = expected_processes(cfg.trainer) or 1
    settings, warm_start_settings = check_settings(cfg, int(getattr(schema, "min_new_tokens", 1)), processes)
    if not cfg.get("resume") and is_rank_zero():
        save_resolved_config(cfg, run_dir)
    placement = placement_trainer(cfg.trainer)  # the device and precision every evaluation row runs at
    if processes > 1:
        start_processes(placement)  # every process takes part from here on, evaluations included
    L.seed_everything(int(cfg.seed), workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    with rank_zero_first():  # rank 0 generates the data and builds the model caches, the others read them
        datamodule.setup("fit")
        model, processor = load_model_and_processor(cfg.model)
    if is_rank_zero() and hasattr(datamodule, "write_image_records"):  # for `evaluate ckpt=<run>` leakage checks
        datamodule.write_image_records(run_dir)
    reward = hydra.utils.instantiate(cfg.reward)
    run = Run(cfg, run_dir, RunState(run_dir), model, processor, schema, datamodule, reward, placement)
    log.info("run folder: %s", run_dir)

    if init_folder is not None:
        log.info("initialising from %s", init_folder)
        load_policy_weights(model, init_folder, processor)
    if isinstance(settings, SFTSettings):  # algo=sft: one SFT phase is the run
        run.sft("final", settings)
        run.evaluate_row("sft")
        return run.report()
    run.warm_start(warm_start_settings, init_folder)
    start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    if cfg.eval.before_grpo:
        run.evaluate_row("start")
    run.grpo(settings)
    if cfg.eval.after_grpo:
        run.evaluate_row("grpo")
    if cfg.control.enabled:
        run.control(start_weights, trainable)
        run.evaluate_row("sft_control")
    return run.report()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    grpo = results["rows"].get("grpo") or results["rows"].get("sft") or {}
    value = grpo.get("image_BalancedAccuracy")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
