"""The adaptation benchmark: adapt a base trained on old looks to the unseen `screw` look from k shots.

    .venv/bin/python experiments/adapt/run_adapt.py                 # the benchmark (`make adapt`)
    .venv/bin/python experiments/adapt/run_adapt.py --pick-lr       # choose the SFT control's lr on val
    .venv/bin/python experiments/adapt/run_adapt.py --budgets 16 --seeds 0 1 [Hydra overrides...]

The benchmark runs, for every budget k (k normal + k defective screw images) and seed, one
`python -m anomaly_rl.train +experiment=adapt` run — no adaptation (the `start` row), GRPO with the
AD-FM schema and reward, then the SFT control for the same wall time from the same base on the same
images at the learning rate in experiments/adapt/sft_lr.json — all three on the screw test split;
then `python -m anomaly_rl.evaluate` of the GRPO and SFT weights (and once of the base) on the old
looks' test split (forgetting). Two jobs at a time, one thread each (ADAPT_THREADS sets the threads).
Finally experiments/adapt/aggregate.py writes RESULTS.md and the curves.

`--pick-lr` runs SFT from the base on the k-shot images of seed 0 at each of `--lrs` for `--lr-steps`
steps, scores each on the screw *val* split (balanced accuracy + mean IoU) and writes the winner
per budget to experiments/adapt/sft_lr.json. The test split is never looked at.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LR_FILE = Path(os.environ.get("ADAPT_LR_FILE", HERE / "sft_lr.json"))  # env: a scratch file for smoke tests
BASE = "experiments/warm_start/tiny_sft"  # the base: SFT on metal, fabric, pill (never screw)
PY = sys.executable
COMMON = ["logger=csv", "callbacks=none"]


def batch_overrides(k: int, prefix: str) -> list[str]:
    """k=4 gives 8 training images: every batch must fit in the training split."""
    return [f"{prefix}.batch_size={min(16, 2 * k)}"]


def prepare_data() -> None:
    """Generate the screw data (and the old looks') once, before parallel jobs could race to write it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from anomaly_rl.data.synthetic import ensure_synthetic

    for config, overrides in (("train", ["+experiment=adapt"]), ("eval", [])):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config, overrides=[*overrides, f"paths.root_dir={ROOT}"])
        data = OmegaConf.to_container(cfg.data, resolve=True)
        root = Path(data["root"])
        ensure_synthetic(root if root.is_absolute() else ROOT / root, data["synthetic"], progress=False)


def run_job(commands: list[list[str]], log: Path, threads: int) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    with log.open("a") as out:
        for command in commands:
            out.write("$ " + shlex.join(command) + "\n")
            out.flush()
            status = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
            if status != 0:
                out.write(f"exit {status}\n")
                return status
    return 0


@dataclass
class Job:
    """Commands run one after another; `commands` may be a callable, built when the job starts (when
    what it needs — a picked learning rate, GRPO's wall time — exists); `ready` says when it may."""

    name: str
    commands: list[list[str]] | Callable[[], list[list[str]]]
    log: Path
    ready: Callable[[], bool] = lambda: True
    after: tuple[str, ...] = ()  # names of jobs that must have finished (any status) first


def run_all(jobs: list[Job], parallel: int) -> list[str]:
    """At most `parallel` jobs at once, in list order among those ready; returns the failed names."""
    # One thread per process: on 2 cores, two processes of 2 threads each slow each other ~10x.
    threads = int(os.environ.get("ADAPT_THREADS", "1"))
    failed: list[str] = []
    finished: set[str] = set()
    pending = list(jobs)
    with futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        running: dict[futures.Future, Job] = {}
        while pending or running:
            for job in list(pending):
                if len(running) >= parallel:
                    break
                if set(job.after) <= finished and job.ready():
                    pending.remove(job)
                    try:
                        commands = job.commands() if callable(job.commands) else job.commands
                    except (OSError, KeyError, ValueError, SystemExit) as error:
                        print(f"[{time.strftime('%H:%M:%S')}] {job.name}: cannot start ({error})", flush=True)
                        failed.append(job.name)
                        finished.add(job.name)
                        continue
                    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: started", flush=True)
                    running[pool.submit(run_job, commands, job.log, threads)] = job
            if not running:
                if pending:  # nothing runs and nothing can start: a dependency never appeared
                    for job in pending:
                        print(f"[{time.strftime('%H:%M:%S')}] {job.name}: never ready", flush=True)
                    failed += [job.name for job in pending]
                break
            done, _ = futures.wait(running, timeout=10, return_when=futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                status = future.result()
                print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {'ok' if status == 0 else f'FAILED ({status})'}",
                      flush=True)
                finished.add(job.name)
                if status:
                    failed.append(job.name)
    return failed


