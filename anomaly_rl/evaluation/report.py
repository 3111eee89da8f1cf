"""Turn metrics into files and Markdown tables a reader can compare across runs.

metrics.json stores undefined values (NaN) as null, because NaN is not valid JSON and strict
readers (jq, browsers) reject it; tables print them as "n/a".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# (metric key, column header); the order is the order of the table.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_images", "N"),
    ("n_anomalous", "Anom"),
    ("image_Accuracy", "Acc"),
    ("image_BalancedAccuracy", "BalAcc"),
    ("image_Precision", "Prec"),
    ("image_Recall", "Rec"),
    ("image_F1Score", "F1"),
    ("image_AUROC", "AUROC"),
    ("schema_valid_rate", "Schema"),
    ("box_mIoU", "mIoU"),
    ("box_AP", "AP"),
    ("box_AP50", "AP50"),
    ("box_LocAcc@0.1", "LocAcc@0.1"),
    ("box_LocAcc@0.3", "LocAcc@0.3"),
    ("box_LocAcc@0.5", "LocAcc@0.5"),
    ("box_area_pred_median", "Area pred (med)"),
    ("box_area_true_median", "Area true (med)"),
)
COUNT_KEYS = frozenset({"n_images", "n_anomalous", "n_normal", "box_n_scored"})
AREA_KEYS = frozenset(
    {"box_area_pred_median", "box_area_true_median", "box_area_pred_mean", "box_area_true_mean"}
)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(key: str, value: Any) -> str:
    """Counts as integers, areas to one decimal, rates to three; NaN / None as n/a."""
    if _is_missing(value):
        return "n/a"
    if not isinstance(value, int | float):
        return str(value)
    if key in COUNT_KEYS:
        return str(int(value))
    if key in AREA_KEYS:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """One row per category, then the overall row, then the notes explaining any n/a."""
    if "overall" not in metrics:
        raise ValueError("metrics_markdown expects compute_metrics' output (no 'overall' key)")
    header = ["Category"] + [title for _, title in TABLE_COLUMNS]
    rows = []
    for category, values in metrics.get("per_category", {}).items():
        rows.append([category] + [format_value(k, values.get(k)) for k, _ in TABLE_COLUMNS])
    rows.append(["**overall**"] + [format_value(k, metrics["overall"].get(k)) for k, _ in TABLE_COLUMNS])
    text = _table(header, rows)
    notes = metrics.get("notes") or []
    if notes:
        text += "\n\nNotes:\n" + "\n".join(f"- {note}" for note in notes)
    return text + "\n"


DEFAULT_COMPARISON_KEYS: tuple[str, ...] = (
    "image_Accuracy",
    "image_BalancedAccuracy",
    "image_F1Score",
    "image_AUROC",
    "schema_valid_rate",
    "box_mIoU",
    "box_AP",
    "box_AP50",
    "box_area_pred_median",
)


def comparison_markdown(
    rows: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str] = DEFAULT_COMPARISON_KEYS,
    category: str | None = None,
) -> str:
    """Runs side by side, one row each, in the order given (e.g. before GRPO, after GRPO, SFT control).

    Each value may be compute_metrics' full output (its "overall", or ``category``'s, row is used)
    or an already flat {metric: value} dict. A run missing a metric shows n/a rather than failing,
    so runs from older code can still be compared.
    """
    if not rows:
        raise ValueError("comparison_markdown needs at least one run")
    table_rows = []
    for name, metrics in rows.items():
        flat: Mapping[str, Any] = metrics
        if "overall" in metrics:
            if category is None:
                flat = metrics["overall"]
            else:
                per_category = metrics.get("per_category", {})
                if category not in per_category:
                    raise ValueError(
                        f"run {name!r} has no category {category!r} (has {sorted(per_category)})"
                    )
                flat = per_category[category]
        table_rows.append([name] + [format_value(k, flat.get(k)) for k in keys])
    title = "Run" if category is None else f"Run ({category})"
    return _table([title, *keys], table_rows) + "\n"


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, recursively: the JSON files must parse anywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_evaluation(
    out_dir: str | Path, predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]
) -> dict[str, Path]:
    """Write predictions.jsonl, metrics.json and metrics.md into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "predictions": out / "predictions.jsonl",
        "metrics": out / "metrics.json",
        "markdown": out / "metrics.md",
    }
    with paths["predictions"].open("w", encoding="utf-8") as fh:
        for pred in predictions:
            fh.write(json.dumps(_json_safe(pred), ensure_ascii=False, allow_nan=False) + "\n")
    paths["metrics"].write_text(
        json.dumps(_json_safe(metrics), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(metrics_markdown(metrics), encoding="utf-8")
    return paths


SUMMARY_PREFIX = "eval"


def evaluation_summary(row: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """W&B summary entries of one evaluation: `eval/<row>/<metric>` for the overall values and
    `eval/<row>/<category>/<metric>` per category; undefined (NaN / null) values are left out."""
    out: dict[str, float] = {}
    groups = [("", metrics.get("overall", {}))]
    groups += [(f"{category}/", values) for category, values in metrics.get("per_category", {}).items()]
    for prefix, values in groups:
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{SUMMARY_PREFIX}/{row}/{prefix}{key}"] = float(value)
    return out


def log_wandb_summary(run_dir: str | Path) -> dict[str, float]:
    """Every `eval_<row>/metrics.json` of a run folder into the active W&B run's summary.

    Called once at the end of training, so the rows evaluated before the W&B run existed (the
    start row of a run that loads its warm start) are there too. Returns the entries; a no-op
    for W&B without an active run (logger=csv, none).
    """
    summary: dict[str, float] = {}
    for path in sorted(Path(run_dir).glob("eval_*/metrics.json")):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        summary.update(evaluation_summary(path.parent.name.removeprefix("eval_"), metrics))
    try:
        import wandb
    except ImportError:  # wandb is a dependency, but a summary must never be the thing that fails
        return summary
    if wandb.run is not None and summary:
        wandb.run.summary.update(summary)
    return summary
