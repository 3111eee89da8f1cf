"""One GPU session, three measurements on the Qwen2.5-VL-3B architecture (random weights, bf16, LoRA r 64).

    python3 experiments/bench/gpu_step.py --out-dir "$OUT"          # on the device machine (see below)
    .venv/bin/python experiments/bench/gpu_step.py --tiny --out-dir /tmp/gpu_step   # CPU smoke test

Stages, each written to <out-dir>/gpu_step.json as soon as it ends (a run cut short keeps what it
measured), each isolated so that one failure does not lose the others:

1. memory: old full-vocabulary log-probs vs the lean ones, forward + backward, at the recipe's
   rows x T (B*G = 12 x L = 512), V 151,936, bf16: the output head alone (H 2048), then the whole
   policy pass through the 3B with LoRA and gradient checkpointing, 448 px prompts
   (experiments/bench/logprob_memory.py; logprob_memory_head.json, logprob_memory_policy_pass.json).
2. rollout: sampling alone, B = 2 prompts x G = 6 x `--rollout-tokens` forced tokens at temperature 0.9
   under bf16 autocast, eager backend vs static backend (static KV cache, decode step replayed from a
   CUDA graph): seconds, tokens/s, peak memory, whether the graph was used, and how far the two
   agree token by token (seeded sampling; bf16 rounding differs between the two batch layouts, so
   on random weights the rows may diverge after a while: reported, not asserted).
3. grpo: full GRPO steps (B 2 x G 6 x 512 forced tokens, 448 px, beta 0.04, mu 1) through
   grpo_throughput.py, one call per side, in this order: ours_static, ours (eager), trl (TRL 1.16
   GRPOTrainer). JSON per side: grpo_<side>.json; step times and peak GPU memory in the summary.

Device run (after `bash experiments/bench/gpu_qwen3b_bench.sh fetch` here, which puts TRL and the
newer transformers/peft into .whl/): command "bash experiments/bench/gpu_qwen3b_bench.sh step",
carry [".whl"], timeout_s 600. Expected on an H200, about 7-8 min in all: setup 0.5 min, memory
0.7 min (two 3B passes and a model build), rollout 0.7 min, ours_static 1 min (1 warm-up + 2 timed),
ours 2 min and trl 2 min (1 warm-up + 1 timed each; ~55 s per eager step on the H100 on 2026-11-26).
`--baseline-steps` / `--static-steps` trade precision for time.

`--tiny`: everything on the CPU at toy sizes with the 3B architecture shrunk to one LM layer and one
ViT block (grpo_throughput.py --shrink), the same code paths: a check that the script is not broken.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # the sibling benchmark scripts
sys.path.insert(0, str(ROOT))

import grpo_throughput as gt  # noqa: E402
import logprob_memory  # noqa: E402

from anomaly_rl.models.processing import encode_prompts, prompt_text, stop_token_ids  # noqa: E402
from anomaly_rl.rollout.backends import make_rollout_backend  # noqa: E402
from anomaly_rl.schemas.config import load_schema  # noqa: E402
from anomaly_rl.training.prompts import frame_of  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stage_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Old vs lean log-probs at the recipe's B*G rows x L tokens: the head alone, then the whole pass."""
    rows = args.prompts * args.group
    keys = ("workload", "sides", "reduction", "max_abs_logp_diff", "max_abs_grad_diff", "max_abs_grad")
    result: dict[str, Any] = {}
    head = ["--hidden", "64", "--tokens", "8"] if args.tiny else ["--tokens", str(args.tokens)]
    report = logprob_memory.main(
        ["--device", device.type, "--rows", str(rows), *head, "--out", str(args.out_dir / "logprob_memory_head.json")]
    )
    result["head"] = {k: report.get(k) for k in keys}
    model = ["--shrink", "--tokens", "8", "--threads", "1"] if args.tiny else ["--tokens", str(args.tokens)]
    report = logprob_memory.main(
        [
            "--model", "qwen3b", "--device", device.type, "--rows", str(rows), "--group", str(args.group),
            "--image-size", str(args.image_size),
            "--cache-dir", args.cache_dir, *model, "--out", str(args.out_dir / "logprob_memory_policy_pass.json"),
        ]
    )  # fmt: skip
    result["policy_pass"] = {k: report.get(k) for k in keys}
    result["reduction"] = {name: part.get("reduction") for name, part in result.items()}
    return result


def _bench_args(args: argparse.Namespace, device: torch.device, tokens: int, extra: Sequence[str] = ()) -> list[str]:
    argv = [
        "--arch", "qwen2_5_vl_3b", "--device", device.type, "--group", str(args.group),
        "--prompts", str(args.prompts), "--tokens", str(tokens), "--image-size", str(args.image_size),
        "--cache-dir", args.cache_dir, *extra,
    ]  # fmt: skip
    return [*argv, "--shrink", "--threads", "1"] if args.tiny else argv


def _agreement(a: Any, b: Any) -> dict[str, Any]:
    """How far two rollouts of the same prompts and seed agree, row by row."""
    same = (a.completion_ids == b.completion_ids) & a.completion_mask.bool() & b.completion_mask.bool()
    width = same.shape[1]
    # The first position where a row differs (width if it never does): the first False of `same`.
    first_diff = torch.cat([same, torch.zeros_like(same[:, :1])], dim=1).float().argmin(dim=1)
    prefix = torch.arange(width, device=same.device).unsqueeze(0) < first_diff.unsqueeze(1)
    logp_diff = (a.sampling_logp - b.sampling_logp).abs()[prefix]
    return {
        "identical_rows": int(same.all(dim=1).sum()),
        "rows": int(same.shape[0]),
        "first_divergence_per_row": first_diff.tolist(),
        "max_abs_sampling_logp_diff_before_divergence": float(logp_diff.max()) if logp_diff.numel() else 0.0,
    }


