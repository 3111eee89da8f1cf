"""`python -m anomaly_rl.score schema=adfm reward=adfm input=cases.jsonl output=scores.jsonl`.

(`python -m anomaly_rl.score mmad answers=FILE` scores an MMAD answers file instead: the first
argument `mmad` hands the command to `anomaly_rl.score_mmad`, config `conf/score_mmad.yaml`.)

Scores ready-made responses without any model: one JSON object per input line,
`{"response": str, "label": "anomalous"|"normal", "boxes": [[x1, y1, x2, y2], ...], "image_size": [w, h]}`
(optional "category", "defect_type"), with the boxes in the same pixel frame as the response
(identity frame). Each output line is `{"index": i, "line": n, "<component>": ..., "total": ...,
"answer": ..., "follows_schema": ...}`, in input order; `index` counts records (blank lines are
not records), `line` is the 1-based line number. A malformed line stops the run with an error
naming the file and line, or, with `skip_malformed=true`, is written as `{"index", "line",
"error"}` so that no input disappears silently. The run folder gets the resolved config and
`summary.json` (mean and std of every component).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from anomaly_rl.data.records import ANOMALOUS, NORMAL, Sample
from anomaly_rl.rewards.base import Reward
from anomaly_rl.schemas.base import Schema
from anomaly_rl.utils.task import save_resolved_config, task_wrapper, write_json

log = logging.getLogger("anomaly_rl")


class ScoreInputError(ValueError):
    """An input line of the score CLI is not a valid case; the message names file and line."""


@dataclass(frozen=True)
class Case:
    line: int  # 1-based line number in the input file
    response: str | None  # None when the line was malformed and skipped
    sample: Sample | None
    error: str | None = None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def case_sample(record: Any) -> tuple[str, Sample]:
    """Validate one decoded input line; raises ValueError with the reason (the caller adds the place)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("response", "label", "boxes", "image_size") if k not in record]
    if missing:
        raise ValueError(f"missing keys {missing}")
    response, label = record["response"], record["label"]
    if not isinstance(response, str):
        raise ValueError(f"'response' must be a string, got {type(response).__name__}")
    if label not in (ANOMALOUS, NORMAL):
        raise ValueError(f"'label' must be {ANOMALOUS!r} or {NORMAL!r}, got {label!r}")
    size = record["image_size"]
    if not isinstance(size, list) or len(size) != 2:
        raise ValueError(f"'image_size' must be [width, height], got {size!r}")
    width, height = (_number(v, "'image_size' entries") for v in size)
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise ValueError(f"'image_size' must be two positive integers, got {size!r}")
    if not isinstance(record["boxes"], list):
        raise ValueError(f"'boxes' must be a list of [x1, y1, x2, y2], got {record['boxes']!r}")
    boxes = []
    for box in record["boxes"]:
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"each box must be [x1, y1, x2, y2], got {box!r}")
        boxes.append(tuple(_number(v, "box coordinates") for v in box))
    if label == NORMAL and boxes:
        raise ValueError("a 'normal' case cannot have boxes")
    sample = Sample(
        image_path="",
        label=label,
        category=str(record.get("category", "object")),
        defect_type=str(record.get("defect_type", "good" if label == NORMAL else "defect")),
        mask_path=None,
        boxes=tuple(boxes),  # type: ignore[arg-type]
        image_size=(int(width), int(height)),
        split="test",
    )
    return response, sample


def read_cases(path: Path, skip_malformed: bool = False) -> list[Case]:
    """Every non-blank line of `path` as a Case; malformed lines raise, or are kept as errors."""
    cases = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                response, sample = case_sample(json.loads(raw))
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                message = f"{path}, line {number}: {err}"
                if not skip_malformed:
                    raise ScoreInputError(message + " (set skip_malformed=true to skip such lines)") from err
                log.warning("skipping malformed case: %s", message)
                cases.append(Case(number, None, None, str(err)))
                continue
            cases.append(Case(number, response, sample))
    return cases


def score_cases(cases: Sequence[Case], schema: Schema, reward: Reward) -> list[dict[str, Any]]:
    """One output record per case, in order; all valid cases are scored in one reward call."""
    valid = [c for c in cases if c.sample is not None and c.response is not None]
    parsed = [schema.parse(c.response) for c in valid]  # type: ignore[arg-type]
    values = reward(parsed, [c.sample for c in valid])  # type: ignore[misc]
    scored = {
        c.line: {
            **{k: float(v[i]) for k, v in values.items()},
            "answer": parsed[i].answer,
            "follows_schema": parsed[i].follows_schema,
        }
        for i, c in enumerate(valid)
    }
    out = []
    for index, case in enumerate(cases):
        record: dict[str, Any] = {"index": index, "line": case.line}
        record.update(scored[case.line] if case.error is None else {"error": case.error})
        out.append(record)
    return out


def summarise(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    scored = [r for r in records if "error" not in r]
    summary: dict[str, Any] = {
        "cases": len(records),
        "scored": len(scored),
        "skipped": len(records) - len(scored),
    }
    for key in keys:
        column = np.array([r[key] for r in scored], dtype=np.float64)
        summary[key] = {
            "mean": float(column.mean()) if len(column) else None,
            "std": float(column.std()) if len(column) else None,
        }
    return summary


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Written to a temp file then renamed: an interrupted run never leaves half an output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    tmp.replace(path)


@task_wrapper
def score(cfg: DictConfig) -> dict[str, Any]:
    input_path = Path(hydra.utils.to_absolute_path(str(cfg.input)))
    output_path = Path(hydra.utils.to_absolute_path(str(cfg.output)))
    if not input_path.is_file():
        raise FileNotFoundError(f"input={cfg.input}: no such file ({input_path})")
    schema: Schema = hydra.utils.instantiate(cfg.schema)
    reward: Reward = hydra.utils.instantiate(cfg.reward)
    save_resolved_config(cfg, cfg.paths.output_dir)
    records = score_cases(read_cases(input_path, bool(cfg.skip_malformed)), schema, reward)
    write_jsonl(output_path, records)
    summary = summarise(records, list(reward.bounds))
    write_json(Path(cfg.paths.output_dir) / "summary.json", summary)
    log.info(
        "scored %d of %d cases with %s/%s -> %s",
        summary["scored"],
        summary["cases"],
        schema.name,
        type(reward).__name__,
        output_path,
    )
    print(json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    score(cfg)


MMAD_MODE = "mmad"
"""`python -m anomaly_rl.score mmad ...`: the first argument selects the MMAD answers scorer."""


def run(argv: list[str]) -> None:
    """Dispatch on the first argument (Hydra's own parser reads `sys.argv`, so `mmad` is taken out)."""
    if argv[1:2] == [MMAD_MODE]:
        from anomaly_rl.score_mmad import main as score_mmad_main

        del argv[1]
        score_mmad_main()
    else:
        main()


if __name__ == "__main__":
    run(sys.argv)
