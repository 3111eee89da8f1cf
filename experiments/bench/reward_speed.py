"""How long parsing and scoring take for a batch of responses, on one CPU core.

    .venv/bin/python experiments/bench/reward_speed.py [--n 4096] [--repeats 5]

The responses mix exact SFT targets, perturbed ones (shifted and extra boxes, wrong or wordy
answers, truncation) and garbage, over normal and anomalous samples with 1-3 boxes, so every
branch of every reward is exercised. Prints the best-of-repeats wall time per stage.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: one core means one thread too

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from anomaly_rl.data.records import Sample  # noqa: E402
from anomaly_rl.models.frame import Frame  # noqa: E402
from anomaly_rl.rewards.adfm import AdfmReward  # noqa: E402
from anomaly_rl.rewards.binary import BinaryReward  # noqa: E402
from anomaly_rl.rewards.iou import IouReward  # noqa: E402
from anomaly_rl.rewards.roam import RoamReward  # noqa: E402
from anomaly_rl.schemas.config import load_schema  # noqa: E402


def make_batch(n: int, seed: int = 0) -> tuple[list[str], list[Sample], list[Frame]]:
    rng = random.Random(seed)
    schema = load_schema("adfm")
    texts, samples, frames = [], [], []
    for _ in range(n):
        size = (rng.randint(200, 1024), rng.randint(200, 1024))
        if rng.random() < 0.5:
            sample = Sample("x", "normal", "pill", "good", None, (), size, "test")
        else:
            boxes = []
            for _ in range(rng.randint(1, 3)):
                x1, y1 = rng.uniform(0, size[0] * 0.8), rng.uniform(0, size[1] * 0.8)
                boxes.append((x1, y1, x1 + rng.uniform(5, size[0] * 0.2), y1 + rng.uniform(5, size[1] * 0.2)))
            sample = Sample("x", "anomalous", "pill", "crack", None, tuple(boxes), size, "test")
        frame = Frame(size, (112, 112))
        text = schema.render(sample, frame.to_model(sample.boxes), rng, model_size=frame.model_size)
        kind = rng.random()
        if kind < 0.2:
            text = text.replace("]", "], [5, 5, 50, 60]", 1)  # an extra box
        elif kind < 0.35:
            text = text.replace("<answer>a</answer>", "<answer>I think a</answer>")
        elif kind < 0.45:
            text = text[: rng.randint(0, len(text))]  # truncated by max_new_tokens
        elif kind < 0.5:
            text = "".join(rng.choice("<>/[],0123456789 abthinkrewsa") for _ in range(rng.randint(0, 200)))
        texts.append(text)
        samples.append(sample)
        frames.append(frame)
    return texts, samples, frames


def best_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # pin to one core
    texts, samples, frames = make_batch(args.n)
    schema = load_schema("adfm")

    def parse_all():  # type: ignore[no-untyped-def]
        out = []
        for text, frame in zip(texts, frames, strict=True):
            parsed = schema.parse(text)
            out.append(parsed.with_boxes(frame.to_original(parsed.boxes)))
        return out

    print(f"{args.n} responses, one core, best of {args.repeats}")
    print(f"  parse + map to original frame: {best_time(parse_all, args.repeats):.3f} s")
    parsed = parse_all()
    for reward in (AdfmReward(), BinaryReward(), RoamReward(), IouReward()):
        seconds = best_time(lambda r=reward: r(parsed, samples), args.repeats)
        print(f"  {type(reward).__name__:12s} score: {seconds:.3f} s")


if __name__ == "__main__":
    main()