def load_lrs() -> dict[str, float]:
    if not LR_FILE.is_file():
        raise SystemExit(f"{LR_FILE} is missing: run `run_adapt.py --pick-lr` first (or pass control.lr=...)")
    return {k: float(v["lr"]) for k, v in json.loads(LR_FILE.read_text())["budgets"].items()}


def _grpo_seconds(run: Path) -> float | None:
    path = run / "results.json"
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get("seconds") or {}).get("final")


def benchmark_jobs(out: Path, budgets: list[int], seeds: list[int], extra: list[str], separate_sft: bool,
                   after: tuple[str, ...] = ()) -> list[Job]:
    """One job per (k, seed): the train run (start, GRPO, and the SFT control in the same process),
    then the old-look evaluations. With `separate_sft` the SFT arm is a job of its own: SFT from the
    base for the GRPO run's measured wall time (+experiment=adapt_sft on the test split), started
    once that run has finished — the form used when the learning rate is picked in the same call."""
    fixed_lr = next((e.split("=", 1)[1] for e in extra if e.startswith("control.lr=")), None)
    evals = [e for e in extra if e.startswith("eval.")]  # e.g. eval.limit=16 for a smoke test
    train_extra = [e for e in extra if not e.startswith("control.lr=")]

    def lr_of(k: int) -> str:
        return fixed_lr if fixed_lr is not None else str(load_lrs()[str(k)])

    def old_eval(weights: Path, name: Path) -> list[str]:
        return [PY, "-m", "anomaly_rl.evaluate", f"ckpt={weights}", f"hydra.run.dir={name}", *evals]

    jobs = [Job("base (old looks)", [old_eval(Path(BASE), out / "base" / "old_start")], out / "base" / "job.log")]
    grpo_jobs, sft_jobs = [], []
    for k in budgets:
        for seed in seeds:
            run = out / f"k{k}_s{seed}"
            common = [f"data.shots={k}", f"seed={seed}", *batch_overrides(k, "warm_start"), *COMMON]
            if not separate_sft:
                def commands(run: Path = run, k: int = k, common: list[str] = common) -> list[list[str]]:
                    train = [PY, "-m", "anomaly_rl.train", "+experiment=adapt", *common,
                             f"algo.prompts_per_step={min(8, 2 * k)}", f"control.lr={lr_of(k)}",
                             f"hydra.run.dir={run}", *train_extra]
                    return [train, old_eval(run / "final", run / "old_grpo"),
                            old_eval(run / "control", run / "old_sft_control")]

                grpo_jobs.append(Job(f"k={k} seed={seed}", commands, run / "job.log", after=after))
                continue
            train = [PY, "-m", "anomaly_rl.train", "+experiment=adapt", *common, f"algo.prompts_per_step={min(8, 2 * k)}",
                     "control.enabled=false", f"hydra.run.dir={run}", *train_extra]
            grpo_jobs.append(Job(f"k={k} seed={seed} GRPO", [train, old_eval(run / "final", run / "old_grpo")],
                                 run / "job.log"))

            def sft_commands(run: Path = run, k: int = k, common: list[str] = common) -> list[list[str]]:
                minutes = float(_grpo_seconds(run)) / 60.0
                train = [PY, "-m", "anomaly_rl.train", "+experiment=adapt_sft", *common, "eval.split=test",
                         f"warm_start.optimizer.lr={lr_of(k)}", "warm_start.max_steps=1000000",
                         f"warm_start.max_minutes={minutes:.4f}", f"hydra.run.dir={run / 'sft_arm'}",
                         *[e for e in train_extra if e.startswith(("eval.", "data."))]]
                return [train, old_eval(run / "sft_arm", run / "old_sft_control")]

            sft_jobs.append(Job(f"k={k} seed={seed} SFT", sft_commands, run / "sft_job.log",
                                ready=lambda run=run: _grpo_seconds(run) is not None,
                                after=(*after, f"k={k} seed={seed} GRPO")))
    # GRPO runs first (each SFT arm waits for its GRPO run's wall time), then SFT arms as they become ready.
    if separate_sft:
        ordered: list[Job] = []
        for i, job in enumerate(grpo_jobs):
            ordered.append(job)
            if i >= 1:
                ordered.append(sft_jobs[i - 1])
        ordered += sft_jobs[max(0, len(grpo_jobs) - 1):]
        return jobs + ordered
    return jobs + grpo_jobs


