"""`trainer=ddp_cpu` end to end: the real command, two gloo processes, SFT warm start then GRPO.

A probe callback (below, instantiated inside each training process through the `callbacks`
config) records what its own process saw and holds; the test then checks, from outside:
the processes took disjoint prompts that together are exactly the single-process batch, every
group of G completions stayed in one process, both ended with identical weights, and the logged
metrics are the cross-process values, not rank 0's own.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import pytest
import torch

from anomaly_rl.training.batches import ResumableBatches
from tests.small_run import CONF, SMALL, compose_config

REPO = CONF.parent
GROUP = 3
PROMPTS = 4  # global prompts per GRPO step: 2 per process, 1 per process per mini-batch
SFT_BATCH = 4


class RankProbe(L.Callback):
    """Runs in every training process: appends what this process saw to `rank<r>.jsonl`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, **record}
        with (self.out_dir / f"rank{trainer.global_rank}.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if hasattr(pl_module, "rollout_step"):
            self._write(
                trainer,
                {
                    "phase": "grpo",
                    "index": pl_module.rollout_step - 1,
                    "prompts": [str(s.image_path) for s in batch.samples],
                    "local_prompts": pl_module.local_step["prompts"],
                    "advantages": pl_module.local_step["advantages"],
                    "local": pl_module.local_step["metrics"],
                    "logged": pl_module.history[-1],
                },
            )
        else:
            self._write(
                trainer,
                {"phase": "sft", "index": pl_module.step_index - 1, "prompts": [str(s.image_path) for s in batch.samples]},
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        phase = "grpo" if hasattr(pl_module, "rollout_step") else "sft"
        state = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}
        torch.save(state, self.out_dir / f"{phase}_weights_rank{trainer.global_rank}.pt")


class LetterShareReward:
    """A dense reward an untrained policy already varies on (the share of "a" in the text): two
    warm-start steps do not teach the schema, and all-zero schema rewards would give zero
    advantages, no gradient, and trivially identical weights."""

    def __init__(self, **weights: float) -> None:  # accepts (and ignores) the replaced reward's weights
        self.weights = weights

    def __call__(self, parsed: Any, samples: Any) -> dict[str, np.ndarray]:
        share = np.array([p.text.count("a") / max(1, len(p.text)) for p in parsed], dtype=float)
        return {"share": share, "total": share}


def _records(probe: Path, rank: int, phase: str) -> list[dict[str, Any]]:
    lines = (probe / f"rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


def _logged(csv_path: Path, key: str) -> list[float]:
    with csv_path.open(encoding="utf-8") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def _train(overrides: list[str], run: Path) -> subprocess.CompletedProcess[str]:
    """`python -m anomaly_rl.train ... trainer=ddp_cpu` as a user types it (Lightning re-runs it for rank 1)."""
    command = [sys.executable, "-m", "anomaly_rl.train", *overrides, "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _small(root: Path, probe: Path) -> list[str]:
    return [
        *SMALL,
        f"algo.prompts_per_step={PROMPTS}",
        f"algo.group_size={GROUP}",
        "algo.mini_batches=2",
        "algo.loss_type=dapo",  # token-weighted: the case a plain mean of gradients gets wrong
        "algo.scale_rewards=batch",  # needs every process's rewards
        "algo.max_steps=2",
        f"warm_start.batch_size={SFT_BATCH}",
        "warm_start.max_steps=2",
        "eval.limit=2",
        "logger=csv",
        f"reward._target_={RankProbe.__module__}.LetterShareReward",
        f"+callbacks.probe._target_={RankProbe.__module__}.RankProbe",
        f"+callbacks.probe.out_dir={probe}",
        f"paths.root_dir={root}",
    ]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    root, run, probe = tmp / "root", tmp / "run", tmp / "probe"
    overrides = _small(root, probe)
    done = _train(overrides, run)
    return {"root": root, "run": run, "probe": probe, "overrides": overrides, "output": done.stdout + done.stderr}


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        (["algo.prompts_per_step=2", "algo.mini_batches=2"], "algo.prompts_per_step"),  # 2 prompts, 2 x 2 shares
        (["warm_start.batch_size=3"], "warm_start.batch_size"),
    ],
)
def test_shares_that_do_not_divide_fail_at_start(tmp_path: Path, overrides: list[str], setting: str) -> None:
    """Checked before any process is launched (in-process: this never reaches a `fit`)."""
    from anomaly_rl.train import train
    from tests.small_run import compose_small_run

    cfg = compose_small_run(tmp_path, "bad", ["trainer=ddp_cpu", *overrides])
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "bad" / "sft").exists()


