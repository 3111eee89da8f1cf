"""Peak memory of the log-prob head in one policy pass: the old full-vocabulary computation vs the lean one.

    .venv/bin/python experiments/bench/logprob_memory.py                  # CPU: rows 12, T 128, fp32
    python3 experiments/bench/logprob_memory.py --device cuda --tokens 512  # GPU: bf16 by default

The work measured is what completion_logprobs does after the decoder, for one chunk of rows holding
the whole batch (the recipe's logprob_chunk_size 16 >= 12 rows): the output head on the final hidden
states [rows, T, H], the temperature-scaled, suppression-masked log-softmax of the sampled tokens,
the entropy (the GRPO module asks for it), and backward of a loss on the log-probs into the hidden
states. The head is frozen, as under the recipe's LoRA (Qwen2.5-VL-3B ties it to the embeddings,
which LoRA does not train); `--trainable-head` trains it too (full fine-tuning).

- old: `old_pass` below, the computation of anomaly_rl/rollout/logprobs.py before the lean head:
  [rows, T, V] logits, cast to float32, masked, divided, log_softmax kept for backward, entropy with
  gradient (about four float32 copies of the full-vocabulary logits alive at once).
- new: `anomaly_rl.rollout.logprobs.chosen_token_logprobs` exactly as completion_logprobs calls it.

`--model qwen3b` measures the whole policy pass instead: completion_logprobs (old: a copy of the
old function kept below; new: the package's) forward + backward through the Qwen2.5-VL-3B
architecture with random weights, conf/model/qwen2_5_vl_3b.yaml's LoRA r 64 and gradient
checkpointing, B = rows / G prompts of synthetic images at --image-size, G = --group (6), T forced tokens,
logprob_chunk_size 16, under bf16 autocast on a GPU as in training (`--shrink`: 1 LM layer and 1
ViT block at full widths, for a CPU).

Peak: bytes held above what was held before the pass (inputs and the head's weight excluded), from
the CPU allocator's own event stream (anomaly_rl.rollout.profiling.cpu_peak_bytes) or
torch.cuda.max_memory_allocated. Both sides get the same hidden states, tokens and loss weights,
and the script checks that they give the same log-probs and hidden-state gradient.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anomaly_rl.models.processing import (
    EncodedPrompts,
    encode_prompts,
    prompt_embeddings,
    prompt_text,
    unwrap_model,
)
from anomaly_rl.rollout.logprobs import chosen_token_logprobs, completion_logprobs, default_block_tokens
from anomaly_rl.rollout.profiling import peak_bytes
from anomaly_rl.rollout.transformers_backend import suppression_mask
from anomaly_rl.schemas.config import load_schema
from anomaly_rl.training.prompts import frame_of

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "experiments" / "bench" / "results"
QWEN_VOCAB = 151936
TEMPERATURE = 0.9
CHUNK_SIZE = 16  # conf/algo/grpo.yaml's logprob_chunk_size


def old_pass(
    hidden: Tensor, head: nn.Module, ids: Tensor, mask: Tensor, suppress: Tensor
) -> tuple[Tensor, Tensor]:
    """The old head: the code of completion_logprobs before the lean head, on one chunk of rows."""
    return old_pass_on_logits(head(hidden), ids, mask, suppress)


def old_completion_logprobs(
    model: nn.Module,
    enc: EncodedPrompts,
    ids: Tensor,
    mask: Tensor,
    group_size: int,
    suppress: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """completion_logprobs before the lean head: full [rows, T, V] logits per chunk, then old_pass."""
    base = unwrap_model(model)
    embeds = prompt_embeddings(model, enc)
    logps, entropies = [], []
    for start in range(0, ids.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, ids.shape[0]), device=ids.device)
        prompt_rows = rows // group_size
        t_len = ids.shape[1]
        inputs = torch.cat([embeds[prompt_rows], base.get_input_embeddings()(ids[rows])], dim=1)
        attention = torch.cat([enc.attention_mask[prompt_rows], mask[rows].to(enc.attention_mask.dtype)], dim=1)
        steps = torch.arange(t_len, device=ids.device)
        completion_pos = (enc.next_position[prompt_rows].unsqueeze(1) + steps).unsqueeze(0).expand(3, -1, -1)
        position = torch.cat([enc.position_ids[:, prompt_rows], completion_pos], dim=2)
        logits = base(
            inputs_embeds=inputs, attention_mask=attention, position_ids=position, use_cache=False,
            logits_to_keep=t_len + 1,
        ).logits[:, :-1]  # fmt: skip
        logp, entropy = old_pass_on_logits(logits, ids[rows], mask[rows].bool(), suppress)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies)


def old_pass_on_logits(logits: Tensor, ids: Tensor, mask: Tensor, suppress: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits.float().masked_fill(suppress, float("-inf")) / TEMPERATURE
    logp_all = torch.log_softmax(logits, dim=-1)
    token_logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    entropy = torch.special.entr(logp_all.exp()).sum(dim=-1).masked_fill(~mask, 0.0)
    return token_logp, entropy


def new_pass(
    hidden: Tensor, head: nn.Module, ids: Tensor, mask: Tensor, suppress: Tensor, block: int | None
) -> tuple[Tensor, Tensor]:
    """The lean head, called exactly as completion_logprobs calls it for one chunk."""
    logp, entropy = chosen_token_logprobs(
        hidden[mask], head, ids[mask], suppress=suppress, temperature=TEMPERATURE, with_entropy=True,
        block_tokens=block,
    )  # fmt: skip
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    assert entropy is not None
    return zeros.masked_scatter(mask, logp), zeros.masked_scatter(mask, entropy)


@dataclass
class Workload:
    """One side's pass (returns the [rows, T] log-probs), the loss weights, and what to compare after."""

    runs: dict[str, Callable[[], Tensor]]
    weights: Tensor
    leaves: list[Tensor]  # tensors whose .grad the two sides must agree on
    description: str


