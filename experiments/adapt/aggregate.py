"""Collect an adaptation benchmark folder (run_adapt.py) into RESULTS.md and a reward-curve plot.

    python experiments/adapt/aggregate.py                  # the newest logs/adapt/runs/<time>/
    python experiments/adapt/aggregate.py --runs DIR [--runs DIR2 ...]

A DIR holds `base/old_start/` (the base on the old looks' test split) and one `k<K>_s<SEED>/` run
folder of `anomaly_rl.train +experiment=adapt` per budget and seed, each with `old_grpo/` and
`old_sft_control/` (anomaly_rl.evaluate on the old looks). Everything in RESULTS.md is regenerated
except the text between `<!-- notes -->` and `<!-- /notes -->`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_RUNS = ROOT / "logs" / "adapt" / "runs"
RUN_NAME = re.compile(r"^k(\d+)_s(\d+)$")

# (arm, row in results.json on the new look, folder of the old-look evaluation)
ARMS = (
    ("no adaptation", "start", None),  # old looks: the base, base/old_start
    ("SFT, same wall time", "sft_control", "old_sft_control"),
    ("GRPO (AD-FM)", "grpo", "old_grpo"),
)
NEW_METRICS = (
    ("image_BalancedAccuracy", "bal. acc."),
    ("image_AUROC", "AUROC"),
    ("box_mIoU", "mean IoU"),
    ("box_AP50", "AP50"),
    ("schema_valid_rate", "schema-valid"),
)
OLD_METRICS = (
    ("image_BalancedAccuracy", "old bal. acc."),
    ("image_AUROC", "old AUROC"),
    ("box_mIoU", "old mean IoU"),
    ("box_AP50", "old AP50"),
)
PAIRED = (("new", "image_BalancedAccuracy", "bal. acc. (new)"), ("new", "box_mIoU", "mean IoU (new)"),
          ("new", "image_AUROC", "AUROC (new)"), ("old", "image_BalancedAccuracy", "bal. acc. (old)"),
          ("old", "box_mIoU", "mean IoU (old)"))
EDGE = 10  # steps averaged at the start and at the end of a GRPO run

NOTES_OPEN = "<!-- notes -->"
NOTES_CLOSE = "<!-- /notes -->"
NOTES_PLACEHOLDER = "_Placeholder: what the numbers show, written after the real runs; kept across reruns._"


class AggregationError(Exception):
    pass


@dataclass
class Run:
    folder: Path
    k: int
    seed: int
    new: dict[str, dict[str, Any]] = field(default_factory=dict)  # row -> metrics (screw test split)
    old: dict[str, dict[str, Any]] = field(default_factory=dict)  # row -> metrics (old looks' test split)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    status: str = "incomplete"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AggregationError(f"{path}: not readable JSON ({error})") from error


def _overall(folder: Path) -> dict[str, Any] | None:
    path = folder / "metrics.json"
    return (_json(path).get("overall") or {}) if path.is_file() else None


def read_run(folder: Path, base_old: dict[str, Any] | None) -> Run:
    match = RUN_NAME.match(folder.name)
    assert match
    run = Run(folder, int(match.group(1)), int(match.group(2)))
    results = folder / "results.json"
    if results.is_file():
        data = _json(results)
        run.new = {name: row for name, row in (data.get("rows") or {}).items() if isinstance(row, dict)}
        run.seconds = {k: float(v) for k, v in (data.get("seconds") or {}).items() if _finite(v) is not None}
    separate = folder / "sft_arm" / "results.json"  # the SFT arm run on its own (run_adapt.py --separate-sft)
    if "sft_control" not in run.new and separate.is_file():
        data = _json(separate)
        if isinstance((data.get("rows") or {}).get("sft"), dict):
            run.new["sft_control"] = data["rows"]["sft"]
        if _finite((data.get("seconds") or {}).get("final")) is not None:
            run.seconds["control"] = float(data["seconds"]["final"])
    if base_old is not None:
        run.old["start"] = base_old
    for _, row, old_folder in ARMS:
        if old_folder and (metrics := _overall(folder / old_folder)) is not None:
            run.old[row] = metrics
    history = folder / "grpo_history.json"
    if history.is_file():
        run.history = [step for step in _json(history) if isinstance(step, dict)]
    complete = all(row in run.new for _, row, _ in ARMS) and all(row in run.old for _, row, _ in ARMS)
    run.status = "ok" if complete else ("failed" if (folder / "failure.txt").is_file() else "incomplete")
    return run


def read_runs(runs_dirs: Sequence[Path]) -> list[Run]:
    runs = []
    for runs_dir in runs_dirs:
        if not runs_dir.is_dir():
            raise AggregationError(f"--runs {runs_dir}: no such folder")
        base_old = _overall(runs_dir / "base" / "old_start")
        for folder in sorted(runs_dir.iterdir()):
            if folder.is_dir() and RUN_NAME.match(folder.name):
                runs.append(read_run(folder, base_old))
    return runs


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int


def mean_std(values: Iterable[Any]) -> Stat:
    finite = [v for v in (_finite(x) for x in values) if v is not None]
    if not finite:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None, len(finite))


def fmt(stat: Stat, signed: bool = False) -> str:
    if stat.mean is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{stat.mean:{sign}.3f}"
    return text + (f" ± {stat.std:.3f}" if stat.std is not None else "") + ("" if stat.n >= 2 else f" (n={stat.n})")


def history_values(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [v for v in (_finite(step.get(key)) for step in history) if v is not None]


def edge_mean(values: Sequence[float], end: bool) -> float | None:
    chunk = values[-EDGE:] if end else values[:EDGE]
    return statistics.fmean(chunk) if chunk else None


def budget_table(runs: Sequence[Run]) -> list[str]:
    columns = [t for _, t in NEW_METRICS] + [t for _, t in OLD_METRICS]
    lines = ["| arm | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for arm, row, _ in ARMS:
        members = [r for r in runs if row in r.new]
        cells = [fmt(mean_std(r.new[row].get(key) for r in members)) for key, _ in NEW_METRICS]
        cells += [fmt(mean_std(r.old.get(row, {}).get(key) for r in members)) for key, _ in OLD_METRICS]
        lines.append(f"| {arm} | {len(members)} | " + " | ".join(cells) + " |")
    floor = mean_std(r.new.get("median_box", {}).get("box_mIoU") for r in runs)
    lines.append(f"| always the training median box | {floor.n} | — | — | {fmt(floor)} | — | — | — | — | — | — |")
    return lines


def paired_lines(runs: Sequence[Run]) -> list[str]:
    """GRPO − SFT per seed (same base, same k-shot draw, same test split), then mean ± std."""
    lines = ["| difference | " + " | ".join(t for _, _, t in PAIRED) + " |", "|---|" + "---|" * len(PAIRED)]
    for label, a, b in (("GRPO − SFT", "grpo", "sft_control"), ("GRPO − no adaptation", "grpo", "start"),
                        ("SFT − no adaptation", "sft_control", "start")):
        cells = []
        for split, key, _ in PAIRED:
            diffs = []
            for run in runs:
                table = run.new if split == "new" else run.old
                x, y = _finite(table.get(a, {}).get(key)), _finite(table.get(b, {}).get(key))
                if x is not None and y is not None:
                    diffs.append(x - y)
            cells.append(fmt(mean_std(diffs), signed=True))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def training_lines(runs: Sequence[Run]) -> list[str]:
    keys = (("train/reward", "reward"), ("train/reward_cls", "R_cls"), ("train/reward_loc", "R_loc"),
            ("train/zero_std_group_fraction", "zero-std groups"),
            ("train/zero_std_group_fraction_cls", "zero-std groups (cls)"))
    lines = ["| seeds | GRPO s | SFT s | " + " | ".join(f"{t} first→last {EDGE}" for _, t in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    with_history = [r for r in runs if r.history]
    cells = []
    for key, _ in keys:
        first = mean_std(edge_mean(history_values(r.history, key), False) for r in with_history)
        last = mean_std(edge_mean(history_values(r.history, key), True) for r in with_history)
        cells.append("—" if first.mean is None else f"{first.mean:.2f} → {last.mean:.2f}")
    grpo_s = mean_std(r.seconds.get("final") for r in runs)
    sft_s = mean_std(r.seconds.get("control") for r in runs)
    lines.append(f"| {len(with_history)} | {grpo_s.mean or 0:.0f} | {sft_s.mean or 0:.0f} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(runs: Sequence[Run], out: Path, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ("train/reward", "train/reward_cls", "train/reward_loc", "train/zero_std_group_fraction",
            "train/zero_std_group_fraction_cls")
    budgets = sorted({r.k for r in runs})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for k in budgets:
            curves = [history_values(r.history, key) for r in runs if r.k == k and r.history]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            smoothed = []
            for c in curves:
                array = np.asarray(c[:length], dtype=float)
                smoothed.append([array[max(0, i - window + 1): i + 1].mean() for i in range(length)])
            array = np.asarray(smoothed)
            mean, std = array.mean(0), array.std(0)
            steps = np.arange(1, length + 1)
            ax.plot(steps, mean, label=f"k={k} ({len(curves)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(key.replace("train/", ""))
        ax.set_xlabel("GRPO step")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out + (" (working tree modified)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def render(runs: Sequence[Run], runs_dirs: Sequence[Path], command: str, plot: str) -> str:
    lines = [
        "# Adaptation to an unseen look under a small annotation budget (synthetic benchmark, tiny model)",
        "",
        "Generated by `experiments/adapt/aggregate.py`; a rerun rewrites everything here except the notes",
        "block. What is compared and why: `experiments/adapt/README.md`.",
        "",
        f"- Aggregated with: `{command}`",
    ]
    for runs_dir in runs_dirs:
        command_file = Path(runs_dir) / "command.txt"
        wall = Path(runs_dir) / "wall_seconds.txt"
        ran = command_file.read_text().strip() if command_file.is_file() else "(unknown)"
        took = f"; wall time {int(wall.read_text()) / 60:.1f} min" if wall.is_file() else ""
        lines.append(f"- Runs in `{_relative(runs_dir)}`: `{ran}`{took}")
    ok = [r for r in runs if r.status == "ok"]
    lines += [
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: "
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"- Repository commit: {git_commit()}",
        f"- Runs: {len(runs)} found, {len(ok)} complete.",
        "",
        "## Notes",
        "",
        NOTES_OPEN,
        NOTES_PLACEHOLDER,
        NOTES_CLOSE,
        "",
        "New look: the screw test split (greedy decoding). Old looks: the default test split (metal,",
        "fabric, pill; 306 images) — the forgetting. Mean ± sample std over the seeds whose run completed",
        "that arm; the seed changes the k-shot draw, the split and the training randomness, so the paired",
        "differences below (same seed, same images) are the sharper comparison.",
        "",
    ]
    for k in sorted({r.k for r in runs}):
        members = [r for r in runs if r.k == k]
        seeds = ", ".join(str(r.seed) for r in sorted(members, key=lambda r: r.seed))
        lines += [f"## k = {k} normal + {k} defective screw images (seeds {seeds})", "", *budget_table(members), "",
                  "Paired differences (per seed, then mean ± std):", "", *paired_lines(members), "",
                  "GRPO training (means over seeds of the first and last steps):", "", *training_lines(members), ""]
    lines += ["## Reward curves", "", f"![reward curves]({plot})", "",
              "Mean over seeds of a 5-step trailing average, band ± 1 std.", "", "## Per run", "",
              "| k | seed | status | bal. acc. start / SFT / GRPO | mean IoU start / SFT / GRPO | old bal. acc. SFT / GRPO | folder |",
              "|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.k, r.seed)):
        def get(table: dict, row: str, key: str) -> str:
            value = _finite(table.get(row, {}).get(key))
            return "—" if value is None else f"{value:.3f}"

        ba = " / ".join(get(run.new, row, "image_BalancedAccuracy") for row in ("start", "sft_control", "grpo"))
        iou = " / ".join(get(run.new, row, "box_mIoU") for row in ("start", "sft_control", "grpo"))
        old = " / ".join(get(run.old, row, "image_BalancedAccuracy") for row in ("sft_control", "grpo"))
        lines.append(f"| {run.k} | {run.seed} | {run.status} | {ba} | {iou} | {old} | `{_relative(run.folder)}` |")
    return "\n".join(lines) + "\n"


def merge_notes(new_text: str, old_text: str | None) -> str:
    if not old_text or NOTES_OPEN not in old_text or NOTES_CLOSE not in old_text:
        return new_text
    start, end = old_text.index(NOTES_OPEN), old_text.index(NOTES_CLOSE) + len(NOTES_CLOSE)
    new_start, new_end = new_text.index(NOTES_OPEN), new_text.index(NOTES_CLOSE) + len(NOTES_CLOSE)
    return new_text[:new_start] + old_text[start:end] + new_text[new_end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, action="append", default=None)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    try:
        if args.runs:
            runs_dirs = args.runs
        else:
            candidates = sorted(p for p in DEFAULT_RUNS.iterdir() if p.is_dir()) if DEFAULT_RUNS.is_dir() else []
            if not candidates:
                raise AggregationError(f"no benchmark folder under {DEFAULT_RUNS}: run `make adapt` or pass --runs")
            runs_dirs = [candidates[-1]]
        runs = read_runs(runs_dirs)
        if not runs:
            raise AggregationError(f"no k<K>_s<SEED> run folders in {', '.join(map(str, runs_dirs))}")
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plot = plot_curves(runs, args.out_dir / "reward_curves.png")
        # Paths inside the repository are shown relative to it: RESULTS.md names no folder of this machine.
        shown = [_relative(Path(a)) if Path(a).is_absolute() else a for a in (sys.argv[1:] if argv is None else argv)]
        command = "python experiments/adapt/aggregate.py" + "".join(f" {shlex.quote(a)}" for a in shown)
        text = render(runs, runs_dirs, command, plot.name)
        path = args.out_dir / "RESULTS.md"
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        path.write_text(merge_notes(text, old), encoding="utf-8")
    except AggregationError as error:
        print(f"aggregate.py: {error}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
