"""Saving and loading the trained part of a policy (the adapter under LoRA, all weights otherwise).

Only parameters that train are written: a LoRA run's folder holds megabytes, not the base model,
and loading checks that every one of them found its place in the model it is loaded into.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


def tokenizer_fingerprint(processor: Any) -> str:
    """A hash of the vocabulary: weights trained under another tokenizer would load without a shape
    error (same size, other token ids) and silently mean nothing."""
    vocab = sorted(processor.tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode("utf-8")).hexdigest()[:16]


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under LoRA (the base never changes); every tensor otherwise.

    Not "the parameters that require grad now": a phase may freeze a part that an earlier phase
    trained (GRPO's `algo.train_vision=false` after SFT), and that part must be saved too.
    """
    if isinstance(model, PeftModel):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_policy(model: torch.nn.Module, processor: Any, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    torch.save(trainable_state_dict(model), tmp)
    tmp.replace(folder / WEIGHTS_FILE)  # atomic: a crash mid-write never leaves a torn file
    if processor is not None:
        processor.save_pretrained(folder / "processor")
        meta = {"tokenizer_fingerprint": tokenizer_fingerprint(processor)}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def load_policy_weights(model: torch.nn.Module, folder: str | Path, processor: Any = None) -> int:
    """Load weights saved by `save_policy`; returns the number of tensors loaded.

    With `processor`, also checks that the weights were trained under the same tokenizer.
    """
    path = Path(folder) / WEIGHTS_FILE
    meta_path = Path(folder) / META_FILE
    if processor is not None and meta_path.is_file():
        saved = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer_fingerprint")
        if saved and saved != tokenizer_fingerprint(processor):
            raise ValueError(
                f"{folder} was trained with another tokenizer than this model's (fingerprint {saved} vs "
                f"{tokenizer_fingerprint(processor)}): the model config or the schema texts the tiny "
                "tokenizer is built from have changed since; retrain it or use matching settings"
            )
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights at {path}: expected a run folder written by `anomaly_rl.train` "
            "(its `final/` or `sft/` sub-folder holds weights.pt)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(
            f"{path} holds {len(unknown)} tensors this model does not have (first: {unknown[:3]}); "
            "was it trained with another model config or LoRA setting?"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, model expects {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=False)
    return len(state)
