"""experiments/adapt/levers.py without training: every lever composes and changes the run it names,
and the table's paired gaps and curve edges match an independent computation on fake folders."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.scripts import REPO_ROOT, load_script

levers = load_script("experiments/adapt/levers.py", "adapt_levers")


def _compose(overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.root_dir={REPO_ROOT}"])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=False)


def _train_overrides(command: list[str]) -> list[str]:
    start = command.index("anomaly_rl.train") + 1
    return [o for o in command[start:] if not o.startswith("hydra.")]


@pytest.mark.parametrize("lever", list(levers.LEVERS))
def test_every_lever_composes_and_changes_the_recipe(lever: str, tmp_path: Path) -> None:
    recipe = _compose(_train_overrides(levers.lever_command("recipe", 0, tmp_path, [])))
    assert recipe["control"]["enabled"] is False and recipe["data"]["shots"] == levers.K
    cfg = _compose(_train_overrides(levers.lever_command(lever, 0, tmp_path, [])))
    for override in levers.LEVERS[lever][0]:
        key, value = override.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = node[part]
        if isinstance(node, bool):
            assert node == (value == "true"), override
        elif isinstance(node, int | float):
            assert node == pytest.approx(float(value)), override
        else:
            assert node == value, override
    if lever in levers.PRE_SFT_STEPS:
        sft, grpo = levers.lever_commands(lever, 0, tmp_path, [])
        sft_cfg = _compose(_train_overrides(sft))
        assert sft_cfg["warm_start"]["max_steps"] == levers.PRE_SFT_STEPS[lever] and sft_cfg["data"]["shots"] == levers.K
        run_dir = next(o for o in sft if o.startswith("hydra.run.dir=")).split("=", 1)[1]
        assert cfg["init_from"] == run_dir  # GRPO starts from the short SFT run
    elif lever != "recipe":
        assert cfg["algo"] != recipe["algo"] or cfg["reward"] != recipe["reward"]


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_table_gap_and_curve_edges_match_an_independent_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    keys = [key for key, _ in levers.METRICS]
    out, bench, docs = tmp_path / "levers", tmp_path / "bench", tmp_path / "docs"
    # docs does not exist yet: write() creates it (levers.py --out-dir for a one-off run)
    expected_gap, cls_first, cls_last = [], [], []
    for seed in (0, 1):
        grpo = {key: float(rng.uniform(0.1, 0.9)) for key in keys}
        sft = {key: float(rng.uniform(0.1, 0.9)) for key in keys}
        zero_std = [float(v) for v in rng.uniform(0, 1, 25)]
        history = [{"train/reward_cls": 0.1 * i, "train/zero_std_group_fraction_cls": z} for i, z in enumerate(zero_std)]
        _write(out / f"beta_0_s{seed}" / "results.json", {"rows": {"grpo": grpo}, "seconds": {"final": 50.0}})
        _write(out / f"beta_0_s{seed}" / "grpo_history.json", history)
        _write(out / f"beta_0_s{seed}" / "diversity.json",
               {"start": {"normal_groups_with_a_normal_answer": 0.0},
                "final": {"normal_groups_with_a_normal_answer": 0.25 * (seed + 1)}})
        _write(bench / f"k16_s{seed}" / "results.json", {"rows": {"sft_control": sft, "start": sft, "grpo": grpo}})
        expected_gap.append(grpo["image_BalancedAccuracy"] - sft["image_BalancedAccuracy"])
        cls_first.append(statistics.fmean(zero_std[:10]))
        cls_last.append(statistics.fmean(zero_std[-10:]))
    (out / "beta_0_s9").mkdir()  # an unfinished run: no results.json, skipped
    target = levers.write(out, bench, "levers.py --levers beta_0", out_dir=docs)
    text = target.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| beta_0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0, 1"
    gap = f"{statistics.fmean(expected_gap):+.3f} ± {statistics.stdev(expected_gap):.3f}"
    assert cells[3 + len(keys)] == gap
    assert cells[5 + len(keys)] == "0.45 → 1.95"  # R_cls 0.1 * step: steps 0-9 and 15-24
    assert cells[6 + len(keys)] == f"{statistics.fmean(cls_first):.2f} → {statistics.fmean(cls_last):.2f}"
    assert cells[-2] == "25.000 ± 0.000"
    assert cells[-4] == "0.00 → 0.38"  # probe: groups with a "normal" answer, start -> mean(0.25, 0.5)
    assert cells[-3] == "—"  # that probe value was not written
    # the notes block survives a rerun
    target.write_text(text.replace(levers.NOTES_PLACEHOLDER, "kept by hand"))
    levers.write(out, bench, "levers.py", out_dir=docs)
    assert "kept by hand" in target.read_text()
    assert json.loads((docs / "levers.json").read_text())["beta_0"]["0"]["steps"] == 25


def test_a_lever_with_its_own_start_shows_that_start(tmp_path: Path) -> None:
    out, bench = tmp_path / "levers", tmp_path / "bench"
    start = {"image_BalancedAccuracy": 0.6, "box_mIoU": 0.05}
    _write(out / "sft_10_then_grpo_s0" / "results.json",
           {"rows": {"start": start, "grpo": {"image_BalancedAccuracy": 0.7}}, "seconds": {"final": 9.0}})
    _write(out / "sft_10_then_grpo_s0_sft" / "results.json", {"rows": {"sft": start}})  # the short SFT run: skipped
    _write(bench / "k16_s0" / "results.json", {"rows": {"sft_control": {"image_BalancedAccuracy": 0.65,
                                                                        "box_mIoU": 0.07}}})
    text = levers.write(out, bench, "levers.py", out_dir=tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sft_10_then_grpo: start |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0" and cells[2] == "0.600 (n=1)"
    assert cells[-2:] == ["-0.050 (n=1)", "-0.020 (n=1)"]  # start - SFT arm, same seed
    main = next(line for line in text.splitlines() if line.startswith("| sft_10_then_grpo |"))
    assert "+0.050 (n=1)" in main  # GRPO after that start - SFT arm


def test_no_finished_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished lever run"):
        levers.write(tmp_path, None, "levers.py", out_dir=tmp_path)
