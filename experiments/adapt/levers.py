"""The levers of issue 14, each run: which of them moves GRPO's gap to SFT on the unseen look?

    .venv/bin/python experiments/adapt/levers.py --benchmark logs/adapt/runs/<time>      # all levers, seed 0
    .venv/bin/python experiments/adapt/levers.py --levers recipe beta_0 --seeds 0 1 --benchmark DIR
    .venv/bin/python experiments/adapt/levers.py --aggregate logs/adapt/levers/<time> --benchmark DIR
    .venv/bin/python experiments/adapt/levers.py --levers beta_0 --out-dir /tmp/one_lever ...   # leaves LEVERS.md alone

Every lever is one `python -m anomaly_rl.train +experiment=adapt` run at k = 16 (the benchmark's
setting: base = the committed warm start, new look = screw), GRPO only (`control.enabled=false`),
with the lever's overrides on top of the benchmark's GRPO recipe. Each is compared, on the same seed
(same k-shot draw, same test split), with the SFT arm of a `make adapt` folder (`--benchmark`):
the gap is GRPO − SFT on the screw test split. Beside the metrics: the classification reward and the
fraction of groups whose classification reward has zero variance (no decision signal), first and last
10 steps. Two jobs at a time, one thread each, as run_adapt.py. Writes experiments/adapt/LEVERS.md
(a notes block survives reruns) and levers.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from aggregate import (  # noqa: E402  (the scripts of this folder are not a package)
    NOTES_CLOSE,
    NOTES_OPEN,
    Stat,
    _finite,
    _json,
    _relative,
    edge_mean,
    fmt,
    git_commit,
    history_values,
    mean_std,
    merge_notes,
    read_run,
)
from run_adapt import COMMON, PY, ROOT, Job, load_lrs, prepare_data, run_all  # noqa: E402

K = 16
# name -> (overrides on top of the benchmark's GRPO recipe, what the lever tests)
LEVERS: dict[str, tuple[list[str], str]] = {
    "recipe": ([], "the benchmark's GRPO arm (G 6, T 0.9, beta 0.04, lr 5e-5, 60 steps)"),
    "group_12_temp_1.5": (["algo.group_size=12", "algo.temperature=1.5"], "diversity: twice the group, hotter sampling"),
    "beta_0": (["algo.beta=0"], "no KL pull towards the base"),
    "dynamic_sampling": (["algo.dynamic_sampling.enabled=true"],
                         "drop groups with a flat classification reward, sample more (3 rounds)"),
    "loc_iou": (["reward.loc_overlap=iou"], "R_loc on plain IoU: no GIoU enclosing-box term"),
    "longer_180": (["algo.max_steps=180"], "three times the steps"),
    "lr_2e-4": (["algo.optimizer.lr=2e-4"], "four times the learning rate"),
    "batch_baseline": (["algo.advantage_baseline=batch", "algo.scale_rewards=batch"],
                       "advantages centred on the batch mean: a flat group still learns"),
    "batch_baseline_vision": (["algo.advantage_baseline=batch", "algo.scale_rewards=batch", "algo.train_vision=true"],
                              "the batch baseline with the vision tower trained too"),
    "sft_10_then_grpo": ([], "a start that samples both answers: 10 SFT steps on the k-shot images (lr from "
                             "sft_lr.json) before the recipe's GRPO"),
}
# Levers whose GRPO run starts from a short SFT run of its own (steps), written beside it as <lever>_s<seed>_sft.
PRE_SFT_STEPS = {"sft_10_then_grpo": 10}
METRICS = (("image_BalancedAccuracy", "bal. acc."), ("image_AUROC", "AUROC"), ("box_mIoU", "mean IoU"),
           ("box_AP50", "AP50"), ("schema_valid_rate", "schema-valid"))
NOTES_PLACEHOLDER = "_Placeholder: what the lever runs show, written after them; kept across reruns._"


def lever_command(lever: str, seed: int, out: Path, extra: list[str]) -> list[str]:
    overrides, _ = LEVERS[lever]
    # The start is evaluated only where it is not the base (the recipe's start row is the base on this split,
    # the same for every lever); a lever with its own short SFT start evaluates that start.
    before = [] if lever == "recipe" or lever in PRE_SFT_STEPS else ["eval.before_grpo=false"]
    start = [f"init_from={out / f'{lever}_s{seed}_sft'}"] if lever in PRE_SFT_STEPS else []
    return [PY, "-m", "anomaly_rl.train", "+experiment=adapt", f"data.shots={K}", f"seed={seed}",
            "warm_start.batch_size=16", "algo.prompts_per_step=8", "control.enabled=false", *COMMON, *before,
            *overrides, *start, f"hydra.run.dir={out / f'{lever}_s{seed}'}", *extra]


def lever_commands(lever: str, seed: int, out: Path, extra: list[str]) -> list[list[str]]:
    """The lever's GRPO run, after its short SFT run where it has one (the SFT control's lr, no evaluation)."""
    grpo = lever_command(lever, seed, out, extra)
    if lever not in PRE_SFT_STEPS:
        return [grpo]
    sft = [PY, "-m", "anomaly_rl.train", "+experiment=adapt_sft", f"data.shots={K}", f"seed={seed}",
           "warm_start.batch_size=16", f"warm_start.optimizer.lr={load_lrs()[str(K)]}",
           f"warm_start.max_steps={PRE_SFT_STEPS[lever]}", "eval.enabled=false", *COMMON,
           f"hydra.run.dir={out / f'{lever}_s{seed}_sft'}"]
    return [sft, grpo]


def read_lever(folder: Path) -> dict[str, Any] | None:
    results = folder / "results.json"
    if not results.is_file():
        return None
    data = _json(results)
    history_path = folder / "grpo_history.json"
    history = [s for s in _json(history_path) if isinstance(s, dict)] if history_path.is_file() else []
    seconds = _finite((data.get("seconds") or {}).get("final"))
    row = (data.get("rows") or {}).get("grpo") or {}
    probe_path = folder / "diversity.json"  # experiments/adapt/group_diversity.py, when it was run
    probe = _json(probe_path) if probe_path.is_file() else {}
    return {"metrics": {key: _finite(row.get(key)) for key, _ in METRICS}, "seconds": seconds, "probe": probe,
            "steps": len(history), "start": (data.get("rows") or {}).get("start"),
            "curves": {key: (edge_mean(history_values(history, key), end=False),
                             edge_mean(history_values(history, key), end=True))
                       for key in ("train/reward_cls", "train/reward_loc", "train/zero_std_group_fraction_cls",
                                   "train/zero_std_group_fraction")}}


def sft_reference(benchmark: Path | None, seed: int) -> dict[str, Any] | None:
    """The SFT arm and the start of the benchmark's run with the same k and seed (same images, same test split)."""
    if benchmark is None or not (benchmark / f"k{K}_s{seed}").is_dir():
        return None
    run = read_run(benchmark / f"k{K}_s{seed}", None)
    return {"sft": run.new.get("sft_control"), "start": run.new.get("start"), "grpo": run.new.get("grpo")}


