"""experiments/ablation/aggregate.py on fake Hydra multirun folders: the numbers against an
independent computation, the listing of failed/unfinished/missing cells, the notes kept across
reruns, and the plot written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.scripts import load_script

agg = load_script("experiments/ablation/aggregate.py", "ablation_aggregate")

SCHEMA_TARGETS = {
    "adfm": "anomaly_rl.schemas.adfm.AdfmSchema",
    "r1": "anomaly_rl.schemas.r1.R1Schema",
    "direct": "anomaly_rl.schemas.direct.DirectSchema",
}
REWARD_NODES = {
    "adfm": {"_target_": "anomaly_rl.rewards.adfm.AdfmReward", "w_cls": 1.0, "w_loc": 1.0, "w_fmt": 1.0},
    "binary": {"_target_": "anomaly_rl.rewards.binary.BinaryReward", "w_accuracy": 1.0, "w_format": 1.0},
}
CLS_COMPONENT = {"adfm": "cls", "binary": "accuracy"}
EVAL_KEYS = ["image_BalancedAccuracy", "image_F1Score", "box_mIoU", "box_AP50", "schema_valid_rate"]
SWEEP = ["+experiment=ablation", "schema=adfm,r1,direct", "reward=adfm,binary", "seed=0,1,2"]
STEPS = 12


def _write_job(
    folder: Path,
    schema: str,
    reward: str,
    seed: int,
    rng: np.random.Generator,
    *,
    hydra_record: bool = True,
    saved_config: bool = True,
    status: str = "ok",
    nan: dict[str, str] | None = None,
) -> dict:
    """One Hydra job folder as anomaly_rl.train leaves it; returns the values it holds."""
    folder.mkdir(parents=True)
    if hydra_record:
        (folder / ".hydra").mkdir()
        choices = {"schema": schema, "reward": reward, "model": "tiny", "experiment": "ablation"}
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
        (folder / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(["+experiment=ablation", f"schema={schema}", f"reward={reward}", f"seed={seed}"])
        )
    if saved_config:
        config = {
            "schema": {"_target_": SCHEMA_TARGETS[schema], "_convert_": "all", "style": "short"},
            "reward": REWARD_NODES[reward],
            "seed": seed,
            "task_name": "ablation",
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if status == "failed":
        (folder / "failure.txt").write_text(
            'Traceback (most recent call last):\n  File "train.py", line 1\nRuntimeError: CUDA out of memory\n'
        )
        return {}
    if status == "incomplete":
        return {}
    grpo = {key: float(rng.uniform(0.2, 0.95)) for key in EVAL_KEYS}
    grpo["n_images"] = 408.0
    history = []
    for step in range(1, STEPS + 1):
        history.append({
            "train/rollout_step": float(step),
            "train/reward": float(rng.uniform(1.0, 3.0) if reward == "adfm" else rng.uniform(0.0, 2.0)),
            "train/zero_std_group_fraction": float(rng.choice([0.0, 0.125, 0.25, 0.5])),
            "train/zero_std_group_fraction_cls": float(rng.choice([0.25, 0.5, 0.75])),
            f"train/reward_{CLS_COMPONENT[reward]}": float(rng.uniform(0.0, 1.0)),
        })
    history[3]["train/zero_std_group_fraction"] = None  # a step that logged nothing usable
    text_nan = []
    for key, how in (nan or {}).items():
        if how == "null":  # what anomaly_rl.utils.task.write_json makes of a NaN
            grpo[key] = None
        else:  # a bare NaN literal, as json.dumps writes by default
            grpo[key] = "__NAN__"
            text_nan.append(key)
    results = {
        "run_dir": str(folder),
        "rows": {"grpo": grpo, "median_box": {"box_mIoU": 0.0547}},
        "seconds": {"sft": 0.0, "final": float(rng.uniform(200, 300))},
    }
    text = json.dumps(results).replace('"__NAN__"', "NaN")
    (folder / "results.json").write_text(text)
    (folder / "grpo_history.json").write_text(json.dumps(history))
    return {"grpo": grpo, "history": history, "seconds": results["seconds"]["final"]}


def _write_multirun(folder: Path, overrides: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": overrides}}, "seed": 0}))


@pytest.fixture
def sweep(tmp_path: Path) -> dict:
    """Part one of a sweep (several outcomes) and part two (the cells it filled in)."""
    rng = np.random.default_rng(0)
    part1 = tmp_path / "multiruns" / "2026-01-01_10-00-00"
    part2 = tmp_path / "multiruns" / "2026-01-02_10-00-00"
    _write_multirun(part1, SWEEP)
    _write_multirun(part2, ["+experiment=ablation", "schema=r1", "reward=binary", "seed=2"])
    values: dict[tuple[str, str, int], dict] = {}
    plan = [
        ("adfm", "adfm", 0, {}), ("adfm", "adfm", 1, {}), ("adfm", "adfm", 2, {}),
        ("adfm", "binary", 0, {}), ("adfm", "binary", 1, {}),
        # Failed before config.yaml was saved: only Hydra's record says what it was.
        ("adfm", "binary", 2, {"status": "failed", "saved_config": False}),
        ("r1", "adfm", 0, {}),
        ("r1", "adfm", 1, {"nan": {"box_mIoU": "null"}}),
        ("r1", "adfm", 2, {"nan": {"box_AP50": "nan"}}),
        # No .hydra folder (hydra.output_subdir=null): identified from config.yaml's _target_.
        ("r1", "binary", 0, {"hydra_record": False}),
        ("r1", "binary", 1, {"status": "incomplete"}),
    ]
    for job, (schema, reward, seed, options) in enumerate(plan):
        values[(schema, reward, seed)] = _write_job(part1 / str(job), schema, reward, seed, rng, **options)
    values[("r1", "binary", 2)] = _write_job(part2 / "0", "r1", "binary", 2, rng)
    return {"part1": part1, "part2": part2, "values": values, "base": tmp_path / "multiruns"}


def _expected_cell(values: dict, schema: str, reward: str) -> dict[str, tuple[float | None, float | None, int]]:
    """Mean, sample std and count over the completed seeds, computed here with numpy."""
    runs = [v for (s, r, _), v in sorted(values.items()) if (s, r) == (schema, reward) and v]
    out = {}
    for key in EVAL_KEYS:
        xs = [run["grpo"][key] for run in runs]
        xs = np.array([x for x in xs if isinstance(x, float) and math.isfinite(x)])
        out[key] = _np_stat(xs)
    for key in ("train/zero_std_group_fraction", "train/zero_std_group_fraction_cls"):
        per_run = [np.nanmean([np.nan if s[key] is None else s[key] for s in run["history"]]) for run in runs]
        out[key] = _np_stat(np.array(per_run))
    out["grpo_seconds"] = _np_stat(np.array([run["seconds"] for run in runs]))
    return out


def _np_stat(xs: np.ndarray) -> tuple[float | None, float | None, int]:
    if xs.size == 0:
        return (None, None, 0)
    return (float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else None, int(xs.size))


def _check_cell(cell, expected: dict) -> None:
    for key, (mean, std, n) in expected.items():
        stat = cell.stats[key]
        assert stat.n == n, (cell.schema, cell.reward, key)
        if mean is None:
            assert stat.mean is None
            continue
        assert stat.mean == pytest.approx(mean, rel=1e-12), (cell.schema, cell.reward, key)
        if std is None:
            assert stat.std is None
        else:
            assert stat.std == pytest.approx(std, rel=1e-9), (cell.schema, cell.reward, key)


def test_means_and_stds_match_an_independent_computation(sweep: dict) -> None:
    result = agg.aggregate([sweep["part1"], sweep["part2"]])
    cells = {(c.schema, c.reward): c for c in result.cells}
    # The grid, in its order, whether or not a cell has runs.
    assert list(cells) == [(s, r) for s in ("adfm", "r1", "direct") for r in ("adfm", "binary")]
    for (schema, reward), cell in cells.items():
        _check_cell(cell, _expected_cell(sweep["values"], schema, reward))
    assert cells[("adfm", "adfm")].seeds == [0, 1, 2]
    assert cells[("adfm", "binary")].seeds == [0, 1]  # seed 2 failed: not averaged in
    assert cells[("r1", "binary")].seeds == [0, 2]  # seed 0 found by _target_, seed 2 from part two
    assert cells[("r1", "adfm")].stats["box_mIoU"].n == 2  # a null in seed 1
    assert cells[("r1", "adfm")].stats["box_AP50"].n == 2  # a NaN literal in seed 2
    assert cells[("direct", "adfm")].seeds == [] and cells[("direct", "adfm")].stats["box_mIoU"].mean is None
    assert cells[("adfm", "adfm")].stats["box_mIoU_floor"].mean == pytest.approx(0.0547)


def test_results_md_lists_every_gap_and_formats_the_table(sweep: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert agg.main(["--runs", str(sweep["part1"]), "--out-dir", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "completed 9, failed 1, incomplete 1, missing 7." in text
    assert "- adfm / binary, seed 2: **failed** — `RuntimeError: CUDA out of memory`" in text
    assert "- r1 / binary, seed 1: **incomplete** — no results.json and no failure.txt" in text
    assert "- r1 / binary, seed 2: **missing** — no job folder found" in text
    assert "- direct / adfm, seeds 0, 1, 2: **missing**" in text
    assert "- direct / binary, seeds 0, 1, 2: **missing**" in text
    assert "- r1 / adfm, seed 1: no finite value for mean IoU" in text
    assert "- r1 / adfm, seed 2: no finite value for AP50" in text
    # The r1/adfm row, checked cell by cell against numbers formatted here.
    expected = _expected_cell({k: v for k, v in sweep["values"].items() if k != ("r1", "binary", 2)}, "r1", "adfm")
    row = next(line for line in text.splitlines() if line.startswith("| r1 | adfm |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3/3"
    mean, std, _ = expected["image_BalancedAccuracy"]
    assert cells[3] == f"{mean:.3f} ± {std:.3f}"
    mean, std, _ = expected["box_mIoU"]
    assert cells[5] == f"{mean:.3f} ± {std:.3f} (n=2)"
    mean, std, _ = expected["train/zero_std_group_fraction"]
    assert cells[8] == f"{mean:.3f} ± {std:.3f}"
    direct = next(line for line in text.splitlines() if line.startswith("| direct | adfm |"))
    assert "| 0/3 |" in direct and "—" in direct
    # Provenance: the sweep command from Hydra's multirun.yaml, this command, machine, commit.
    assert "python -m anomaly_rl.train -m +experiment=ablation schema=adfm,r1,direct reward=adfm,binary seed=0,1,2" in text
    assert f"`python experiments/ablation/aggregate.py --runs {sweep['part1']} --out-dir {out}`" in text
    assert "CPUs" in text and "Repository commit" in text
    png = out / "reward_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![reward curves](reward_curves.png)" in text


def test_merging_parts_fills_a_failed_cell_and_lists_the_superseded_run(sweep: dict, tmp_path: Path) -> None:
    rerun = sweep["base"] / "2026-01-03_10-00-00"
    _write_multirun(rerun, ["+experiment=ablation", "schema=adfm", "reward=binary", "seed=2"])
    values = _write_job(rerun / "0", "adfm", "binary", 2, np.random.default_rng(5))
    result = agg.aggregate([sweep["part1"], sweep["part2"], rerun])
    assert result.chosen[("adfm", "binary", 2)].status == "ok"
    assert [run.status for run in result.superseded] == ["failed"]
    cell = next(c for c in result.cells if (c.schema, c.reward) == ("adfm", "binary"))
    assert cell.seeds == [0, 1, 2]
    merged = dict(sweep["values"]) | {("adfm", "binary", 2): values}
    _check_cell(cell, _expected_cell(merged, "adfm", "binary"))
    text = agg.render_markdown(result, [sweep["part1"], rerun], "cmd", "reward_curves.png", 10)
    assert "Superseded duplicates" in text and "adfm / binary, seed 2: failed" in text
    assert "**failed**" not in text


def test_notes_survive_a_rerun_and_an_unmarked_file_is_backed_up(sweep: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_text("hand-written, no markers\n")
    assert agg.main(["--base", str(sweep["base"]), "--out-dir", str(out)]) == 0
    assert (out / "RESULTS.md.bak").read_text() == "hand-written, no markers\n"
    first = (out / "RESULTS.md").read_text()
    # Default input is the newest multirun folder: part two alone.
    assert "completed 1, failed 0, incomplete 0, missing 17." in first
    notes = "<!-- notes -->\nThe adfm reward keeps fewer groups at zero std.\n\nSecond paragraph.\n<!-- /notes -->"
    start, end = first.index("<!-- notes -->"), first.index("<!-- /notes -->") + len("<!-- /notes -->")
    (out / "RESULTS.md").write_text(first[:start] + notes + first[end:])
    assert agg.main(["--runs", str(sweep["part1"]), "--runs", str(sweep["part2"]), "--out-dir", str(out)]) == 0
    second = (out / "RESULTS.md").read_text()
    assert notes in second and second.count("<!-- notes -->") == 1
    assert "_Placeholder" not in second
    assert "completed 10, failed 1, incomplete 1, missing 6." in second  # the rest was regenerated


def test_identification_from_target_prefers_the_conf_file_whose_settings_match(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "reward").mkdir(parents=True)
    target = "anomaly_rl.rewards.adfm.AdfmReward"
    (conf / "reward" / "adfm.yaml").write_text(yaml.safe_dump({"_target_": target, "w_cls": 1.0, "w_loc": 1.0}))
    (conf / "reward" / "adfm_noloc.yaml").write_text(yaml.safe_dump({"_target_": target, "w_cls": 1.0, "w_loc": 0.0}))
    assert agg.name_from_node({"_target_": target, "w_cls": 1.0, "w_loc": 0.0}, "reward", conf) == "adfm_noloc"
    assert agg.name_from_node({"_target_": target, "w_cls": 1.0, "w_loc": 1.0}, "reward", conf) == "adfm"
    # No conf file with that target: the module's name.
    assert agg.name_from_node({"_target_": "pkg.rewards.roam.RoamReward"}, "reward", conf) == "roam"
    assert agg.name_from_node({"name": "custom", "_target_": target}, "reward", conf) == "custom"


def test_smoothing_and_seed_band_against_numpy() -> None:
    values = [1.0, 3.0, float("nan"), 5.0, 7.0, 2.0]
    window = 3
    expected = [np.nanmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(agg.smooth(values, window), expected)
    assert agg.smooth([1.0, 2.0], 1).tolist() == [1.0, 2.0]

    def run(curve: list[float | None]) -> object:
        history = [{"train/rollout_step": float(i + 1), "train/reward": v} for i, v in enumerate(curve)]
        return agg.Run(Path("."), "adfm", "adfm", 0, "ok", history=history)

    a, b, c = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, None]  # c stopped a step early
    steps, mean, std = agg.seed_curves([run(a), run(b), run(c)], "train/reward", 2)
    assert steps.tolist() == [1, 2, 3, 4]
    smoothed = np.array([agg.smooth(x, 2) for x in (a, b, [0.0, 5.0, np.nan, np.nan])])
    np.testing.assert_allclose(mean, np.nanmean(smoothed, axis=0))
    np.testing.assert_allclose(std[:2], np.std(smoothed[:, :2], axis=0, ddof=1))
    # Step 4: seeds a and b only (c's trailing window at step 4 is empty).
    np.testing.assert_allclose(std[3], np.std(smoothed[:2, 3], ddof=1))


def test_bad_input_gives_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agg.main(["--runs", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert agg.main(["--base", str(tmp_path / "empty"), "--out-dir", str(tmp_path)]) == 2
    assert "no multirun folder under" in capsys.readouterr().err
    job = tmp_path / "m" / "0"
    job.mkdir(parents=True)
    (job / "results.json").write_text("{not json")
    assert agg.main(["--runs", str(tmp_path / "m"), "--out-dir", str(tmp_path)]) == 2
    assert "results.json: not readable JSON" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()
