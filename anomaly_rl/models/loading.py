"""Load a model and its processor from the `model` config group; apply freezing and LoRA.

Every model, the tiny one included, is loaded from a local folder by the same code: the tiny model is
first built into a cache folder (see tiny.py), real ones must have been downloaded beforehand. No
network is used at run time (`local_files_only=True`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers.image_utils import SizeDict

from anomaly_rl.models.processor import ImageOnlyQwenVLProcessor
from anomaly_rl.models.tiny import TinyModelSpec, tiny_model_dir
from anomaly_rl.models.weights import MODEL_NAME_ATTRIBUTE

# name -> (expected config.json model_type, Hugging Face repository to download it from)
KNOWN_MODELS: dict[str, tuple[str, str | None]] = {
    "tiny": ("qwen2_5_vl", None),
    "qwen2_vl_2b": ("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"),
    "qwen2_5_vl_3b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2_5_vl_7b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Linear layers of the language model in both Qwen2-VL and Qwen2.5-VL (all-linear minus lm_head).
LM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelConfigError(ValueError):
    """A `model.*` setting is missing or invalid."""


class ModelWeightsNotFoundError(FileNotFoundError):
    """A real model's weights are not where `model.path` says."""


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' means bfloat16 on a GPU and float32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ModelConfigError(f"model.dtype={name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def resolve_model_dir(cfg: Mapping[str, Any]) -> Path:
    """The local folder to load from: the tiny model's cache folder, or model.path for real models."""
    name = cfg.get("name")
    if name not in KNOWN_MODELS:
        raise ModelConfigError(f"model.name={name!r} is not one of {sorted(KNOWN_MODELS)}")
    path = cfg.get("path")
    if name == "tiny" and not path:
        cache_dir = cfg.get("cache_dir")
        if not cache_dir:
            raise ModelConfigError(
                "model.cache_dir must be set to build the tiny model (default ${paths.cache_dir}/tiny_models)"
            )
        return tiny_model_dir(TinyModelSpec.from_mapping(cfg.get("tiny")), cache_dir)
    repo = cfg.get("hf_repo") or KNOWN_MODELS[name][1] or "<repo>"
    how = (
        f"download the weights once with\n  huggingface-cli download {repo} --local-dir <folder>\n"
        f"then run with model.path=<folder>"
    )
    if not path:
        raise ModelWeightsNotFoundError(f"model.path is not set for model.name={name}; {how}")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelWeightsNotFoundError(
            f"model.path={folder} holds no config.json (model.name={name}); {how}"
        )
    return folder


def check_model_folder(cfg: Mapping[str, Any]) -> Path:
    """The model folder `cfg` names, checked without loading anything: it exists, holds a
    config.json, and that config is of the architecture model.name expects."""
    folder = resolve_model_dir(cfg)
    if cfg.get("path"):
        _check_model_type(folder, str(cfg.get("name")))
    return folder


def checkpoint_dtype(folder: str | Path) -> str:
    """The dtype a checkpoint folder's weights are stored in ("bfloat16" for Qwen's), from its
    config.json (`dtype` since transformers 5, `torch_dtype` before); "float32" when it says none."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def _check_model_type(folder: Path, name: str) -> None:
    expected = KNOWN_MODELS[name][0]
    found = json.loads((folder / "config.json").read_text()).get("model_type")
    if found != expected:
        raise ModelConfigError(
            f"model.name={name} expects a {expected} checkpoint but {folder / 'config.json'} has model_type={found!r}"
        )


def load_processor(folder: Path, cfg: Mapping[str, Any]) -> ImageOnlyQwenVLProcessor:
    """The image-only processor from `folder`; model.image_min/max_pixels override its pixel budget."""
    processor = ImageOnlyQwenVLProcessor.from_pretrained(str(folder), local_files_only=True)
    ip = processor.image_processor
    lo, hi = cfg.get("image_min_pixels"), cfg.get("image_max_pixels")
    if lo is not None or hi is not None:
        lo = int(lo if lo is not None else ip.size["shortest_edge"])
        hi = int(hi if hi is not None else ip.size["longest_edge"])
        if lo > hi:
            raise ModelConfigError(f"model.image_min_pixels={lo} exceeds model.image_max_pixels={hi}")
        ip.size = SizeDict(shortest_edge=lo, longest_edge=hi)
    return processor


def _vision_module(model: PreTrainedModel) -> nn.Module:
    return model.model.visual


def lora_target_modules(model: PreTrainedModel, target_modules: Any, freeze_vision: bool) -> str | list[str]:
    """peft `target_modules`: as configured, but restricted to the language model when vision is frozen.

    Why: "all-linear" (and names such as gate_proj, shared by the ViT's MLP) would otherwise put
    adapters into a tower we promised to keep fixed — and image features are computed once per
    step on the assumption that the vision tower is not being adapted.
    """
    if not freeze_vision:
        return target_modules if isinstance(target_modules, str) else list(target_modules)
    if target_modules == "all-linear":
        names = {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".language_model." in f".{n}."
        }
    elif isinstance(target_modules, str):
        raise ModelConfigError(
            f"model.lora.target_modules={target_modules!r}: use 'all-linear' or a list of module names"
        )
    else:
        names = set(target_modules)
    if not names:
        raise ModelConfigError("model.lora.target_modules selects no layer of the language model")
    # peft treats a string as a regex that must match the full module name.
    return r".*\.language_model\..*\.(" + "|".join(sorted(map(re.escape, names))) + r")"


def apply_finetuning(model: PreTrainedModel, cfg: Mapping[str, Any]) -> PreTrainedModel | PeftModel:
    """Freeze the vision tower if asked, then wrap in LoRA or leave everything else trainable."""
    freeze_vision = bool(_get(cfg, "freeze_vision", True))
    finetune = _get(cfg, "finetune", "lora")
    if finetune not in ("lora", "full"):
        raise ModelConfigError(f"model.finetune={finetune!r} must be 'lora' or 'full'")
    if finetune == "lora":
        lora = dict(_get(cfg, "lora", {}))
        peft_config = LoraConfig(
            r=int(lora.get("r", 64)),
            lora_alpha=int(lora.get("alpha", 128)),
            lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=lora_target_modules(
                model, lora.get("target_modules", "all-linear"), freeze_vision
            ),
            bias="none",
        )
        model = get_peft_model(model, peft_config)
    if freeze_vision:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        _vision_module(base).requires_grad_(False)
    return model


def load_model_and_processor(
    cfg: Mapping[str, Any],
) -> tuple[PreTrainedModel | PeftModel, ImageOnlyQwenVLProcessor]:
    """Load the model named by the `model` config group, ready to train, and its processor."""
    folder = resolve_model_dir(cfg)
    name = cfg.get("name")
    _check_model_type(folder, name)
    attn = _get(cfg, "attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise ModelConfigError(f"model.attn_implementation={attn!r} must be sdpa, eager or flash_attention_2")
    model = AutoModelForImageTextToText.from_pretrained(
        str(folder),
        dtype=resolve_dtype(_get(cfg, "dtype", "auto")),
        attn_implementation=attn,
        local_files_only=True,
    )
    if _get(cfg, "gradient_checkpointing", False):
        # Non-reentrant checkpointing needs no input-grad hack under LoRA (frozen embeddings).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    setattr(model, MODEL_NAME_ATTRIBUTE, name)  # read back by save_policy for meta.json
    model = apply_finetuning(model, cfg)
    processor = load_processor(folder, cfg)
    return model, processor
