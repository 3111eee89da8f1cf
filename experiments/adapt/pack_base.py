"""Copy a base's final weights into the repository compactly: `pack_base.py RUN_DIR OUT_DIR`.

Writes OUT_DIR/weights.pt (every tensor in float16: about 11 MB for the 5.4M-parameter tiny model;
`load_policy_weights` casts back to the model's float32), meta.json (the tokenizer fingerprint),
config.yaml (the run's resolved config) and test_metrics.md (its test split evaluation).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def pack(run_dir: Path, out_dir: Path) -> None:
    final = run_dir / "final"
    state = torch.load(final / "weights.pt", map_location="cpu", weights_only=True)
    packed = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    torch.save(packed, out_dir / "weights.pt")
    shutil.copy(final / "meta.json", out_dir / "meta.json")
    text = (run_dir / "config.yaml").read_text(encoding="utf-8").replace(f"{ROOT}/", "")
    (out_dir / "config.yaml").write_text(text, encoding="utf-8")
    for name in ("eval_sft/metrics.md",):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, out_dir / "test_metrics.md")


if __name__ == "__main__":
    pack(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"packed {sys.argv[1]} -> {sys.argv[2]}")
