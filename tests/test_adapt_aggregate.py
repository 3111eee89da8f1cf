"""experiments/adapt/aggregate.py on fake benchmark folders: means, stds and paired differences against
an independent computation, the separate SFT arm, missing pieces marked, notes kept, plot written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from tests.scripts import load_script

agg = load_script("experiments/adapt/aggregate.py", "adapt_aggregate")
KEYS = ("image_BalancedAccuracy", "image_AUROC", "box_mIoU", "box_AP50", "schema_valid_rate")


def _metrics(rng: np.random.Generator) -> dict[str, float]:
    return {key: float(rng.uniform(0.1, 0.9)) for key in KEYS}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _fake_bench(root: Path, separate_seed: int | None = None, missing_old_seed: int | None = None) -> dict:
    rng = np.random.default_rng(0)
    values: dict = {"base_old": _metrics(rng)}
    _write(root / "base" / "old_start" / "metrics.json", {"overall": values["base_old"]})
    (root / "command.txt").write_text(".venv/bin/python experiments/adapt/run_adapt.py --budgets 16\n")
    (root / "wall_seconds.txt").write_text("1800\n")
    for seed in (0, 1, 2):
        run = root / f"k16_s{seed}"
        rows = {"start": _metrics(rng), "grpo": _metrics(rng), "sft_control": _metrics(rng),
                "median_box": {"box_mIoU": 0.12}}
        old = {"grpo": _metrics(rng), "sft_control": _metrics(rng)}
        values[seed] = {"new": rows, "old": old}
        history = [{"train/reward": float(i), "train/zero_std_group_fraction": 0.5,
                    "train/zero_std_group_fraction_cls": 0.25 * (i % 2)} for i in range(30)]
        if seed == separate_seed:
            sft = rows.pop("sft_control")
            _write(run / "sft_arm" / "results.json", {"rows": {"sft": sft}, "seconds": {"final": 100.0}})
            rows["sft_control"] = sft  # for the expected values only
            _write(run / "results.json", {"rows": {k: v for k, v in rows.items() if k != "sft_control"},
                                          "seconds": {"final": 100.0}})
        else:
            _write(run / "results.json", {"rows": rows, "seconds": {"final": 100.0, "control": 100.0}})
        _write(run / "grpo_history.json", history)
        _write(run / "old_grpo" / "metrics.json", {"overall": old["grpo"]})
        if seed != missing_old_seed:
            _write(run / "old_sft_control" / "metrics.json", {"overall": old["sft_control"]})
    return values


def _cells(text: str, prefix: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_and_paired_differences_match_an_independent_computation(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    values = _fake_bench(bench, separate_seed=1)
    out = tmp_path / "out"
    assert agg.main(["--runs", str(bench), "--out-dir", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "3 found, 3 complete" in text
    # The GRPO row: new-look balanced accuracy (col 2) and old-look mean IoU (col 9).
    grpo = _cells(text, "| GRPO (AD-FM) |")
    ba = [values[s]["new"]["grpo"]["image_BalancedAccuracy"] for s in (0, 1, 2)]
    assert grpo[1] == "3"
    assert grpo[2] == f"{statistics.fmean(ba):.3f} ± {statistics.stdev(ba):.3f}"
    old_iou = [values[s]["old"]["grpo"]["box_mIoU"] for s in (0, 1, 2)]
    assert grpo[9] == f"{statistics.fmean(old_iou):.3f} ± {statistics.stdev(old_iou):.3f}"
    # The SFT row includes the seed whose SFT arm ran on its own (sft_arm/).
    sft = _cells(text, "| SFT, same wall time |")
    iou = [values[s]["new"]["sft_control"]["box_mIoU"] for s in (0, 1, 2)]
    assert sft[4] == f"{statistics.fmean(iou):.3f} ± {statistics.stdev(iou):.3f}"
    # No adaptation: the old looks are the base's, the same in every seed (std 0).
    start = _cells(text, "| no adaptation |")
    assert start[7] == f"{values['base_old']['image_BalancedAccuracy']:.3f} ± 0.000"
    # Paired GRPO − SFT on new-look mean IoU.
    diffs = [values[s]["new"]["grpo"]["box_mIoU"] - values[s]["new"]["sft_control"]["box_mIoU"] for s in (0, 1, 2)]
    paired = _cells(text, "| GRPO − SFT |")
    assert paired[2] == f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}"
    # Training curves summary: reward first 10 steps 0..9 -> mean 4.5, last 10 -> 24.5.
    assert "4.50 → 24.50" in text
    assert "wall time 30.0 min" in text and "Repository commit" in text
    png = out / "reward_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_old_evaluation_is_marked_and_notes_survive(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    values = _fake_bench(bench, missing_old_seed=2)
    out = tmp_path / "out"
    assert agg.main(["--runs", str(bench), "--out-dir", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "3 found, 2 complete" in text
    sft = _cells(text, "| SFT, same wall time |")
    old_ba = [values[s]["old"]["sft_control"]["image_BalancedAccuracy"] for s in (0, 1)]
    assert sft[7] == f"{statistics.fmean(old_ba):.3f} ± {statistics.stdev(old_ba):.3f}"
    assert "| 16 | 2 | incomplete |" in text
    edited = text.replace(agg.NOTES_PLACEHOLDER, "My reading of the numbers.")
    (out / "RESULTS.md").write_text(edited)
    assert agg.main(["--runs", str(bench), "--out-dir", str(out)]) == 0
    assert "My reading of the numbers." in (out / "RESULTS.md").read_text()


def test_empty_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agg.main(["--runs", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "no k<K>_s<SEED> run folders" in capsys.readouterr().err
