"""The embedded default over several seeds, with the SFT control, aggregated into RESULTS.md.

    .venv/bin/python experiments/default_job/run_seeds.py [--seeds 0 1 2] [extra Hydra overrides...]

Each seed runs `python -m anomaly_rl.train control.enabled=true seed=S` (the committed warm start,
GRPO, then the same wall time of SFT from the same start) and the script writes
experiments/default_job/RESULTS.md (mean and std over seeds of every row) and reward curves
(experiments/default_job/reward_curves.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KEYS = (
    "image_BalancedAccuracy",
    "image_F1Score",
    "image_AUROC",
    "schema_valid_rate",
    "box_mIoU",
    "box_AP50",
    "box_area_pred_median",
)
ROWS = ("start", "grpo", "sft_control", "median_box")


def seed_command(seed: int, extra: list[str]) -> tuple[list[str], Path]:
    run_dir = ROOT / "logs" / "default_job" / f"seed{seed}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    command = [
        sys.executable, "-m", "anomaly_rl.train", f"seed={seed}", "control.enabled=true",
        "logger=csv", "callbacks=none", f"hydra.run.dir={run_dir}", *extra,
    ]
    return command, run_dir


def run_seeds(seeds: list[int], extra: list[str], parallel: bool) -> list[Path]:
    """Sequentially, or all at once with one thread each (GRPO and its control then share the
    machine alike, so the control's equal wall time stays a fair comparison)."""
    jobs = [seed_command(seed, extra) for seed in seeds]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if parallel else dict(os.environ)
    if not parallel:
        for command, _ in jobs:
            print("$", " ".join(command), flush=True)
            subprocess.run(command, cwd=ROOT, check=True, env=env)
        return [run_dir for _, run_dir in jobs]
    processes = []
    for command, run_dir in jobs:
        print("$", " ".join(command), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = (run_dir / "stdout.log").open("w")
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    failed = [cmd for (cmd, _), p in zip(jobs, processes, strict=True) if p.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} seed runs failed: {failed}")
    return [run_dir for _, run_dir in jobs]


def fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def reward_curves(run_dirs: list[Path], out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run_dir in run_dirs:
        rows = list(csv.DictReader((run_dir / "csv" / "grpo" / "metrics.csv").open()))
        rows = [r for r in rows if r.get("train/reward")]
        steps = list(range(len(rows)))
        label = run_dir.name.split("_")[0]
        for ax, key in zip(axes, ("train/reward", "train/reward_loc", "train/zero_std_group_fraction"), strict=True):
            ax.plot(steps, [float(r[key]) for r in rows], label=label, alpha=0.8)
            ax.set_title(key)
            ax.set_xlabel("GRPO step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse", type=Path, nargs="*", default=None, help="aggregate these run folders instead")
    parser.add_argument("--parallel", action="store_true", help="run the seeds at once, one thread each")
    parser.add_argument("--name", default="RESULTS", help="output names: <name>.md and <name>_reward_curves.png")
    args, extra = parser.parse_known_args()
    run_dirs = args.reuse if args.reuse else run_seeds(args.seeds, extra, args.parallel)
    results = [json.loads((d / "results.json").read_text()) for d in run_dirs]
    command_line = " ".join(
        [".venv/bin/python experiments/default_job/run_seeds.py", "--seeds", *map(str, args.seeds)]
        + (["--parallel"] if args.parallel else [])
        + extra
    )
    lines = [
        "# The embedded default over seeds: GRPO against its SFT start and the SFT control",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; command: `{command_line}`",
        "",
        "Test split of the synthetic dataset; mean ± std over seeds (the warm start is shared; the seed",
        "changes GRPO's sampling and batch order and the control's batch order).",
        "",
        "| row | " + " | ".join(KEYS) + " |",
        "|---|" + "---|" * len(KEYS),
    ]
    for row in ROWS:
        cells = [fmt([r["rows"].get(row, {}).get(k) for r in results]) for k in KEYS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    seconds = [r["seconds"].get("final") for r in results]
    lines += ["", f"GRPO wall time per seed (s): {', '.join(f'{s:.0f}' for s in seconds if s)}", ""]
    lines += ["Per seed:", ""]
    for d, r in zip(run_dirs, results, strict=True):
        cells = ", ".join(
            f"{row} mIoU {r['rows'].get(row, {}).get('box_mIoU', float('nan')):.3f}" for row in ROWS
        )
        lines.append(f"- `{d.name}`: {cells}")
    (HERE / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    reward_curves(list(run_dirs), HERE / f"{args.name}_reward_curves.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
