"""How different are the G answers of a group? Sampled from a policy exactly as a GRPO step samples.

    python experiments/adapt/group_diversity.py --runs DIR [--runs DIR2 ...] [--prompts 32]

For every job folder under DIR (a multirun of `+experiment=adapt_ablation`, or one run folder), for
its start weights (the run's `init_from`) and its trained weights (`final/`): take the first
`--prompts` training images of the run's own data config, sample G responses each with the run's
GRPO settings (group size, temperature, max_new_tokens) through the GRPO module's own sampling and
scoring, and report per group
  - distinct responses (exact text), distinct parsed answers (the answer letter plus the boxes),
  - the zero-variance fraction of the total reward and of its classification component,
  - on normal images: the share of responses that earn classification reward (say "normal") and the
    share of groups holding at least one such response — the only groups whose classification
    advantage can push towards "normal" — and the mean GRPO advantage (total reward, group-centred
    and scaled) of those responses: positive means an update makes "normal" more likely.
Writes <job>/diversity.json ({"start": {...}, "final": {...}}), which
experiments/ablation/aggregate.py shows beside the metrics.

The training loop logs only the zero-variance fractions; this measures the diversity itself, on the
same prompts for every cell, with a fixed sampling seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CLASSIFICATION = ("cls", "accuracy")


def _job_folders(path: Path) -> list[Path]:
    if (path / ".hydra" / "overrides.yaml").is_file() and not (path / "multirun.yaml").is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file())


def run_config(job: Path) -> Any:
    """The run's config, composed afresh from conf/ with the run's own command-line overrides (so a
    setting added to the code since the run was made gets its current default)."""
    import yaml
    from hydra import compose, initialize_config_dir

    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    overrides = [o for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.root_dir={ROOT}"])


def probe(cfg: Any, weights: str | Path, prompts: int, seed: int) -> dict[str, float]:
    import hydra

    from anomaly_rl.checkpoints import load_trained_policy
    from anomaly_rl.data.datamodule import load_prompt_batch
    from anomaly_rl.grpo.advantages import group_advantages
    from anomaly_rl.grpo.module import GRPOModule
    from anomaly_rl.training.prompts import prepare_prompts

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    samples = list(datamodule.train_samples)[:prompts]
    model, processor = load_trained_policy(cfg.model, weights)
    model.eval()
    schema = hydra.utils.instantiate(cfg.schema)
    reward = hydra.utils.instantiate(cfg.reward)
    settings = hydra.utils.instantiate(cfg.algo)
    module = GRPOModule(model, processor, schema, reward, None, settings, lambda: None)
    module._sampling_generator = torch.Generator().manual_seed(seed)
    group = int(settings.group_size)
    texts_distinct, answers_distinct, zero_total, zero_cls = [], [], [], []
    normal_right, normal_groups_right, normal_advantages = [], [], []
    batch_size = int(settings.prompts_per_step)
    for start in range(0, len(samples), batch_size):
        batch = load_prompt_batch(samples[start : start + batch_size])
        with torch.no_grad():
            prepared = prepare_prompts(batch.samples, batch.images, batch.references, schema, processor, model)
            rollout = module._sample(prepared)
        parsed, rewards = module._score(prepared, rollout)
        cls_key = next((k for k in CLASSIFICATION if k in rewards), None)
        # The advantages this batch would get in a GRPO step (group baseline; the run's scaling).
        advantages = group_advantages(torch.as_tensor(np.asarray(rewards["total"]), dtype=torch.float64), group,
                                      settings.scale_rewards, settings.advantage_eps).numpy()
        for g in range(len(batch.samples)):
            rows = range(g * group, (g + 1) * group)
            texts_distinct.append(len({rollout.texts[i].strip() for i in rows}))
            answers_distinct.append(len({(parsed[i].answer, tuple(map(tuple, parsed[i].boxes))) for i in rows}))
            total = np.asarray(rewards["total"])[list(rows)]
            zero_total.append(float(np.ptp(total) == 0))
            if cls_key:
                cls = np.asarray(rewards[cls_key])[list(rows)]
                zero_cls.append(float(np.ptp(cls) == 0))
                if not batch.samples[g].is_anomalous:
                    normal_right.extend((cls > 0).astype(float).tolist())
                    normal_groups_right.append(float(np.any(cls > 0)))
                    # GRPO's advantage of those answers on the total reward (group-centred, group-scaled):
                    # positive means the update makes "normal" more likely, whatever the other terms say.
                    advantage = advantages[list(rows)]
                    normal_advantages.extend(advantage[cls > 0].tolist())
    return {
        "groups": len(texts_distinct),
        "group_size": group,
        "distinct_responses_per_group": float(np.mean(texts_distinct)),
        "distinct_answers_per_group": float(np.mean(answers_distinct)),
        "zero_std_group_fraction": float(np.mean(zero_total)),
        "zero_std_group_fraction_cls": float(np.mean(zero_cls)) if zero_cls else float("nan"),
        "normal_images": len(normal_groups_right),
        "normal_answer_rate_on_normal": float(np.mean(normal_right)) if normal_right else float("nan"),
        "normal_groups_with_a_normal_answer": float(np.mean(normal_groups_right)) if normal_groups_right else float("nan"),
        "normal_answers": len(normal_advantages),
        "normal_answer_advantage_mean": float(np.mean(normal_advantages)) if normal_advantages else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, action="append", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--force", action="store_true", help="recompute when diversity.json exists")
    args = parser.parse_args(argv)
    for runs_dir in args.runs:
        for job in _job_folders(runs_dir):
            out = job / "diversity.json"
            if out.is_file() and not args.force:
                continue
            if not (job / "final").is_dir():
                print(f"{job}: no final/ weights, skipped", file=sys.stderr)
                continue
            cfg = run_config(job)
            start = cfg.get("init_from")
            result = {"prompts": args.prompts, "seed": args.seed}
            if start:
                result["start"] = probe(cfg, start, args.prompts, args.seed)
            result["final"] = probe(cfg, job / "final", args.prompts, args.seed)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{job}: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
