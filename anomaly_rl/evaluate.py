"""`python -m anomaly_rl.evaluate ckpt=RUN_DIR`: greedy evaluation on a data split.

Writes predictions.jsonl, metrics.json and metrics.md into its run folder. Without `ckpt` the
model is evaluated as configured (the zero-shot row of a results table). With `data=mmad` it
answers every selected MMAD question and scores them in both conventions (ours and MMAD's).

Leakage (`anomaly_rl.data.leakage`, settings `data.leakage.*`): the data module checks its
evaluation images against its own training split at setup (`leakage.json`), and with `ckpt` the
images evaluated are also compared with the training images that run recorded
(`leakage_ckpt.json`; for MMAD, `leakage.json`). An overlap stops the evaluation, naming both
files, unless `data.leakage.allow=true`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, open_dict

from anomaly_rl.checkpoints import load_trained_policy, run_prompt_settings
from anomaly_rl.data.leakage import LEAKAGE_CKPT_REPORT, LeakageSettings, check_against_run
from anomaly_rl.evaluation.placement import on_accelerator, placement_trainer
from anomaly_rl.evaluation.report import metrics_markdown
from anomaly_rl.evaluation.runner import evaluate_to_folder, split_samples
from anomaly_rl.rollout.backends import make_rollout_backend
from anomaly_rl.utils.task import save_resolved_config, task_wrapper

log = logging.getLogger("anomaly_rl")


def _run_settings(cfg: DictConfig) -> None:
    """With `ckpt`: the run's model, prompt wording and evaluation length (checkpoints.run_prompt_settings)."""
    with open_dict(cfg):
        cfg.model, cfg.schema, cfg.eval.max_new_tokens = run_prompt_settings(
            cfg.get("ckpt"), cfg.model, cfg.schema, cfg.eval.get("max_new_tokens")
        )


def is_mmad(data_cfg: DictConfig) -> bool:
    """True when `data` is the MMAD benchmark (its questions, not a train/test split)."""
    from anomaly_rl.data.mmad import read_mmad

    return "_target_" in data_cfg and hydra.utils.get_method(str(data_cfg._target_)) is read_mmad


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    _run_settings(cfg)
    save_resolved_config(cfg, out_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    placement = placement_trainer(cfg.trainer)  # evaluation runs where `trainer=` says (gpu: bf16 on the GPU)
    # The data is read and checked for leakage before the model is loaded (minutes for a real one).
    if is_mmad(cfg.data):
        from anomaly_rl.evaluation.mmad_runner import evaluate_mmad, prepare_mmad

        data = prepare_mmad(cfg, out_dir)
        model, processor = load_trained_policy(cfg.model, cfg.get("ckpt"))
        with on_accelerator(model, placement):
            return evaluate_mmad(model, processor, hydra.utils.instantiate(cfg.schema), cfg, out_dir, data=data)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    if hasattr(datamodule, "write_image_records"):
        datamodule.write_image_records(out_dir, training_images=False)
    limit = cfg.eval.get("limit")
    evaluated = split_samples(datamodule, str(cfg.eval.split))[: int(limit) if limit else None]
    check_against_run(
        [s.image_path for s in evaluated], cfg.get("ckpt"), LeakageSettings.from_any(cfg.data.get("leakage")),
        f"the {cfg.eval.split} split", out_dir, LEAKAGE_CKPT_REPORT,
    )
    model, processor = load_trained_policy(cfg.model, cfg.get("ckpt"))
    schema = hydra.utils.instantiate(cfg.schema)
    with on_accelerator(model, placement):
        metrics = evaluate_to_folder(
            model, processor, schema, datamodule, out_dir,
            split=str(cfg.eval.split), batch_size=int(cfg.eval.batch_size),
            max_new_tokens=int(cfg.eval.max_new_tokens), limit=cfg.eval.get("limit"),
            backend=make_rollout_backend(str(cfg.eval.rollout_backend)),
        )
    print(metrics_markdown(metrics))
    log.info("evaluation written to %s", out_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