def collect(out: Path, benchmark: Path | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for lever in LEVERS:
        for folder in sorted(out.glob(f"{lever}_s*")):
            seed_text = folder.name[len(lever) + 2:]
            if not seed_text.isdigit() or (result := read_lever(folder)) is None:
                continue
            seed = int(seed_text)
            result["reference"] = sft_reference(benchmark, seed)
            found.setdefault(lever, {})[str(seed)] = result
    return found


def _pair(results: dict[str, Any], key: str) -> Stat:
    diffs = []
    for result in results.values():
        sft = (result.get("reference") or {}).get("sft") or {}
        grpo, control = result["metrics"].get(key), _finite(sft.get(key))
        if grpo is not None and control is not None:
            diffs.append(grpo - control)
    return mean_std(diffs)


def _edges(results: dict[str, Any], key: str) -> str:
    first = mean_std(r["curves"][key][0] for r in results.values())
    last = mean_std(r["curves"][key][1] for r in results.values())
    if first.mean is None or last.mean is None:
        return "—"
    return f"{first.mean:.2f} → {last.mean:.2f}"


def _probe(results: dict[str, Any], key: str) -> str:
    """start → final of a group-diversity probe value, mean over the seeds probed."""
    first = mean_std((r.get("probe") or {}).get("start", {}).get(key) for r in results.values())
    last = mean_std((r.get("probe") or {}).get("final", {}).get(key) for r in results.values())
    if first.mean is None or last.mean is None:
        return "—"
    return f"{first.mean:.2f} → {last.mean:.2f}"


def render(found: dict[str, Any], out: Path, benchmark: Path | None, command: str) -> str:
    lines = [
        "# The levers, run: what moves GRPO's gap to SFT on the unseen look",
        "",
        "Generated by `experiments/adapt/levers.py`; a rerun rewrites everything here except the notes block.",
        "",
        f"- Command: `{command}`",
        f"- Runs: `{_relative(out)}`; SFT reference (same seed, same k-shot images, same wall time as the "
        f"benchmark's GRPO run): `{'—' if benchmark is None else _relative(benchmark)}`",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: {platform.platform()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; commit {git_commit()}",
        f"- Setting: k = {K} normal + {K} defective screw images, from the committed warm start; each lever is "
        "the benchmark's GRPO recipe plus the overrides shown.",
        "",
        "## Notes",
        "",
        NOTES_OPEN,
        NOTES_PLACEHOLDER,
        NOTES_CLOSE,
        "",
        "## Screw test split after GRPO (mean ± std over the seeds run; gap = GRPO − SFT, paired by seed)",
        "",
        "| lever | overrides | seeds | " + " | ".join(label for _, label in METRICS)
        + " | gap bal. acc. | gap mean IoU | R_cls first→last 10 | zero-std cls groups first→last 10 "
          "| zero-std groups first→last 10 | normal images: groups with a \"normal\" answer (probe) "
          "| normal images: \"normal\" answers (probe) | steps | GRPO s |",
        "|---|---|---|" + "---|" * len(METRICS) + "---|---|---|---|---|---|---|---|---|",
    ]
    for lever, results in found.items():
        overrides = " ".join(f"`{o}`" for o in LEVERS[lever][0]) or "—"
        cells = [fmt(mean_std(r["metrics"][key] for r in results.values())) for key, _ in METRICS]
        lines.append(
            f"| {lever} | {overrides} | {', '.join(sorted(results))} | " + " | ".join(cells)
            + f" | {fmt(_pair(results, 'image_BalancedAccuracy'), signed=True)}"
            + f" | {fmt(_pair(results, 'box_mIoU'), signed=True)}"
            + f" | {_edges(results, 'train/reward_cls')} | {_edges(results, 'train/zero_std_group_fraction_cls')}"
            + f" | {_edges(results, 'train/zero_std_group_fraction')}"
            + f" | {_probe(results, 'normal_groups_with_a_normal_answer')}"
            + f" | {_probe(results, 'normal_answer_rate_on_normal')}"
            + f" | {fmt(mean_std(r['steps'] for r in results.values()))}"
            + f" | {fmt(mean_std(r['seconds'] for r in results.values()))} |")
    own_starts = {lever: results for lever, results in found.items()
                  if lever in PRE_SFT_STEPS and any(r.get("start") for r in results.values())}
    if own_starts:
        lines += ["", "## Levers with a start of their own: that start, before GRPO (same split)", "",
                  "| lever | seeds | " + " | ".join(label for _, label in METRICS) + " | gap bal. acc. | gap mean IoU |",
                  "|---|---|" + "---|" * len(METRICS) + "---|---|"]
        for lever, results in own_starts.items():
            starts = {seed: {"metrics": {key: _finite((r.get("start") or {}).get(key)) for key, _ in METRICS},
                             "reference": r.get("reference")} for seed, r in results.items() if r.get("start")}
            cells = [fmt(mean_std(r["metrics"][key] for r in starts.values())) for key, _ in METRICS]
            lines.append(f"| {lever}: start | {', '.join(sorted(starts))} | " + " | ".join(cells)
                         + f" | {fmt(_pair(starts, 'image_BalancedAccuracy'), signed=True)}"
                         + f" | {fmt(_pair(starts, 'box_mIoU'), signed=True)} |")
    references = {}
    for results in found.values():
        for seed, result in results.items():
            if result.get("reference"):
                references[seed] = result["reference"]
    if references:
        lines += ["", "## The reference arms of the benchmark (same seeds)", "",
                  "| seed | arm | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for seed in sorted(references):
            for arm, label in (("start", "no adaptation"), ("sft", "SFT, same wall time"), ("grpo", "GRPO (benchmark)")):
                row = references[seed].get(arm) or {}
                lines.append(f"| {seed} | {label} | " + " | ".join(
                    "—" if _finite(row.get(key)) is None else f"{row[key]:.3f}" for key, _ in METRICS) + " |")
    lines += ["", "The probe columns (`experiments/adapt/group_diversity.py --runs <lever folder>`): G answers "
              "sampled with the lever's own group size and temperature on the first 32 training images, from "
              "the start (the base) and from the trained policy, fixed seed; on the normal ones, the share of "
              "groups holding at least one \"normal\" answer (the only groups whose classification advantage "
              "points towards \"normal\") and the share of answers that say \"normal\".",
              "", "## What each lever tests", ""]
    lines += [f"- **{lever}**: {why}" for lever, (_, why) in LEVERS.items() if lever in found]
    return "\n".join(lines) + "\n"


def write(out: Path, benchmark: Path | None, command: str, out_dir: Path = HERE) -> Path:
    found = collect(out, benchmark)
    if not found:
        raise SystemExit(f"{out}: no finished lever run (a <lever>_s<seed>/results.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "LEVERS.md"
    text = render(found, out, benchmark, command)
    target.write_text(merge_notes(text, target.read_text() if target.is_file() else None))
    (out_dir / "levers.json").write_text(json.dumps(found, indent=2, default=str) + "\n")
    print(f"wrote {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default logs/adapt/levers/<time>)")
    parser.add_argument("--benchmark", type=Path, default=None,
                        help="a `make adapt` folder: its SFT arm of the same seed is the reference")
    parser.add_argument("--aggregate", type=Path, default=None, help="only rewrite LEVERS.md from this folder")
    parser.add_argument("--out-dir", type=Path, default=HERE,
                        help="where LEVERS.md and levers.json go (the table is rebuilt from --out alone: give a "
                             "scratch folder for a one-off lever run, so the committed table is not replaced)")
    args, extra = parser.parse_known_args()
    benchmark = args.benchmark.resolve() if args.benchmark else None
    if benchmark is not None and not benchmark.is_dir():
        raise SystemExit(f"--benchmark {benchmark}: no such folder")
    command = shlex.join([".venv/bin/python", "experiments/adapt/levers.py", *sys.argv[1:]])
    if args.aggregate:
        write(args.aggregate.resolve(), benchmark, command, args.out_dir)
        return
    out = (args.out or ROOT / "logs" / "adapt" / "levers" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command + "\n")
    prepare_data()
    # The longest runs first, so that the two slots finish together.
    order = sorted(((lever, seed) for lever in args.levers for seed in args.seeds),
                   key=lambda item: -int(item[0] in ("longer_180", "group_12_temp_1.5", "dynamic_sampling")))
    jobs = [Job(f"{lever} seed={seed}", lever_commands(lever, seed, out, extra), out / f"{lever}_s{seed}.log")
            for lever, seed in order]
    failed = run_all(jobs, args.parallel)
    write(out, benchmark, command, args.out_dir)
    if failed:
        raise SystemExit(f"failed lever runs: {failed}")


if __name__ == "__main__":
    main()