def stage_rollout(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    bench = gt.parse_args(_bench_args(args, device, args.rollout_tokens))
    built = gt.build(bench, device)
    model, processor = built.model, built.processor
    schema = load_schema("adfm")
    samples, images = gt.make_data(bench.image_size, args.prompts)
    texts = [prompt_text(processor, schema.messages(s, frame_of(s, processor).model_size)) for s in samples]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    # Forced length, as in the GRPO stage: no stop token, and the stop tokens are never drawn.
    never = sorted(set(gt.never_sampled(built)) | set(stop_token_ids(processor)))
    settings = {"temperature": gt.TEMPERATURE, "top_p": 1.0, "eos_token_ids": [], "suppress_token_ids": never}
    result: dict[str, Any] = {"tokens": args.rollout_tokens, "rows": args.prompts * args.group}
    rollouts = {}
    with torch.no_grad(), autocast:
        enc = encode_prompts(model, processor, texts, [[images[s.image_path]] for s in samples])
        result["prompt_width"] = enc.prompt_length
        for name in ("eager", "static"):
            backend = make_rollout_backend(name)
            backend.sample(model, enc, args.group, max_new_tokens=4, **settings)  # kernels, cuBLAS handles
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(0)
            rollout = backend.sample(
                model, enc, args.group, max_new_tokens=args.rollout_tokens, generator=generator, **settings
            )
            _sync(device)
            seconds = time.perf_counter() - start
            rollouts[name] = rollout
            entry: dict[str, Any] = {
                "seconds": seconds,
                "tokens_per_s": float(rollout.completion_mask.sum()) / seconds,
                "ms_per_decode_step": 1000 * seconds / args.rollout_tokens,
            }
            if device.type == "cuda":
                entry["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            last_run = getattr(backend, "last_run", None)
            if last_run is not None:
                entry["static_last_run"] = last_run.__dict__
            result[name] = entry
            print(f"rollout {name}: {seconds:.2f} s, {entry['tokens_per_s']:.0f} tokens/s", flush=True)
    result["eager_over_static"] = result["eager"]["seconds"] / result["static"]["seconds"]
    result["agreement"] = _agreement(rollouts["eager"], rollouts["static"])
    del model, built, rollouts
    return result


def stage_grpo(args: argparse.Namespace, device: torch.device, side: str) -> dict[str, Any]:
    steps = args.static_steps if side == "ours_static" else args.baseline_steps
    out = args.out_dir / f"grpo_{side}.json"
    extra = ["--sides", side, "--steps", str(steps), "--warmup", str(args.warmup), "--out", str(out)]
    report = gt.main(_bench_args(args, device, args.tokens, extra))
    r = report["sides"][side]
    keys = ("median_step_s", "step_s", "warmup_step_s", "completions_per_s", "completion_tokens_per_s",
            "forced_length_ok", "peak_gpu_memory_gib", "module_rollout_s", "module_update_s", "static_last_run",
            "weight_fingerprint", "build_s", "error")  # fmt: skip
    return {k: r[k] for k in keys if k in r}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at toy sizes (3B shrunk to 1 layer)")
    parser.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_step")))
    parser.add_argument("--stages", default="memory,rollout,grpo")
    parser.add_argument("--sides", default="ours_static,ours,trl", help="GRPO sides, in this order")
    parser.add_argument("--group", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rollout-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--static-steps", type=int, default=2)
    parser.add_argument("--baseline-steps", type=int, default=1, help="timed steps of ours (eager) and trl")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-dir", default="/tmp/tiny_models", help="the tiny tokenizer's folder")
    args = parser.parse_args(argv)
    if args.tiny:
        args.group, args.prompts, args.tokens, args.rollout_tokens, args.image_size = 2, 1, 4, 6, 112
        args.static_steps = args.baseline_steps = 1
        args.warmup = 0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "gpu_step.json"
    report: dict[str, Any] = {
        "command": gt.command_line(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": gt.machine(device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stages": {},
    }
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    work: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "memory" in stages:
        work.append(("memory", lambda: stage_memory(args, device)))
    if "rollout" in stages:
        work.append(("rollout", lambda: stage_rollout(args, device)))
    if "grpo" in stages:
        for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
            work.append((f"grpo_{side}", lambda side=side: stage_grpo(args, device, side)))
    failed = False
    for name, run in work:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            report["stages"][name] = run()
        except (Exception, SystemExit) as error:  # noqa: BLE001 - one stage's failure must not lose the others
            traceback.print_exc()
            report["stages"][name] = {"error": f"{type(error).__name__}: {error}"}
            failed = True
        report["stages"][name]["stage_s"] = time.perf_counter() - start
        _free(device)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps({k: {kk: v.get(kk) for kk in ("median_step_s", "peak_gpu_memory_gib", "reduction",
                                                  "eager_over_static", "error", "stage_s")}
                      for k, v in report["stages"].items()}, indent=1))  # fmt: skip
    print(f"written to {out}")
    if failed:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