def repair_jobs(out: Path, extra: list[str]) -> list[Job]:
    """What is missing in an existing benchmark folder (`--repair`), and only that: a GRPO run or an
    SFT arm that did not finish (killed, or failed while the code was being edited) is run again from
    the start — its old folder is kept beside it as `<name>.failed-<time>` — and a missing old-look
    evaluation is run again. (A resume would reload the config saved by older code.)"""
    evals = [e for e in extra if e.startswith("eval.")]
    stamp = time.strftime("%H-%M-%S")

    def old_eval(weights: Path, target: Path) -> Job:
        command = [PY, "-m", "anomaly_rl.evaluate", f"ckpt={weights}", f"hydra.run.dir={target}", *evals]
        return Job(f"repair {target.relative_to(out)}", [command], target.parent / "repair.log")

    def has_weights(folder: Path) -> bool:
        return folder.is_dir() and any(folder.glob("weights.pt"))

    jobs = []
    if not (out / "base" / "old_start" / "metrics.json").is_file():
        jobs.append(old_eval(Path(BASE), out / "base" / "old_start"))
    for run in sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"k\d+_s\d+", p.name)):
        k, seed = (int(x) for x in re.fullmatch(r"k(\d+)_s(\d+)", run.name).groups())
        separate = not (run / "results.json").is_file() or "sft_control" not in json.loads(
            (run / "results.json").read_text()).get("rows", {})
        fresh = {job.name: job for job in benchmark_jobs(out, [k], [seed], extra, separate_sft=True)}
        if not (run / "results.json").is_file():
            if run.exists():
                run.rename(run.with_name(f"{run.name}.failed-{stamp}"))
            jobs += [fresh[f"k={k} seed={seed} GRPO"], fresh[f"k={k} seed={seed} SFT"]]
            continue
        if not (run / "old_grpo" / "metrics.json").is_file() and has_weights(run / "final"):
            jobs.append(old_eval(run / "final", run / "old_grpo"))
        if separate and not (run / "sft_arm" / "results.json").is_file():
            if (run / "sft_arm").exists():
                (run / "sft_arm").rename(run / f"sft_arm.failed-{stamp}")
            for name in ("old_sft_control", "sft_job.log"):
                if (run / name).exists():
                    (run / name).rename(run / f"{name}.failed-{stamp}")
            sft = fresh[f"k={k} seed={seed} SFT"]
            sft.after = ()
            jobs.append(sft)
            continue
        weights = run / "sft_arm" if separate else run / "control"
        if not (run / "old_sft_control" / "metrics.json").is_file() and has_weights(weights):
            jobs.append(old_eval(weights, run / "old_sft_control"))
    return jobs


def lr_jobs(out: Path, budgets: list[int], lrs: list[float], steps: int, extra: list[str]) -> list[Job]:
    jobs = []
    for k in budgets:
        for lr in lrs:
            run = out / f"k{k}_lr{lr:g}"
            command = [PY, "-m", "anomaly_rl.train", "+experiment=adapt_sft", f"data.shots={k}", "seed=0",
                       *batch_overrides(k, "warm_start"), f"warm_start.optimizer.lr={lr}",
                       f"warm_start.max_steps={steps}", *COMMON, f"hydra.run.dir={run}",
                       *[e for e in extra if e.startswith(("eval.", "data."))]]
            jobs.append(Job(f"lr k={k} lr={lr:g}", [command], run / "job.log"))
    return jobs


