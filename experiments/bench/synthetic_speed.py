"""Throughput of the synthetic generator (render + PNG write), single process.

    .venv/bin/python experiments/bench/synthetic_speed.py [--images 1000] [--size 128]

The issue's bar: 1,000 images of 128x128 in under a minute on one core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from anomaly_rl.data.synthetic import CATEGORIES, SyntheticConfig, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="total images (split over 4 categories)")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    per_category = args.images // len(CATEGORIES)
    # Half normal, half anomalous, so defect painting and mask writing are both measured.
    config = SyntheticConfig(image_size=args.size, train_good=per_category // 4, test_good=per_category // 4,
                             test_anomalous=per_category - 2 * (per_category // 4),
                             defect_size=(12, min(40, args.size // 2)))
    total = per_category * len(CATEGORIES)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate(Path(tmp) / "synthetic", config, progress=False)
        elapsed = time.perf_counter() - start
    print(f"{total} images of {args.size}x{args.size} in {elapsed:.2f} s: {total / elapsed:.0f} images/s "
          f"({'under' if elapsed < 60 else 'OVER'} the 60 s bar)")


if __name__ == "__main__":
    main()
