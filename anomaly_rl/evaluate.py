"""`python -m anomaly_rl.evaluate ckpt=RUN_DIR`: greedy evaluation on a data split.

Writes predictions.jsonl, metrics.json and metrics.md into its run folder. Without `ckpt` the
model is evaluated as configured (the zero-shot row of a results table). With `data=mmad` it
answers every selected MMAD question and scores them the way MMAD does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, open_dict

from anomaly_rl.checkpoints import load_trained_policy, run_model_config
from anomaly_rl.evaluation.report import metrics_markdown
from anomaly_rl.evaluation.runner import evaluate_to_folder
from anomaly_rl.utils.task import save_resolved_config, task_wrapper

log = logging.getLogger("anomaly_rl")


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("ckpt"):
        # The run's own model config, so its weights fit; recorded below as the model evaluated.
        with open_dict(cfg):
            cfg.model = run_model_config(cfg.ckpt, cfg.model)
    save_resolved_config(cfg, out_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    model, processor = load_trained_policy(cfg.model, cfg.get("ckpt"))
    schema = hydra.utils.instantiate(cfg.schema)
    if str(cfg.data.get("reader", "")) == "mmad" or "read_mmad" in str(cfg.data.get("_target_", "")):
        from anomaly_rl.evaluation.mmad_runner import evaluate_mmad

        return evaluate_mmad(model, processor, schema, cfg, out_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    metrics = evaluate_to_folder(
        model, processor, schema, datamodule, out_dir,
        split=str(cfg.eval.split), batch_size=int(cfg.eval.batch_size),
        max_new_tokens=int(cfg.eval.max_new_tokens), limit=cfg.eval.get("limit"),
    )
    print(metrics_markdown(metrics))
    log.info("evaluation written to %s", out_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
