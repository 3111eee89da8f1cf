"""Markdown tables and evaluation files: what a reader and a later script will see."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from anomaly_rl.evaluation.metrics import compute_metrics
from anomaly_rl.evaluation.report import (
    TABLE_COLUMNS,
    comparison_markdown,
    evaluation_summary,
    format_value,
    log_wandb_summary,
    metrics_markdown,
    write_evaluation,
)


def pred(label: str, answer: str | None, p: float, category: str, boxes=(), pred_boxes=()) -> dict[str, Any]:
    return {
        "image_path": f"{category}/{label}/{p}.png",
        "category": category,
        "label": label,
        "boxes": [list(b) for b in boxes],
        "response": "<think>é</think><answer>a</answer>",
        "answer": answer,
        "pred_boxes": [tuple(b) for b in pred_boxes],  # tuples must still serialise
        "p_anomalous": p,
        "follows_schema": answer is not None,
    }


@pytest.fixture
def predictions() -> list[dict[str, Any]]:
    return [
        pred("anomalous", "a", 0.9, "bottle", [(0, 0, 10, 10)], [(0, 0, 10, 10)]),
        pred("normal", "b", 0.2, "bottle"),
        pred("anomalous", None, 0.6, "cable", [(5, 5, 9, 9)], [(0, 0, 20, 20)]),
    ]


def table_rows(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[2:]]


def test_metrics_markdown_rows_and_values(predictions: list[dict[str, Any]]) -> None:
    metrics = compute_metrics(predictions)
    text = metrics_markdown(metrics)
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["bottle", "cable", "**overall**"]
    header = [title for _, title in TABLE_COLUMNS]
    cable = dict(zip(header, rows[1][1:], strict=True))
    assert cable["N"] == "1" and cable["Acc"] == "0.000"
    assert cable["AUROC"] == "n/a"  # only anomalous images in cable
    overall = dict(zip(header, rows[2][1:], strict=True))
    assert overall["Acc"] == f"{2 / 3:.3f}"
    assert overall["Area pred (med)"] == "250.0"  # areas 100 and 400 on the anomalous images
    assert "Notes:" in text and "AUROC undefined" in text


def test_format_value() -> None:
    assert format_value("n_images", 12.0) == "12"
    assert format_value("box_area_true_median", 346.25) == "346.2"
    assert format_value("image_F1Score", 0.12345) == "0.123"
    assert format_value("image_AUROC", math.nan) == "n/a"
    assert format_value("image_AUROC", None) == "n/a"


def test_comparison_markdown(predictions: list[dict[str, Any]]) -> None:
    before = compute_metrics(predictions)
    better = [dict(p, answer="a" if p["label"] == "anomalous" else "b") for p in predictions]
    after = compute_metrics(better)
    control = {"image_Accuracy": 0.5}  # a flat dict from elsewhere, missing most keys
    text = comparison_markdown({"before GRPO": before, "after GRPO": after, "SFT control": control})
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["before GRPO", "after GRPO", "SFT control"]
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    acc = header.index("image_Accuracy")
    assert [r[acc] for r in rows] == ["0.667", "1.000", "0.500"]
    assert rows[2][header.index("box_mIoU")] == "n/a"

    by_cat = comparison_markdown(
        {"before": before, "after": after}, keys=["image_Accuracy"], category="cable"
    )
    assert [r[1] for r in table_rows(by_cat)] == ["0.000", "1.000"]
    with pytest.raises(ValueError, match="no category 'screw'"):
        comparison_markdown({"before": before}, category="screw")
    with pytest.raises(ValueError, match="at least one run"):
        comparison_markdown({})


def test_write_evaluation_round_trip(tmp_path: Path, predictions: list[dict[str, Any]]) -> None:
    metrics = compute_metrics(predictions)
    paths = write_evaluation(tmp_path / "eval" / "run1", predictions, metrics)
    assert {p.name for p in paths.values()} == {"predictions.jsonl", "metrics.json", "metrics.md"}

    def refuse(token: str) -> float:
        raise AssertionError(f"non-standard JSON constant {token}")

    stored = json.loads(paths["metrics"].read_text(), parse_constant=refuse)
    assert stored["per_category"]["cable"]["image_AUROC"] is None  # NaN -> null
    assert stored["overall"]["image_Accuracy"] == pytest.approx(metrics["overall"]["image_Accuracy"])

    lines = paths["predictions"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(predictions)
    loaded = [json.loads(ln, parse_constant=refuse) for ln in lines]
    assert loaded[0]["response"] == predictions[0]["response"]
    # The written predictions are enough to recompute the same metrics.
    again = compute_metrics(loaded)
    for key, value in metrics["overall"].items():
        assert (math.isnan(value) and math.isnan(again["overall"][key])) or again["overall"][key] == value

    assert paths["markdown"].read_text() == metrics_markdown(metrics)
    # The markdown of the stored (null-bearing) metrics renders the same table.
    assert metrics_markdown(stored) == metrics_markdown(metrics)


def test_metrics_markdown_rejects_other_dicts() -> None:
    with pytest.raises(ValueError, match="overall"):
        metrics_markdown({"image_Accuracy": 1.0})


def test_localisation_accuracy_in_the_files(predictions: list[dict[str, Any]], tmp_path: Path) -> None:
    metrics = compute_metrics(predictions)
    paths = write_evaluation(tmp_path / "eval_grpo", predictions, metrics)
    stored = json.loads(paths["metrics"].read_text())
    # bottle's box is exact; cable's (5,5,9,9) inside (0,0,20,20): IoU 16/400 = 0.04, a miss at 0.1
    assert stored["per_category"]["bottle"]["box_LocAcc@0.5"] == 1.0
    assert stored["per_category"]["cable"]["box_LocAcc@0.1"] == 0.0
    assert stored["overall"]["box_LocAcc@0.1"] == 0.5
    header = [title for _, title in TABLE_COLUMNS]
    rows = table_rows(paths["markdown"].read_text())
    assert [dict(zip(header, row[1:], strict=True))["LocAcc@0.3"] for row in rows] == ["1.000", "0.000", "0.500"]


class FakeRun:
    def __init__(self) -> None:
        self.summary: dict[str, float] = {}


def test_every_evaluation_row_goes_to_the_wandb_summary(
    predictions: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    metrics = compute_metrics(predictions)
    write_evaluation(tmp_path / "eval_start", predictions, metrics)
    write_evaluation(tmp_path / "eval_grpo", predictions, metrics)
    run = FakeRun()
    monkeypatch.setattr(wandb, "run", run)
    logged = log_wandb_summary(tmp_path)
    assert run.summary == logged
    assert logged["eval/grpo/box_LocAcc@0.1"] == 0.5 and logged["eval/start/box_LocAcc@0.5"] == 0.5
    assert logged["eval/grpo/cable/box_LocAcc@0.1"] == 0.0 and logged["eval/grpo/bottle/box_LocAcc@0.3"] == 1.0
    assert "eval/grpo/image_AUROC" in logged and "eval/grpo/cable/image_AUROC" not in logged  # NaN: one class
    assert logged == {**evaluation_summary("start", metrics), **evaluation_summary("grpo", metrics)}
    monkeypatch.setattr(wandb, "run", None)
    assert log_wandb_summary(tmp_path) == logged  # without a run: nothing logged, nothing fails