def measure(name: str, work: Workload, device: torch.device) -> dict[str, Any]:
    """Peak bytes and seconds of one side's forward + backward; the log-probs and gradients too."""
    for leaf in work.leaves:
        leaf.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def step() -> Tensor:
        logp = work.runs[name]()
        (logp * work.weights).sum().backward()
        return logp.detach()

    start = time.perf_counter()
    logp, peak = peak_bytes(step, device)
    seconds = time.perf_counter() - start
    print(f"{name}: peak {peak / 2**30:.3f} GiB above the inputs, {seconds:.1f} s", flush=True)
    grads = torch.cat([leaf.grad.detach().float().flatten() for leaf in work.leaves])
    for leaf in work.leaves:
        leaf.grad = None
    return {"peak_bytes": peak, "peak_gib": peak / 2**30, "seconds": seconds, "logp": logp, "grad": grads}


def head_workload(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Workload:
    """The head alone on random final hidden states [rows, T, H] (the default)."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)  # the 3B's initializer_range: realistic logit spread
    head = head.to(device=device, dtype=dtype).requires_grad_(args.trainable_head)
    hidden = torch.randn(args.rows, args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_(True)
    ids = torch.randint(args.vocab // 2, (args.rows, args.tokens), generator=g).to(device)
    mask = torch.ones(args.rows, args.tokens, dtype=torch.bool, device=device)  # forced length
    suppress = torch.zeros(args.vocab, dtype=torch.bool, device=device)
    suppress[args.vocab // 2 :] = True  # a large never-sampled set, as with the tiny tokenizer on the 3B vocab
    weights = torch.randn(args.rows, args.tokens, generator=g).to(device)
    return Workload(
        runs={
            "old": lambda: old_pass(hidden, head, ids, mask, suppress)[0],
            "new": lambda: new_pass(hidden, head, ids, mask, suppress, args.block)[0],
        },
        weights=weights,
        leaves=[hidden, head.weight] if args.trainable_head else [hidden],
        description=f"output head only: hidden [{args.rows}, {args.tokens}, {args.hidden}] -> vocab {args.vocab}",
    )


def model_workload(args: argparse.Namespace, device: torch.device) -> Workload:
    """The whole policy pass through the Qwen2.5-VL-3B architecture (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import grpo_throughput as gt

    group = args.group
    if args.rows % group:
        raise SystemExit(f"--rows must be a multiple of --group ({group}) with --model qwen3b")
    bench_argv = [
        "--arch", "qwen2_5_vl_3b", "--device", device.type, "--image-size", str(args.image_size),
        "--group", str(group), "--prompts", str(args.rows // group), "--cache-dir", args.cache_dir,
    ]  # fmt: skip
    bench = gt.parse_args([*bench_argv, "--shrink"] if args.shrink else bench_argv)
    built = gt.build(bench, device)
    model, processor = built.model, built.processor
    for module in model.modules():  # LoRA dropout off: both sides must see the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()  # gradient checkpointing acts in training mode only, as in a GRPO update
    schema = load_schema("adfm")
    samples, images = gt.make_data(args.image_size, args.rows // group)
    texts = [prompt_text(processor, schema.messages(s, frame_of(s, processor).model_size)) for s in samples]
    with torch.no_grad():
        enc = encode_prompts(model, processor, texts, [[images[s.image_path]] for s in samples])
    never = gt.never_sampled(built)
    suppress = suppression_mask(args.vocab, never, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    allowed = (~suppress).nonzero().squeeze(1).cpu()
    ids = allowed[torch.randint(len(allowed), (args.rows, args.tokens), generator=g)].to(device)
    mask = torch.ones(args.rows, args.tokens, dtype=torch.long, device=device)
    weights = torch.randn(args.rows, args.tokens, generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def old() -> Tensor:
        with autocast:
            return old_completion_logprobs(model, enc, ids, mask, group, suppress, CHUNK_SIZE)[0]

    def new() -> Tensor:
        with autocast:
            logp, _ = completion_logprobs(
                model, enc, ids, mask, group, temperature=TEMPERATURE, suppress_token_ids=never,
                chunk_size=CHUNK_SIZE, return_entropy=True, head_block_tokens=args.block,
            )  # fmt: skip
            return logp

    trainable = [p for p in model.parameters() if p.requires_grad]
    return Workload(
        runs={"old": old, "new": new},
        weights=weights,
        leaves=trainable[:4] + trainable[-4:],  # LoRA factors of the first and last layers
        description=(
            f"policy pass, qwen2_5_vl_3b{' (shrunk)' if args.shrink else ''}, LoRA, {args.rows // group} prompts x "
            f"G {group} x {args.tokens} tokens, {args.image_size}px, prompt width {enc.prompt_length}, "
            f"logprob_chunk_size {CHUNK_SIZE}"
        ),
    )


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": version("transformers"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line() -> str:
    script = Path(sys.argv[0]).absolute()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else script.name
    return shlex.join([Path(sys.executable).name, shown, *sys.argv[1:]])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="completions in the chunk (B x G = 2 x 6)")
    parser.add_argument("--tokens", type=int, default=128, help="T (recipe: 512; CPU default 128 for RAM)")
    parser.add_argument("--hidden", type=int, default=2048, help="H (Qwen2.5-VL-3B: 2048)")
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda")
    parser.add_argument("--block", type=int, default=None, help="head block tokens (default: 256 MiB fp32)")
    parser.add_argument("--trainable-head", action="store_true", help="train the head too (full fine-tuning)")
    parser.add_argument("--model", choices=["head", "qwen3b"], default="head", help="the head alone, or the whole pass")
    parser.add_argument("--shrink", action="store_true", help="qwen3b with 1 LM layer and 1 ViT block (CPU)")
    parser.add_argument("--image-size", type=int, default=448, help="qwen3b: px of the synthetic images")
    parser.add_argument("--group", type=int, default=6, help="qwen3b: G completions per prompt (rows / G prompts)")
    parser.add_argument("--cache-dir", default=".cache/tiny_models", help="qwen3b: the tiny tokenizer's folder")
    parser.add_argument("--sides", default="old,new")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/logprob_memory_...)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    block = args.block or default_block_tokens(args.vocab)
    if args.model == "qwen3b":
        args.vocab, args.hidden = QWEN_VOCAB, 2048  # the architecture's, whatever was asked
        work = model_workload(args, device)
    else:
        work = head_workload(args, device, dtype)
    print(work.description, flush=True)
    results: dict[str, dict[str, Any]] = {}
    for side in sides:
        results[side] = measure(side, work, device)
    report: dict[str, Any] = {
        "command": command_line(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(device),
        "loadavg_start": list(os.getloadavg()),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "dtype": str(dtype), "block_tokens": block},
        "workload": work.description,
        "one_full_vocab_fp32_copy_gib": args.rows * args.tokens * args.vocab * 4 / 2**30,
        "sides": {s: {k: v for k, v in r.items() if k not in ("logp", "grad")} for s, r in results.items()},
    }
    if {"old", "new"} <= results.keys():
        old, new = results["old"], results["new"]
        report["reduction"] = old["peak_bytes"] / max(1, new["peak_bytes"])
        report["max_abs_logp_diff"] = float((old["logp"] - new["logp"]).abs().max())
        report["max_abs_grad_diff"] = float((old["grad"] - new["grad"]).abs().max())
        report["max_abs_grad"] = float(old["grad"].abs().max())
        print(
            f"reduction {report['reduction']:.1f}x; max |logp diff| {report['max_abs_logp_diff']:.2e}, "
            f"max |grad diff| {report['max_abs_grad_diff']:.2e}"
        )
    out = args.out or RESULTS_DIR / (
        f"logprob_memory_{args.model}_{device.type}_R{args.rows}_T{args.tokens}_H{args.hidden}_"
        f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
