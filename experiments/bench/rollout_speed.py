"""Group rollout speed: our sampler (vision + prefill once per prompt) vs model.generate(num_return_sequences).

    .venv/bin/python experiments/bench/rollout_speed.py [--prompts 4] [--group 8] [--tokens 64]
        [--threads N] [--repeats 3] [--cache-dir .cache/tiny_models]

Both sides sample at temperature 1 with the same never-sampled tokens and are forced to the full
length (ours: no stop tokens; generate: min_new_tokens), so they do the same decoding work. Ours
includes encode_prompts (the vision tower); generate runs it on its own inputs. Reported: the best
and the median of --repeats runs after one warm-up run each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

from anomaly_rl.data.records import Sample
from anomaly_rl.models.loading import load_model_and_processor
from anomaly_rl.models.processing import encode_prompts, never_sampled_token_ids, prompt_text, stop_token_ids
from anomaly_rl.rollout.transformers_backend import sample
from anomaly_rl.schemas.config import load_schema


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=".cache/tiny_models")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, processor = load_model_and_processor(
        {
            "name": "tiny",
            "cache_dir": args.cache_dir,
            "dtype": "float32",
            "finetune": "full",
            "freeze_vision": True,
        }
    )
    model.eval()
    size = processor.image_processor.size["longest_edge"] ** 0.5
    size = (int(size), int(size))
    schema = load_schema("adfm")
    samples = [
        Sample("", "normal", c, "good", None, (), size, "test") for c in ("bottle", "cable", "pill", "tile")
    ]
    texts = [prompt_text(processor, schema.messages(samples[i % 4], size)) for i in range(args.prompts)]
    g = torch.Generator().manual_seed(0)
    images = [
        [Image.fromarray(torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy())]
        for _ in range(args.prompts)
    ]
    stop = stop_token_ids(processor)
    never = never_sampled_token_ids(processor, model.config.text_config.vocab_size, stop)

    def ours() -> torch.Tensor:
        enc = encode_prompts(model, processor, texts, images)
        r = sample(
            model,
            enc,
            args.group,
            max_new_tokens=args.tokens,
            temperature=1.0,
            top_p=1.0,
            eos_token_ids=[],
            suppress_token_ids=never,
            generator=torch.Generator().manual_seed(1),
        )
        assert r.completion_ids.shape == (args.prompts * args.group, args.tokens)
        return r.completion_ids

    def theirs() -> torch.Tensor:
        batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=args.group,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                suppress_tokens=never,
                eos_token_id=stop,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        assert out.shape[0] == args.prompts * args.group
        return out

    params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny model {params / 1e6:.2f}M params, {size[0]}x{size[1]} px, threads={torch.get_num_threads()}, "
        f"{args.prompts} prompts x G={args.group} x {args.tokens} tokens (forced), prompt length "
        f"{processor(text=texts, images=images, padding=True, return_tensors='pt')['input_ids'].shape[1]}"
    )
    t_ours = timed(ours, args.repeats)
    t_theirs = timed(theirs, args.repeats)
    best_o, best_t = min(t_ours), min(t_theirs)
    print(f"ours     (encode once + sample): best {best_o:.3f} s, median {statistics.median(t_ours):.3f} s")
    print(f"generate (num_return_sequences): best {best_t:.3f} s, median {statistics.median(t_theirs):.3f} s")
    print(
        f"ratio generate / ours: {best_t / best_o:.2f}x (best), "
        f"{statistics.median(t_theirs) / statistics.median(t_ours):.2f}x (median)"
    )


if __name__ == "__main__":
    main()
