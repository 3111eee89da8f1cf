"""Collect the ablation multirun (schema x reward x seed) into RESULTS.md and a reward-curve plot.

    python experiments/ablation/aggregate.py                       # the newest logs/ablation/multiruns/<time>/
    python experiments/ablation/aggregate.py --runs DIR [--runs DIR2 ...]   # merge a sweep run in parts
    python experiments/ablation/aggregate.py --all                 # every folder under logs/ablation/multiruns/

A DIR is a multirun folder (its job sub-folders are read) or a single job folder (a cell rerun on
its own with `python -m anomaly_rl.train +experiment=ablation schema=r1 reward=binary seed=1`).
Writes <out-dir>/RESULTS.md and <out-dir>/reward_curves.png. Everything in RESULTS.md is
regenerated except the text between `<!-- notes -->` and `<!-- /notes -->`, which is carried over.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_MULTIRUNS = ROOT / "logs" / "ablation" / "multiruns"

# The grid (issue 8): every cell of it is expected, and a cell without a completed run is
# listed by name, never silently averaged away.
EXPECTED_SCHEMAS = ("adfm", "r1", "direct")
EXPECTED_REWARDS = ("adfm", "binary")
EXPECTED_SEEDS = (0, 1, 2)

# (key in results.json rows, column title)
EVAL_METRICS = (
    ("image_BalancedAccuracy", "balanced acc."),
    ("image_F1Score", "F1"),
    ("box_mIoU", "mean IoU"),
    ("box_AP50", "AP50"),
    ("schema_valid_rate", "schema-valid"),
)
# (key in grpo_history.json steps, column title): averaged over the training steps of a run.
HISTORY_METRICS = (
    ("train/zero_std_group_fraction", "zero-std groups"),
    ("train/zero_std_group_fraction_cls", "zero-std groups (cls)"),
)
# (key in <job>/diversity.json's "start"/"final", column title): the G answers of a group sampled
# from the start and the trained policy on the same prompts (experiments/adapt/group_diversity.py).
DIVERSITY_METRICS = (
    ("distinct_answers_per_group", "distinct answers / group"),
    ("zero_std_group_fraction", "zero-std groups (probe)"),
    ("zero_std_group_fraction_cls", "zero-std groups cls (probe)"),
)
DIVERSITY_PREFIX = "div/"
FLOOR_KEY = ("median_box", "box_mIoU")
# Every per-run value summarised for the after-GRPO table, in column order.
GRPO_VALUE_KEYS = (
    *(key for key, _ in EVAL_METRICS),
    *(key for key, _ in HISTORY_METRICS),
    *(DIVERSITY_PREFIX + key for key, _ in DIVERSITY_METRICS),
    FLOOR_KEY[1] + "_floor",
    "grpo_seconds",
)
# Every per-run value of the before-GRPO table.
START_VALUE_KEYS = (*(key for key, _ in EVAL_METRICS), *(DIVERSITY_PREFIX + key for key, _ in DIVERSITY_METRICS))
# Reward components that carry the decision, for rewards whose class cannot be imported here.
CLASSIFICATION_FALLBACK = ("cls", "accuracy")

NOTES_OPEN = "<!-- notes -->"
NOTES_CLOSE = "<!-- /notes -->"
NOTES_PLACEHOLDER = (
    "_Placeholder: what the numbers show and what they do not, written after the real runs. "
    "Text between the two notes markers survives reruns of the aggregator._"
)


class AggregationError(Exception):
    """Input the aggregator cannot use: the message names the folder or file at fault."""


Cell = tuple[str, str]  # (schema, reward)
RunKey = tuple[str, str, int]  # (schema, reward, seed)


@dataclass
class Run:
    """One job folder of the sweep, whatever became of it."""

    folder: Path
    schema: str | None
    reward: str | None
    seed: int | None
    status: str  # "ok" (results.json with a grpo row), "failed" (failure.txt), "incomplete"
    detail: str = ""
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    grpo_seconds: float | None = None
    reward_target: str | None = None
    diversity: dict[str, dict[str, Any]] = field(default_factory=dict)  # "start"/"final" -> probe values
    finished_at: float = 0.0  # results.json's mtime: the newer of two duplicates wins

    @property
    def key(self) -> RunKey | None:
        if self.schema is None or self.reward is None or self.seed is None:
            return None
        return (self.schema, self.reward, self.seed)


@dataclass
class Stat:
    """Mean and sample std over the seeds whose value is finite; n says how many that was."""

    mean: float | None
    std: float | None
    n: int


@dataclass
class CellSummary:
    schema: str
    reward: str
    seeds: list[int]
    stats: dict[str, Stat]  # EVAL_METRICS, HISTORY_METRICS, FLOOR_KEY[1] and "grpo_seconds" keys
    start_stats: dict[str, Stat]  # the before-GRPO row when the runs evaluated one


@dataclass
class Aggregate:
    runs: list[Run]
    chosen: dict[RunKey, Run]
    superseded: list[Run]
    cells: list[CellSummary]
    expected: list[RunKey]


# ---------------------------------------------------------------- reading run folders


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise AggregationError(f"{path}: not readable YAML ({error})") from error


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AggregationError(f"{path}: not readable JSON ({error})") from error


def _is_job_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("config.yaml", "results.json", "failure.txt", ".hydra"))


def find_job_folders(runs_dir: Path) -> list[Path]:
    """The job folders of a multirun folder (Hydra's <sweep>/<job_num>/), or the folder itself
    when it is one job."""
    if not runs_dir.is_dir():
        raise AggregationError(f"--runs {runs_dir}: no such folder")
    if _is_job_folder(runs_dir) and not (runs_dir / "multirun.yaml").exists():
        return [runs_dir]
    children = [p for p in runs_dir.iterdir() if p.is_dir() and _is_job_folder(p)]
    # Numeric job numbers sort as numbers (2 before 10).
    return sorted(children, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _known_configs(conf_dir: Path, group: str) -> dict[str, dict[str, Any]]:
    folder = conf_dir / group
    if not folder.is_dir():
        return {}
    return {path.stem: _load_yaml(path) or {} for path in sorted(folder.glob("*.yaml"))}


def name_from_node(node: Any, group: str, conf_dir: Path) -> str | None:
    """The config-group option a resolved node came from, when Hydra's own record is absent.

    The schema and reward nodes carry no name, only `_target_`: the option is the conf file with
    that target (and, if several share it, the one whose every setting matches); failing that,
    the module's name (anomaly_rl.rewards.binary.BinaryReward -> binary).
    """
    if not isinstance(node, dict):
        return None
    if node.get("name"):
        return str(node["name"])
    target = node.get("_target_")
    if not target:
        return None
    candidates = {stem: conf for stem, conf in _known_configs(conf_dir, group).items() if conf.get("_target_") == target}
    if len(candidates) == 1:
        return next(iter(candidates))
    exact = [stem for stem, conf in candidates.items() if all(node.get(k) == v for k, v in conf.items())]
    if len(exact) == 1:
        return exact[0]
    parts = str(target).split(".")
    return parts[-2] if len(parts) >= 2 else None


def _seed_from_overrides(overrides: Iterable[str]) -> int | None:
    for item in overrides:
        key, _, value = str(item).partition("=")
        if key.lstrip("+~") == "seed" and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def identify(folder: Path, conf_dir: Path) -> tuple[str | None, str | None, int | None, str | None]:
    """(schema, reward, seed, reward _target_) of a job folder.

    Hydra's `.hydra/hydra.yaml` records the option chosen for each group (`runtime.choices`),
    exactly the names the sweep command used; it is written before the job runs, so a job that
    failed before saving `config.yaml` is still identified. `config.yaml` is the fallback.
    """
    schema = reward = target = None
    seed: int | None = None
    hydra_file = folder / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choices = ((_load_yaml(hydra_file) or {}).get("hydra", {}).get("runtime", {}) or {}).get("choices") or {}
        schema, reward = choices.get("schema"), choices.get("reward")
    for config_file in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if not config_file.is_file():
            continue
        config = _load_yaml(config_file) or {}
        schema = schema or name_from_node(config.get("schema"), "schema", conf_dir)
        reward = reward or name_from_node(config.get("reward"), "reward", conf_dir)
        if isinstance(config.get("reward"), dict):
            target = target or config["reward"].get("_target_")
        if seed is None and isinstance(config.get("seed"), int):
            seed = config["seed"]
    overrides_file = folder / ".hydra" / "overrides.yaml"
    if seed is None and overrides_file.is_file():
        seed = _seed_from_overrides(_load_yaml(overrides_file) or [])
    return schema, reward, seed, target


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(empty failure.txt)"


def read_run(folder: Path, conf_dir: Path) -> Run:
    schema, reward, seed, target = identify(folder, conf_dir)
    run = Run(folder, schema, reward, seed, status="incomplete", reward_target=target)
    results_file = folder / "results.json"
    if results_file.is_file():
        results = _load_json(results_file)
        run.rows = {name: row for name, row in (results.get("rows") or {}).items() if isinstance(row, dict)}
        run.grpo_seconds = _finite((results.get("seconds") or {}).get("final"))
        run.finished_at = results_file.stat().st_mtime
    history_file = folder / "grpo_history.json"
    if history_file.is_file():
        history = _load_json(history_file)
        if not isinstance(history, list):
            raise AggregationError(f"{history_file}: expected a list of per-step dicts, got {type(history).__name__}")
        run.history = [step for step in history if isinstance(step, dict)]
    diversity_file = folder / "diversity.json"
    if diversity_file.is_file():
        diversity = _load_json(diversity_file)
        run.diversity = {k: v for k, v in diversity.items() if isinstance(v, dict)} if isinstance(diversity, dict) else {}
    failure = folder / "failure.txt"
    if "grpo" in run.rows:
        run.status = "ok"
        if failure.is_file():  # resumed after a failure: the run finished, the old traceback stays
            run.detail = "completed after an earlier failure (failure.txt left from that attempt)"
    elif failure.is_file():
        run.status = "failed"
        run.detail = _last_line(failure.read_text(encoding="utf-8", errors="replace"))
    elif results_file.is_file():
        run.detail = "results.json has no grpo row (eval.after_grpo off?)"
    else:
        run.detail = "no results.json and no failure.txt: still running, or killed"
    return run


def select_runs(runs: Sequence[Run]) -> tuple[dict[RunKey, Run], list[Run]]:
    """One run per (schema, reward, seed): a completed one over a failed one over an unfinished
    one, and among equals the newest; the others are returned as superseded, to be listed."""
    rank = {"ok": 2, "failed": 1, "incomplete": 0}
    chosen: dict[RunKey, Run] = {}
    superseded: list[Run] = []
    for run in runs:
        if run.key is None:
            continue
        current = chosen.get(run.key)
        if current is None:
            chosen[run.key] = run
            continue
        better = (rank[run.status], run.finished_at) > (rank[current.status], current.finished_at)
        superseded.append(current if better else run)
        if better:
            chosen[run.key] = run
    return chosen, superseded


# ---------------------------------------------------------------- statistics


def _finite(value: Any) -> float | None:
    """A number, or None for null/NaN/inf/absent (results.json stores non-finite values as null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def mean_std(values: Iterable[Any]) -> Stat:
    finite = [v for v in (_finite(x) for x in values) if v is not None]
    if not finite:
        return Stat(None, None, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return Stat(statistics.fmean(finite), std, len(finite))


def history_mean(history: Sequence[dict[str, Any]], key: str) -> float | None:
    """A run's mean of `key` over its GRPO steps (steps that did not log it are skipped)."""
    values = [v for v in (_finite(step.get(key)) for step in history) if v is not None]
    return statistics.fmean(values) if values else None


def run_values(run: Run, row: str = "grpo") -> dict[str, float | None]:
    values = {key: _finite(run.rows.get(row, {}).get(key)) for key, _ in EVAL_METRICS}
    probe = run.diversity.get("final" if row == "grpo" else row, {})
    values.update({DIVERSITY_PREFIX + key: _finite(probe.get(key)) for key, _ in DIVERSITY_METRICS})
    if row == "grpo":
        values.update({key: history_mean(run.history, key) for key, _ in HISTORY_METRICS})
        values[FLOOR_KEY[1] + "_floor"] = _finite(run.rows.get(FLOOR_KEY[0], {}).get(FLOOR_KEY[1]))
        values["grpo_seconds"] = run.grpo_seconds
    return values


def _ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def aggregate(
    runs_dirs: Sequence[Path],
    schemas: Sequence[str] = EXPECTED_SCHEMAS,
    rewards: Sequence[str] = EXPECTED_REWARDS,
    seeds: Sequence[int] = EXPECTED_SEEDS,
    conf_dir: Path = ROOT / "conf",
) -> Aggregate:
    """Read every job under `runs_dirs` and summarise each (schema, reward) cell over its seeds."""
    runs = [read_run(folder, conf_dir) for runs_dir in runs_dirs for folder in find_job_folders(Path(runs_dir))]
    chosen, superseded = select_runs(runs)
    expected = [(s, r, seed) for s in schemas for r in rewards for seed in seeds]
    ok = {key: run for key, run in chosen.items() if run.status == "ok"}
    cell_names = {(s, r) for s, r, _ in expected} | {(s, r) for s, r, _ in ok}
    ordered_cells = [
        (s, r)
        for s in _ordered({s for s, _ in cell_names}, schemas)
        for r in _ordered({r for _, r in cell_names}, rewards)
        if (s, r) in cell_names
    ]
    cells = []
    for schema, reward in ordered_cells:
        members = sorted((key[2], run) for key, run in ok.items() if key[:2] == (schema, reward))
        per_run = [run_values(run) for _, run in members]
        stats = {key: mean_std(values[key] for values in per_run) for key in GRPO_VALUE_KEYS}
        starts = [run_values(run, "start") for _, run in members if "start" in run.rows]
        start_stats = {key: mean_std(v[key] for v in starts) for key in START_VALUE_KEYS} if starts else {}
        cells.append(CellSummary(schema, reward, [seed for seed, _ in members], stats, start_stats))
    return Aggregate(runs, chosen, superseded, cells, expected)


# ---------------------------------------------------------------- curves


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` steps, NaN-aware, partial windows at the start (so
    the curve starts at the first step instead of `window` steps in)."""
    array = np.asarray(values, dtype=float)
    out = np.full(array.shape, np.nan)
    for i in range(array.size):
        chunk = array[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


def seed_curves(runs: Sequence[Run], key: str, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds of the smoothed per-seed curves of `key`, aligned on the GRPO
    step; std is NaN where fewer than two seeds logged that step."""
    per_seed: list[dict[int, float]] = []
    for run in runs:
        curve: dict[int, float] = {}
        for index, step in enumerate(run.history):
            value = _finite(step.get(key))
            x = _finite(step.get("train/rollout_step"))
            curve[int(x) if x is not None else index + 1] = value if value is not None else math.nan
        if any(math.isfinite(v) for v in curve.values()):
            per_seed.append(curve)
    steps = np.array(sorted({s for curve in per_seed for s in curve}), dtype=int)
    if not per_seed:
        return steps, np.array([]), np.array([])
    table = np.array([smooth([curve.get(int(s), math.nan) for s in steps], window) for curve in per_seed])
    counts = np.isfinite(table).sum(axis=0)
    filled = np.where(np.isfinite(table), table, 0.0)
    mean = np.where(counts > 0, filled.sum(axis=0) / np.maximum(counts, 1), np.nan)
    squares = np.where(np.isfinite(table), (table - mean) ** 2, 0.0).sum(axis=0)
    std = np.where(counts > 1, np.sqrt(squares / np.maximum(counts - 1, 1)), np.nan)
    return steps, mean, std


def classification_key(run: Run) -> str | None:
    """The history key of the reward's decision component (`train/reward_cls` for AD-FM,
    `train/reward_accuracy` for binary): the one reward quantity on the same [0, 1] scale
    across reward functions."""
    name = None
    if run.reward_target:
        try:
            from hydra.utils import get_class

            name = getattr(get_class(run.reward_target), "classification_key", None)
        except Exception:  # an old or foreign _target_: fall back to the known component names
            name = None
    candidates = [name] if name else list(CLASSIFICATION_FALLBACK)
    for candidate in candidates:
        if any(f"train/reward_{candidate}" in step for step in run.history):
            return f"train/reward_{candidate}"
    return None


def plot_curves(result: Aggregate, out: Path, window: int) -> Path:
    """One column per reward function (their totals are on different scales), rows: total reward,
    its classification component, and the zero-std group fraction; one line per schema, the
    band is ± one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [run for run in result.chosen.values() if run.status == "ok"]
    rewards = _ordered({c.reward for c in result.cells}, EXPECTED_REWARDS)
    schemas = _ordered({c.schema for c in result.cells}, EXPECTED_SCHEMAS)
    colours = {schema: f"C{i}" for i, schema in enumerate(schemas)}
    panels = (
        ("total", "train/reward (total; scale differs per reward)"),
        ("cls", "classification component (0-1)"),
        ("train/zero_std_group_fraction", "zero-std group fraction"),
    )
    fig, axes = plt.subplots(
        len(panels), max(len(rewards), 1), figsize=(5 * max(len(rewards), 1), 3.2 * len(panels)),
        squeeze=False, sharex=True,
    )
    for column, reward in enumerate(rewards):
        for row, (panel, title) in enumerate(panels):
            ax = axes[row][column]
            drawn = False
            for schema in schemas:
                members = [run for run in ok if run.schema == schema and run.reward == reward]
                if not members:
                    continue
                if panel == "total":
                    key = "train/reward"
                elif panel == "cls":
                    key = classification_key(members[0])
                else:
                    key = panel
                if key is None:
                    continue
                steps, mean, std = seed_curves(members, key, window)
                if not mean.size:
                    continue
                label = f"{schema} (n={len(members)})"
                ax.plot(steps, mean, color=colours[schema], label=label)
                band = np.isfinite(std)
                if band.any():
                    ax.fill_between(steps, mean - np.where(band, std, 0), mean + np.where(band, std, 0),
                                    where=band, color=colours[schema], alpha=0.2, linewidth=0)
                drawn = True
            ax.set_title(f"reward={reward}: {title}", fontsize=9)
            if panel != "total":  # fractions: one fixed range, so columns compare at a glance
                ax.set_ylim(-0.02, 1.02)
            if row == len(panels) - 1:
                ax.set_xlabel("GRPO step")
            if drawn:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no completed run logged this", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Ablation reward curves: mean over seeds, ± 1 std band, {window}-step trailing average")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- markdown


def fmt_stat(stat: Stat, n_runs: int) -> str:
    if stat.mean is None:
        return "—"
    text = f"{stat.mean:.3f}" if stat.std is None else f"{stat.mean:.3f} ± {stat.std:.3f}"
    return text + (f" (n={stat.n})" if stat.n != n_runs else "")


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def sweep_command(runs_dir: Path) -> str:
    """The training command that produced a folder, rebuilt from Hydra's record of it."""
    multirun = runs_dir / "multirun.yaml"
    if multirun.is_file():
        task = (((_load_yaml(multirun) or {}).get("hydra") or {}).get("overrides") or {}).get("task") or []
        return "python -m anomaly_rl.train -m " + " ".join(shlex.quote(str(o)) for o in task)
    overrides = runs_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        items = _load_yaml(overrides) or []
        return "python -m anomaly_rl.train " + " ".join(shlex.quote(str(o)) for o in items)
    return "unknown (no multirun.yaml or .hydra/overrides.yaml)"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    return (
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )


def _cell_table(cells: Sequence[CellSummary], n_expected_seeds: int, start: bool = False) -> list[str]:
    columns = [title for _, title in EVAL_METRICS]
    if not start:
        columns += [title for _, title in HISTORY_METRICS]
    columns += [title for _, title in DIVERSITY_METRICS]
    if not start:
        columns += ["median-box mIoU (floor)", "GRPO s"]
    lines = ["| schema | reward | seeds | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for cell in cells:
        stats = cell.start_stats if start else cell.stats
        if start and not stats:
            continue
        keys = list(START_VALUE_KEYS) if start else list(GRPO_VALUE_KEYS)
        n = len(cell.seeds)
        seeds = f"{n}/{n_expected_seeds}" + (f" ({', '.join(map(str, cell.seeds))})" if n and n != n_expected_seeds else "")
        values = []
        for key in keys:
            stat = stats.get(key, Stat(None, None, 0))
            values.append(f"{stat.mean:.0f}" if key == "grpo_seconds" and stat.mean is not None else fmt_stat(stat, n))
        lines.append(f"| {cell.schema} | {cell.reward} | {seeds} | " + " | ".join(values) + " |")
    return lines


def gaps(result: Aggregate) -> list[str]:
    """Every expected (schema, reward, seed) without a completed run, by name (the seeds of a
    cell with no job folder at all on one line)."""
    lines = []
    absent: dict[Cell, list[int]] = {}
    for schema, reward, seed in result.expected:
        if (schema, reward, seed) not in result.chosen:
            absent.setdefault((schema, reward), []).append(seed)
    listed: set[Cell] = set()
    for key in result.expected:
        run = result.chosen.get(key)
        schema, reward, seed = key
        where = f"{schema} / {reward}, seed {seed}"
        if run is None:
            if (schema, reward) not in listed:
                listed.add((schema, reward))
                seeds = absent[(schema, reward)]
                label = "seed" if len(seeds) == 1 else "seeds"
                lines.append(
                    f"- {schema} / {reward}, {label} {', '.join(map(str, seeds))}: **missing** — no job folder found"
                )
        elif run.status == "failed":
            lines.append(f"- {where}: **failed** — `{run.detail}` (`{_relative(run.folder / 'failure.txt')}`)")
        elif run.status != "ok":
            lines.append(f"- {where}: **incomplete** — {run.detail} (`{_relative(run.folder)}`)")
    return lines


def render_markdown(result: Aggregate, runs_dirs: Sequence[Path], command: str, plot_name: str, window: int) -> str:
    n_seeds = len({seed for _, _, seed in result.expected})
    statuses = [result.chosen.get(key) for key in result.expected]
    completed = sum(1 for run in statuses if run is not None and run.status == "ok")
    failed = sum(1 for run in statuses if run is not None and run.status == "failed")
    incomplete = sum(1 for run in statuses if run is not None and run.status == "incomplete")
    missing = sum(1 for run in statuses if run is None)
    n_schemas = len({s for s, _, _ in result.expected})
    n_rewards = len({r for _, r, _ in result.expected})
    lines = [
        "# Ablation: response schema x reward function (synthetic benchmark, tiny model)",
        "",
        "Generated by `experiments/ablation/aggregate.py`; a rerun rewrites everything here except the",
        "notes block. How to run and what is compared: `experiments/ablation/README.md`.",
        "",
        f"- Aggregated with: `{command}`",
    ]
    for runs_dir in runs_dirs:
        lines.append(f"- Runs in `{_relative(runs_dir)}`: `{sweep_command(Path(runs_dir))}`")
    lines += [
        f"- Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; machine (of the aggregation): {machine()}",
        f"- Repository commit (at aggregation): {git_commit()}",
        f"- Expected runs: {len(result.expected)} ({n_schemas} schemas x {n_rewards} rewards x {n_seeds} seeds); "
        f"completed {completed}, failed {failed}, incomplete {incomplete}, missing {missing}.",
        "",
        "## Notes",
        "",
        NOTES_OPEN,
        NOTES_PLACEHOLDER,
        NOTES_CLOSE,
        "",
        "## After GRPO (test split)",
        "",
        "Mean ± sample standard deviation (n − 1) over the seeds that completed; `(n=k)` marks a value",
        "from fewer of them (the metric was NaN or absent in the others, listed below). `zero-std",
        "groups`: the fraction of a step's prompt groups whose G rewards were all equal (no GRPO",
        "signal), averaged over the run's steps — on the total reward and on its classification",
        "component. `distinct answers / group` and the `(probe)` fractions: G answers sampled per prompt",
        "from the trained policy (the before-GRPO table: from the start) on the same training prompts with",
        "a fixed seed (`experiments/adapt/group_diversity.py`; `—` where it was not run): distinct",
        "(answer, boxes) pairs per group, and the share of groups whose total / classification reward",
        "has zero variance. `median-box mIoU (floor)`: always predicting the training set's median box.",
        "`GRPO s`: wall time of the GRPO phase.",
        "",
        *_cell_table(result.cells, n_seeds),
        "",
    ]
    if any(cell.start_stats for cell in result.cells):
        lines += ["## Before GRPO (the start, test split)", "", *_cell_table(result.cells, n_seeds, start=True), ""]
    lines += ["## Missing or failed runs", ""]
    missing_lines = gaps(result)
    lines += missing_lines or [f"None: all {len(result.expected)} expected runs completed."]
    lines.append("")
    holes = []
    for key in result.expected:
        run = result.chosen.get(key)
        if run is None or run.status != "ok":
            continue
        absent = [title for name, title in (*EVAL_METRICS, *HISTORY_METRICS) if run_values(run).get(name) is None]
        if absent:
            holes.append(f"- {key[0]} / {key[1]}, seed {key[2]}: no finite value for {', '.join(absent)}")
    if holes:
        lines += ["Metrics missing (NaN or not logged) inside completed runs:", "", *holes, ""]
    expected = set(result.expected)
    extra = [run for key, run in sorted(result.chosen.items()) if key not in expected]
    if extra:
        lines += ["Runs outside the expected grid (included in the table when completed):", ""]
        lines += [f"- {r.schema} / {r.reward}, seed {r.seed}: {r.status} (`{_relative(r.folder)}`)" for r in extra]
        lines.append("")
    if result.superseded:
        lines += ["Superseded duplicates (another run of the same cell and seed was used):", ""]
        lines += [f"- {r.schema} / {r.reward}, seed {r.seed}: {r.status} (`{_relative(r.folder)}`)" for r in result.superseded]
        lines.append("")
    unknown = [run for run in result.runs if run.key is None]
    if unknown:
        lines += ["Job folders whose schema, reward or seed could not be read (not counted):", ""]
        lines += [f"- `{_relative(r.folder)}`: {r.status} {r.detail}".rstrip() for r in unknown]
        lines.append("")
    lines += [
        "## Reward curves",
        "",
        f"![reward curves]({plot_name})",
        "",
        f"Mean over seeds of the {window}-step trailing average, band ± 1 std; one column per reward",
        "function (their totals have different ranges), rows: total reward, its classification",
        "component (`reward_cls` for adfm, `reward_accuracy` for binary), zero-std group fraction.",
        "",
        "## Per run",
        "",
        "| schema | reward | seed | status | balanced acc. | mean IoU | zero-std groups | folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, run in sorted(result.chosen.items()):
        values = run_values(run)

        def cell(name: str, values: dict[str, float | None] = values) -> str:
            return "—" if values.get(name) is None else f"{values[name]:.3f}"

        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {run.status} | {cell('image_BalancedAccuracy')} | "
            f"{cell('box_mIoU')} | {cell('train/zero_std_group_fraction')} | `{_relative(run.folder)}` |"
        )
    return "\n".join(lines) + "\n"


def merge_notes(new_text: str, old_text: str | None) -> str:
    """Carry the notes block of the previous RESULTS.md into the new one."""
    if not old_text or NOTES_OPEN not in old_text or NOTES_CLOSE not in old_text:
        return new_text
    start = old_text.index(NOTES_OPEN)
    end = old_text.index(NOTES_CLOSE, start) + len(NOTES_CLOSE)
    new_start = new_text.index(NOTES_OPEN)
    new_end = new_text.index(NOTES_CLOSE, new_start) + len(NOTES_CLOSE)
    return new_text[:new_start] + old_text[start:end] + new_text[new_end:]


def write_results(text: str, path: Path) -> Path:
    """Write RESULTS.md keeping the notes; a previous file without the markers (hand-written, or
    the markers deleted) is kept as RESULTS.md.bak rather than lost."""
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if old is not None and (NOTES_OPEN not in old or NOTES_CLOSE not in old):
        backup = path.with_suffix(path.suffix + ".bak")
        backup.write_text(old, encoding="utf-8")
        print(f"warning: {path} had no notes markers; the previous file is kept as {backup}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(merge_notes(text, old), encoding="utf-8")
    return path


# ---------------------------------------------------------------- entry point


def newest_multirun(base: Path) -> Path:
    candidates = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not candidates:
        raise AggregationError(f"no multirun folder under {base}: run `make sweep` first, or pass --runs DIR")
    return candidates[-1]  # names are %Y-%m-%d_%H-%M-%S: lexical order is time order


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, action="append", default=None,
                        help="a multirun or job folder; repeat to merge (default: the newest under --base)")
    parser.add_argument("--all", action="store_true", help="merge every multirun folder under --base")
    parser.add_argument("--base", type=Path, default=DEFAULT_MULTIRUNS, help="where the sweep's multiruns are")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--schemas", nargs="+", default=list(EXPECTED_SCHEMAS))
    parser.add_argument("--rewards", nargs="+", default=list(EXPECTED_REWARDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(EXPECTED_SEEDS))
    parser.add_argument("--smooth", type=int, default=10, help="trailing-average window of the curves, in steps")
    parser.add_argument("--conf-dir", type=Path, default=ROOT / "conf", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.runs and args.all:
            raise AggregationError("give --runs or --all, not both")
        if args.all:
            runs_dirs = sorted(p for p in args.base.iterdir() if p.is_dir()) if args.base.is_dir() else []
            if not runs_dirs:
                raise AggregationError(f"--all: no multirun folder under {args.base}")
        else:
            runs_dirs = args.runs or [newest_multirun(args.base)]
        result = aggregate(runs_dirs, args.schemas, args.rewards, args.seeds, args.conf_dir)
        if not result.runs:
            raise AggregationError(f"no job folders in {', '.join(map(str, runs_dirs))}")
        shown = list(sys.argv[1:] if argv is None else argv)
        command = "python experiments/ablation/aggregate.py" + "".join(f" {shlex.quote(a)}" for a in shown)
        plot = plot_curves(result, args.out_dir / "reward_curves.png", args.smooth)
        text = render_markdown(result, runs_dirs, command, plot.name, args.smooth)
        path = write_results(text, args.out_dir / "RESULTS.md")
    except AggregationError as error:
        print(f"aggregate.py: {error}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    print(f"wrote {path} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