def _single_process_batches(ddp_run: dict[str, Any], batch_size: int) -> ResumableBatches:
    """The batches one process would draw (same data, same seed), as the oracle for the shards."""
    cfg = compose_config("train", ddp_run["root"], ddp_run["run"], ddp_run["overrides"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return ResumableBatches(datamodule.train_samples, batch_size, int(cfg.seed), lambda s: s)


def test_run_writes_its_folder_once(ddp_run: dict[str, Path]) -> None:
    run = ddp_run["run"]
    for name in ["config.yaml", "results.json", "sft/weights.pt", "final/weights.pt", "grpo_history.json"]:
        assert (run / name).is_file(), name
    assert set(json.loads((run / "results.json").read_text())["rows"]) >= {"start", "grpo"}
    assert (run / "checkpoints" / "grpo" / "last.ckpt").is_file()
    assert not list(run.rglob("*.tmp")), "a second process raced rank 0 over a temporary file"
    for rank in (0, 1):
        assert {r["world"] for r in _records(ddp_run["probe"], rank, "grpo")} == {2}


@pytest.mark.parametrize(("phase", "batch_size", "steps"), [("sft", SFT_BATCH, 2), ("grpo", PROMPTS, 2)])
def test_processes_take_disjoint_prompts_that_make_up_the_single_process_batch(
    ddp_run: dict[str, Any], phase: str, batch_size: int, steps: int
) -> None:
    oracle = _single_process_batches(ddp_run, batch_size)
    by_rank = [_records(ddp_run["probe"], rank, phase) for rank in (0, 1)]
    assert [len(r) for r in by_rank] == [steps, steps]
    for step in range(steps):
        mine, theirs = by_rank[0][step], by_rank[1][step]
        assert mine["index"] == theirs["index"] == step
        assert len(mine["prompts"]) == len(theirs["prompts"]) == batch_size // 2
        assert not set(mine["prompts"]) & set(theirs["prompts"])
        expected = sorted(str(s.image_path) for s in oracle.samples_at(step))
        assert sorted(mine["prompts"] + theirs["prompts"]) == expected


def test_every_group_stays_in_one_process(ddp_run: dict[str, Any]) -> None:
    for rank in (0, 1):
        for record in _records(ddp_run["probe"], rank, "grpo"):
            # The rows this process trained on are G completions of each of its own prompts ...
            assert record["local_prompts"] == record["prompts"]
            advantages = np.asarray(record["advantages"])
            assert advantages.shape == (GROUP * len(record["prompts"]),)
            # ... and each block of G is a whole group: group-relative advantages sum to zero over
            # a whole group (a group split across processes would leave part-sums here).
            np.testing.assert_allclose(advantages.reshape(-1, GROUP).sum(axis=1), 0.0, atol=1e-5)


def test_weights_stay_identical_across_processes(ddp_run: dict[str, Any]) -> None:
    probe, run = ddp_run["probe"], ddp_run["run"]
    for phase in ("sft", "grpo"):
        a = torch.load(probe / f"{phase}_weights_rank0.pt", weights_only=True)
        b = torch.load(probe / f"{phase}_weights_rank1.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (phase, key)
    final = torch.load(run / "final" / "weights.pt", weights_only=True)
    start = torch.load(run / "sft" / "weights.pt", weights_only=True)
    grpo = torch.load(probe / "grpo_weights_rank0.pt", weights_only=True)
    assert all(torch.equal(final[k], grpo[k]) for k in final)
    assert any(not torch.equal(final[k], start[k]) for k in final), "GRPO did not change the weights"


def test_logged_metrics_are_reduced_across_processes(ddp_run: dict[str, Any]) -> None:
    probe, run = ddp_run["probe"], ddp_run["run"]
    ranks = [_records(probe, rank, "grpo") for rank in (0, 1)]
    metrics_csv = run / "csv" / "grpo" / "metrics.csv"
    # Row means (reward), update statistics (entropy: every process runs the same updates) and
    # maxima, each against the two processes' own values for that step.
    checks = {"train/reward": np.mean, "train/entropy": np.mean, "train/completion_length_max": np.max}
    differed = set()
    for key, combine in checks.items():
        logged = _logged(metrics_csv, key)
        assert len(logged) == 2, key
        for step, (mine, theirs) in enumerate(zip(*ranks, strict=True)):
            local = [mine["local"][key], theirs["local"][key]]
            assert logged[step] == pytest.approx(float(combine(local)), rel=1e-6, abs=1e-6), (key, step)
            if local[0] != local[1]:
                differed.add(key)
    # Otherwise "rank 0's own value" would pass as well.
    assert "train/entropy" in differed, "the two processes' entropies never differed: the test proves nothing"
    for mine, theirs in zip(*ranks, strict=True):
        assert mine["logged"] == theirs["logged"], "processes disagree on the (reduced) metrics"
    history = json.loads((run / "grpo_history.json").read_text())
    assert [h["train/reward"] for h in history] == pytest.approx(_logged(metrics_csv, "train/reward"), abs=1e-6)


@pytest.mark.slow
def test_pause_and_resume_on_two_processes_gives_the_weights_of_a_straight_run(tmp_path: Path) -> None:
    """Every process's random streams are in the checkpoint: N steps == N/2 + resume + N/2."""
    root = tmp_path / "root"
    common = [*_small(root, tmp_path / "probe"), "warm_start.max_steps=1", "eval.enabled=false"]
    _train(common, tmp_path / "straight")
    # pause_after_steps=1 lets the one-step warm start finish, then pauses GRPO after its first step.
    _train([*common, "pause_after_steps=1"], tmp_path / "paused")
    assert not (tmp_path / "paused" / "final").exists()
    _train([f"resume={tmp_path / 'paused'}"], tmp_path / "ignored")
    a = torch.load(tmp_path / "straight" / "final" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "paused" / "final" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_each_process_evaluates_a_shard_and_the_metrics_are_those_of_one_process(ddp_run: dict[str, Any]) -> None:
    """The grpo row was predicted by both processes (half the split each) and gathered; one process
    evaluating the same final weights on the whole split gets the same predictions and metrics."""
    from anomaly_rl.evaluation.runner import evaluate_to_folder
    from anomaly_rl.models.loading import load_model_and_processor
    from anomaly_rl.models.weights import load_policy_weights

    output = ddp_run["output"]
    for process in (0, 1):
        assert f"evaluation eval_grpo: process {process} of 2 predicts 1 of 2 samples" in output
    run = ddp_run["run"]
    cfg = compose_config("train", ddp_run["root"], run, ddp_run["overrides"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    model, processor = load_model_and_processor(cfg.model)
    load_policy_weights(model, run / "final", processor)
    single = evaluate_to_folder(
        model, processor, hydra.utils.instantiate(cfg.schema), datamodule, run.parent / "single",
        split="test", batch_size=int(cfg.eval.batch_size), max_new_tokens=int(cfg.eval.max_new_tokens),
        limit=cfg.eval.limit,
    )
    sharded = json.loads((run / "eval_grpo" / "metrics.json").read_text())
    read = [json.loads(line) for line in (run / "eval_grpo" / "predictions.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (run.parent / "single" / "predictions.jsonl").read_text().splitlines()]
    assert [r["image_path"] for r in read] == [r["image_path"] for r in again]
    assert [r["response"] for r in read] == [r["response"] for r in again]
    for key, value in single["overall"].items():
        if isinstance(value, float) and value == value:
            assert sharded["overall"][key] == pytest.approx(value, abs=1e-6), key


def test_processes_start_before_the_first_evaluation(tmp_path: Path) -> None:
    """Without a warm start to train, the first `fit` comes after the start row; the processes are
    started before it all the same, so the start row is evaluated in shards by both."""
    root = tmp_path / "root"
    overrides = [*_small(root, tmp_path / "probe"), "warm_start.enabled=false", "algo.max_steps=1",
                 "eval.after_grpo=false"]
    done = _train(overrides, tmp_path / "run")
    output = done.stdout + done.stderr
    for process in (0, 1):
        assert f"evaluation eval_start: process {process} of 2 predicts 1 of 2 samples" in output, output[-3000:]
    assert "start" in json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
