"""`python -m anomaly_rl.score mmad answers=FILE`: score any MMAD answers file, no model involved.

The file is MMAD's answers format (a JSON list, as MMAD's query scripts and
`python -m anomaly_rl.evaluate data=mmad` write it, or one record per line): records
`{"image", "question_type", "correct_answer", "gpt_answer"}` (+ optional "question" with its
"options"). The run folder gets the per-dataset, per-question-type table in both conventions —
ours (an unparseable answer counted wrong, the default) and MMAD's summary script's (dropped) —
as `mmad_scores.csv`, `mmad_scores_mmad.csv`, `mmad_counts.csv`, `mmad_scores.md` and
`mmad_summary.json` (see `anomaly_rl.evaluation.mmad`). A malformed file stops the run with an
error naming the file and line. Also runnable as `python -m anomaly_rl.score_mmad answers=FILE`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from anomaly_rl.evaluation.mmad import MMAD, OURS, read_answers_file, score_and_write
from anomaly_rl.utils.task import save_resolved_config, task_wrapper

log = logging.getLogger("anomaly_rl")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""Absolute: Hydra resolves a relative config_path against the calling module, which is
`anomaly_rl.score` when this runs as `python -m anomaly_rl.score mmad ...`."""


@task_wrapper
def score_mmad_answers(cfg: DictConfig) -> dict[str, Any]:
    answers = read_answers_file(Path(hydra.utils.to_absolute_path(str(cfg.answers))))
    out_dir = Path(hydra.utils.to_absolute_path(str(cfg.out_dir))) if cfg.get("out_dir") else Path(cfg.paths.output_dir)
    save_resolved_config(cfg, cfg.paths.output_dir)
    scores = score_and_write(answers, out_dir, normal_flag=str(cfg.normal_flag))
    print(scores.markdown)
    ours, mmad = scores.tables[OURS], scores.tables[MMAD]
    log.info(
        "scored %d MMAD answers from %s: average %.2f with unparseable answers counted wrong (%d), %.2f as "
        "MMAD's script computes it (%d dropped, %d skipped); written to %s",
        ours.records, answers.path, ours.overall, ours.unparseable, mmad.overall, mmad.unparseable, mmad.skipped,
        out_dir,
    )
    summary = {"answers": str(answers.path), **scores.summary()}
    print(json.dumps({"overall": ours.overall, "overall_mmad": mmad.overall, "records": ours.records,
                      "unparseable": ours.unparseable, "out_dir": str(out_dir)}))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="score_mmad")
def main(cfg: DictConfig) -> None:
    score_mmad_answers(cfg)


if __name__ == "__main__":
    main()