def write_lrs(out: Path, budgets: list[int], lrs: list[float], steps: int) -> dict:
    result = {"command": shlex.join(["experiments/adapt/run_adapt.py", *sys.argv[1:]]),
              "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "commit": git_commit(),
              "runs": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
              "score": "val balanced accuracy + val mean IoU (screw val split, 40 images, seed 0's draw)",
              "steps": steps, "budgets": {}}
    for k in budgets:
        candidates = {}
        for lr in lrs:
            path = out / f"k{k}_lr{lr:g}" / "results.json"
            if path.is_file():
                row = json.loads(path.read_text())["rows"].get("sft", {})
                candidates[f"{lr:g}"] = {key: row.get(key) for key in
                                         ("image_BalancedAccuracy", "image_AUROC", "box_mIoU", "schema_valid_rate")}
        scored = {lr: (v["image_BalancedAccuracy"] or 0) + (v["box_mIoU"] or 0) for lr, v in candidates.items()}
        if scored:
            best = max(scored, key=scored.get)
            result["budgets"][str(k)] = {"lr": float(best), "val": candidates}
    if LR_FILE.is_file():  # budgets picked by an earlier call (e.g. one budget at a time) are kept
        kept = json.loads(LR_FILE.read_text()).get("budgets", {})
        result["budgets"] = {**{k: v for k, v in kept.items() if k not in result["budgets"]}, **result["budgets"]}
    LR_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
    return result


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="jobs at once (each with ADAPT_THREADS threads, default 1)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default logs/adapt/runs/<time>)")
    parser.add_argument("--pick-lr", action="store_true", help="pick the SFT lr on val first (then the benchmark "
                        "unless --pick-only)")
    parser.add_argument("--pick-only", action="store_true")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--lr-steps", type=int, default=100)
    parser.add_argument("--separate-sft", action="store_true",
                        help="the SFT arm as its own run (for GRPO's measured wall time) instead of the in-run control")
    parser.add_argument("--no-aggregate", action="store_true")
    parser.add_argument("--repair", type=Path, default=None,
                        help="rerun only the missing old-look evaluations of this benchmark folder, then aggregate")
    args, extra = parser.parse_known_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    started = time.time()
    if args.repair:
        out = args.repair.resolve()
        failed = run_all(repair_jobs(out, extra), args.parallel)
        if not args.no_aggregate:
            subprocess.run([PY, str(HERE / "aggregate.py"), "--runs", str(out)], cwd=ROOT, check=False)
        if failed:
            raise SystemExit(f"failed jobs: {failed}")
        return
    prepare_data()
    out = (args.out or ROOT / "logs" / "adapt" / "runs" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "experiments/adapt/run_adapt.py", *sys.argv[1:]])
    (out / "command.txt").write_text(command + "\n")
    # Per budget: the lr pick's runs, interleaved with the GRPO runs (which do not need the lr) so that
    # both slots stay busy; the SFT arms (or the in-run controls) wait for that budget's pick.
    jobs: list[Job] = []
    for i, k in enumerate(args.budgets):
        bench = [] if args.pick_only else benchmark_jobs(out, [k], args.seeds, extra, args.separate_sft)
        if i > 0:
            bench = bench[1:]  # the base's old-look evaluation runs once
        if not args.pick_lr:
            jobs += bench
            continue
        picks = lr_jobs(out / "lr", [k], args.lrs, args.lr_steps, extra)
        write_name = f"write sft_lr.json k={k}"

        def pick(k: int = k) -> list[list[str]]:
            write_lrs(out / "lr", [k], args.lrs, args.lr_steps)
            return []

        writer = Job(write_name, pick, out / "lr" / "job.log", after=tuple(job.name for job in picks))
        for job in bench:
            if job.name.endswith("SFT") or (not args.separate_sft and job.name.startswith("k=")):
                job.after = (*job.after, write_name)
        grpo_first = [job for job in bench if job.name.endswith("GRPO")][:1] + [
            job for job in bench if job.name.startswith("base")]
        rest = [job for job in bench if job not in grpo_first]
        jobs += [picks[0], *grpo_first, *picks[1:], writer, *rest]
    failed = run_all(jobs, args.parallel)
    seconds = time.time() - started
    (out / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    print(f"wall time {seconds:.0f} s; runs in {out}")
    if not args.no_aggregate and not args.pick_only:
        subprocess.run([PY, str(HERE / "aggregate.py"), "--runs", str(out)], cwd=ROOT, check=False)
    if failed:
        raise SystemExit(f"failed jobs: {failed}")


if __name__ == "__main__":
    main()
