"""experiments/adapt/run_adapt.py without training: the job scheduler (order, dependencies, readiness,
failures), the lr pick from fake val results, and the job list of the benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.scripts import load_script

run_adapt = load_script("experiments/adapt/run_adapt.py", "run_adapt")


def _append(path: Path, text: str) -> list[str]:
    return [sys.executable, "-c", f"open({str(path)!r}, 'a').write({text!r} + '\\n')"]


def test_scheduler_respects_dependencies_readiness_and_reports_failures(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    flag = tmp_path / "flag"
    Job = run_adapt.Job
    jobs = [
        Job("b", [_append(trace, "b")], tmp_path / "b.log", after=("a",)),  # listed first, runs after a
        Job("a", [_append(trace, "a"), [sys.executable, "-c", f"open({str(flag)!r}, 'w')"]], tmp_path / "a.log"),
        Job("waits", [_append(trace, "waits")], tmp_path / "w.log", ready=flag.exists),
        Job("fails", [[sys.executable, "-c", "raise SystemExit(3)"], _append(trace, "never")], tmp_path / "f.log"),
        Job("built late", lambda: [_append(trace, f"late {flag.exists()}")], tmp_path / "l.log", after=("a",)),
        Job("never ready", [_append(trace, "x")], tmp_path / "n.log", ready=lambda: False),
    ]
    failed = run_adapt.run_all(jobs, parallel=2)
    lines = trace.read_text().splitlines()
    assert sorted(failed) == ["fails", "never ready"]
    assert "never" not in lines and "x" not in lines  # a failed command stops its job
    assert lines.index("a") < lines.index("b") and lines.index("a") < lines.index("waits")
    assert "late True" in lines  # the command list was built when the job started, after a
    assert "exit 3" in (tmp_path / "f.log").read_text()


def test_lr_pick_chooses_the_best_val_score_and_keeps_other_budgets(tmp_path: Path, monkeypatch) -> None:
    lr_file = tmp_path / "sft_lr.json"
    monkeypatch.setattr(run_adapt, "LR_FILE", lr_file)
    lr_file.write_text(json.dumps({"budgets": {"4": {"lr": 0.001, "val": {}}}}))
    out = tmp_path / "lr"
    scores = {1e-4: (0.70, 0.10), 3e-4: (0.72, 0.15), 1e-3: (0.80, 0.01)}  # sums 0.80, 0.87, 0.81
    for lr, (ba, iou) in scores.items():
        path = out / f"k16_lr{lr:g}" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"rows": {"sft": {"image_BalancedAccuracy": ba, "box_mIoU": iou}}}))
    result = run_adapt.write_lrs(out, [16], list(scores), 100)
    saved = json.loads(lr_file.read_text())
    assert saved["budgets"]["16"]["lr"] == 3e-4 and result["budgets"]["16"]["lr"] == 3e-4
    assert saved["budgets"]["4"]["lr"] == 0.001  # picked earlier, kept
    assert set(saved["budgets"]["16"]["val"]) == {"0.0001", "0.0003", "0.001"}
    assert run_adapt.load_lrs() == {"16": 3e-4, "4": 0.001}


def test_benchmark_jobs_wire_the_sft_arm_to_its_grpo_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_adapt, "LR_FILE", tmp_path / "sft_lr.json")
    (tmp_path / "sft_lr.json").write_text(json.dumps({"budgets": {"4": {"lr": 0.0003}}}))
    jobs = run_adapt.benchmark_jobs(tmp_path, [4], [0, 1], ["eval.limit=8"], separate_sft=True)
    names = [job.name for job in jobs]
    assert names == ["base (old looks)", "k=4 seed=0 GRPO", "k=4 seed=1 GRPO", "k=4 seed=0 SFT", "k=4 seed=1 SFT"]
    grpo, sft = jobs[1], jobs[3]
    train = grpo.commands[0]
    assert "control.enabled=false" in train and "data.shots=4" in train and "warm_start.batch_size=8" in train
    assert "eval.limit=8" in grpo.commands[1]  # the old-look evaluation gets the eval overrides too
    assert sft.after == ("k=4 seed=0 GRPO",) and not sft.ready()
    run = tmp_path / "k4_s0"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"seconds": {"final": 90.0}}))
    assert sft.ready()
    command = sft.commands()[0]
    assert "warm_start.max_minutes=1.5000" in command and "warm_start.optimizer.lr=0.0003" in command
    assert "eval.split=test" in command and f"hydra.run.dir={run / 'sft_arm'}" in command
    combined = run_adapt.benchmark_jobs(tmp_path, [4], [0], [], separate_sft=False)
    commands = combined[1].commands()
    assert "control.lr=0.0003" in commands[0] and len(commands) == 3


def test_repair_reruns_only_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_adapt, "LR_FILE", tmp_path / "sft_lr.json")
    (tmp_path / "sft_lr.json").write_text(json.dumps({"budgets": {"16": {"lr": 0.001}}}))
    (tmp_path / "base" / "old_start").mkdir(parents=True)
    (tmp_path / "base" / "old_start" / "metrics.json").write_text("{}")
    done = tmp_path / "k16_s0"  # GRPO done, its old-look evaluation missing, SFT arm done
    for weights in ("final", "sft_arm"):
        (done / weights).mkdir(parents=True)
        (done / weights / "weights.pt").write_bytes(b"")
    (done / "results.json").write_text(json.dumps({"rows": {"grpo": {}}, "seconds": {"final": 60.0}}))
    (done / "sft_arm" / "results.json").write_text("{}")
    (done / "old_sft_control").mkdir()
    (done / "old_sft_control" / "metrics.json").write_text("{}")
    killed_sft = tmp_path / "k16_s1"  # GRPO done and evaluated, SFT arm killed
    (killed_sft / "final").mkdir(parents=True)
    (killed_sft / "results.json").write_text(json.dumps({"rows": {"grpo": {}}, "seconds": {"final": 60.0}}))
    (killed_sft / "old_grpo").mkdir()
    (killed_sft / "old_grpo" / "metrics.json").write_text("{}")
    (killed_sft / "sft_arm").mkdir()
    killed_grpo = tmp_path / "k16_s2"  # GRPO killed
    (killed_grpo / "checkpoints").mkdir(parents=True)
    jobs = run_adapt.repair_jobs(tmp_path, ["eval.limit=4"])
    names = [job.name for job in jobs]
    assert names == ["repair k16_s0/old_grpo", "k=16 seed=1 SFT", "k=16 seed=2 GRPO", "k=16 seed=2 SFT"]
    assert "eval.limit=4" in jobs[0].commands[0] and f"ckpt={done / 'final'}" in jobs[0].commands[0]
    assert jobs[1].after == () and jobs[1].ready()  # the SFT arm of a finished GRPO run starts at once
    assert jobs[3].after == ("k=16 seed=2 GRPO",)
    assert not (killed_sft / "sft_arm").exists() and any(p.name.startswith("sft_arm.failed-") for p in killed_sft.iterdir())
    assert not killed_grpo.exists() and any(p.name.startswith("k16_s2.failed-") for p in tmp_path.iterdir())
