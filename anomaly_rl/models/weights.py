"""Saving and loading the trained part of a policy (the adapter under LoRA, all weights otherwise).

Two formats, told apart by their files:
- LoRA: a standard PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`), so that
  `PeftModel.from_pretrained(base, folder)` loads it outside this project too;
- full fine-tuning, and LoRA folders written before the adapter format: `weights.pt`, a torch
  state dict of the tensors that train (every tensor under full fine-tuning). A whole Hugging Face
  model folder per phase would cost the base model's size each time; `python -m anomaly_rl.export
  merged=true` writes one when it is wanted.

Either way the folder also holds `processor/` and `meta.json` (the tokenizer's fingerprint and the
`model.name` the weights were trained for). Loading checks that every tensor found its place in the
model it is loaded into, and that the tokenizer is the one the weights were trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for the one adapter a run trains

BAKED_DIR = "baked"  # adapters folded into the base weights before this one was trained, in order
BAKED_ATTRIBUTE = "anomaly_rl_baked_adapters"  # on the PeftModel: the folders of those adapters

# Set by `load_model_and_processor` on the transformers model (a plain attribute: never written to
# config.json), so that `save_policy` records which `model.name` its weights belong to without
# every caller having to pass it.
MODEL_NAME_ATTRIBUTE = "anomaly_rl_model_name"


class WeightsMismatchError(ValueError):
    """Saved weights do not fit the model they are loaded into (another model, tokenizer or LoRA)."""


def tokenizer_fingerprint(processor: Any) -> str:
    """A hash of the vocabulary: weights trained under another tokenizer would load without a shape
    error (same size, other token ids) and silently mean nothing."""
    vocab = sorted(processor.tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode("utf-8")).hexdigest()[:16]


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def model_name_of(model: torch.nn.Module) -> str | None:
    """The `model.name` a loaded model was built from, when `load_model_and_processor` built it."""
    return getattr(_base_model(model), MODEL_NAME_ATTRIBUTE, None)


def weights_format(folder: str | Path) -> str | None:
    """'adapter' (a PEFT adapter folder), 'state_dict' (weights.pt) or None (no trained weights)."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG_FILE).is_file() and (folder / ADAPTER_WEIGHTS_FILE).is_file():
        return "adapter"
    if (folder / WEIGHTS_FILE).is_file():
        return "state_dict"
    return None


def has_trained_weights(folder: str | Path) -> bool:
    return weights_format(folder) is not None


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def recorded_model_name(folder: str | Path) -> str | None:
    """The `model.name` the weights in `folder` were trained for, or None when nothing records it.

    Looked up in meta.json (written since the name was recorded), then in the run config beside
    the weights: `config.yaml` of the folder or of its run folder (a phase folder `final/`, `sft/`
    sits in one), then any `*config.yaml` in the folder (the committed warm start keeps its two
    stages' configs as stage1_config.yaml and stage2_config.yaml).
    """
    folder = Path(folder)
    name = read_meta(folder).get("model_name")
    if name:
        return str(name)
    candidates = [folder / "config.yaml", folder.parent / "config.yaml", *sorted(folder.glob("*config.yaml"))]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict) and model.get("name"):
            return str(model["name"])
    return None


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under LoRA (the base never changes); every tensor otherwise.

    Not "the parameters that require grad now": a phase may freeze a part that an earlier phase
    trained (GRPO's `algo.train_vision=false` after SFT), and that part must be saved too.
    """
    if isinstance(model, PeftModel):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_adapter(model: PeftModel, folder: str | Path) -> Path:
    """Write `model`'s LoRA adapter as a PEFT adapter folder; each file replaced atomically.

    Saved through a scratch folder and moved into place file by file, so that a crash mid-write
    never leaves a torn safetensors file where a previous adapter was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    try:
        # save_embedding_layers=False: we never adapt embeddings, and "auto" may look the base up
        # on the Hub to compare vocabularies.
        model.save_pretrained(str(scratch), safe_serialization=True, save_embedding_layers=False)
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            os.replace(scratch / name, folder / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def save_policy(model: torch.nn.Module, processor: Any, folder: str | Path, model_name: str | None = None) -> Path:
    """Save the trained part of `model` (format: module docstring), its processor and meta.json.

    `model_name` (the config's `model.name`) defaults to the name the loader recorded on the model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        save_adapter(model, folder)
        _save_baked(model, folder)
        stale = [folder / WEIGHTS_FILE]
    else:
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        torch.save(trainable_state_dict(model), tmp)
        tmp.replace(folder / WEIGHTS_FILE)  # atomic: a crash mid-write never leaves a torn file
        stale = [folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE]
    for path in stale:  # one format per folder, so that loading never has to pick between two
        path.unlink(missing_ok=True)
    meta: dict[str, Any] = {
        "format": weights_format(folder),
        "model_name": model_name or model_name_of(model),
        "base_model": str(getattr(_base_model(model), "name_or_path", "") or "") or None,
    }
    if processor is not None:
        processor.save_pretrained(folder / "processor")
        meta["tokenizer_fingerprint"] = tokenizer_fingerprint(processor)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def check_tokenizer(folder: str | Path, processor: Any, model: torch.nn.Module | None = None) -> None:
    """Raise when the weights in `folder` were trained under another tokenizer than `processor`'s."""
    meta = read_meta(folder)
    saved = meta.get("tokenizer_fingerprint")
    if not saved or saved == tokenizer_fingerprint(processor):
        return
    ours = model_name_of(model) if model is not None else None
    theirs = recorded_model_name(folder)
    if ours and theirs and ours != theirs:
        raise WeightsMismatchError(
            f"{folder} holds weights trained for model.name={theirs}, but this model is model.name={ours} "
            f"(tokenizer fingerprint {saved} vs {tokenizer_fingerprint(processor)}): weights of one model "
            "do not fit another; start from the pretrained weights or give a checkpoint of this model"
        )
    raise WeightsMismatchError(
        f"{folder} was trained with another tokenizer than this model's (fingerprint {saved} vs "
        f"{tokenizer_fingerprint(processor)}): either it belongs to another model (check model.name and "
        "model.path), or — for the tiny model — its config or the schema texts its tokenizer is built "
        "from have changed since; retrain it or use matching settings"
    )


def load_policy_weights(model: torch.nn.Module, folder: str | Path, processor: Any = None) -> int:
    """Load weights saved by `save_policy` (either format); returns the number of tensors loaded.

    With `processor`, also checks that the weights were trained under the same tokenizer.
    """
    folder = Path(folder)
    if processor is not None:
        check_tokenizer(folder, processor, model)
    found = weights_format(folder)
    if found is None:
        raise FileNotFoundError(
            f"no trained weights in {folder}: expected {ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE} (LoRA) "
            f"or {WEIGHTS_FILE}, as written by `anomaly_rl.train` into a run's `final/` or `sft/` folder"
        )
    if found == "adapter":
        already = getattr(model, BAKED_ATTRIBUTE, [])
        for index, baked in enumerate(_baked_folders(folder)):  # the adapters under this one, folded in first
            if index < len(already):
                if _adapter_digest(already[index]) != _adapter_digest(baked):
                    raise WeightsMismatchError(
                        f"{folder} was trained on top of the adapter in {baked}, but this model has "
                        f"another one folded into its weights ({already[index]}): load it into a fresh model"
                    )
                continue  # folded in already (this process baked it before training)
            _load_adapter(model, baked)
            bake_adapter(model, baked)
        return _load_adapter(model, folder)
    return _load_state_dict(model, folder / WEIGHTS_FILE)


def bake_adapter(model: PeftModel, saved_in: str | Path) -> None:
    """Fold the LoRA adapter into the base weights, in place, and restart it from its initial state
    (B = 0), so that the policy is unchanged and the adapter-off model — GRPO's reference under
    LoRA — becomes this policy instead of the pretrained model.

    `saved_in` is the folder the adapter was saved in (a `save_policy` folder): later saves of this
    model copy it under `baked/`, so that loading them folds the same adapter in first.
    Not peft's `merge_adapter`, which `disable_adapter` would undo.
    """
    if not isinstance(model, PeftModel):
        raise WeightsMismatchError("only a LoRA policy (model.finetune=lora) has an adapter to fold in")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                base = module.get_base_layer()
                base.weight += module.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)
                module.reset_lora_parameters(ADAPTER_NAME, init_lora_weights=True)
    setattr(model, BAKED_ATTRIBUTE, [*getattr(model, BAKED_ATTRIBUTE, []), Path(saved_in)])


def _adapter_digest(folder: str | Path) -> str:
    return hashlib.sha256((Path(folder) / ADAPTER_WEIGHTS_FILE).read_bytes()).hexdigest()


def _baked_folders(folder: Path) -> list[Path]:
    root = folder / BAKED_DIR
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: int(p.name)) if root.is_dir() else []


def _save_baked(model: PeftModel, folder: Path) -> None:
    """Copy the adapters folded into `model`'s base weights under `folder/baked/<i>/`, in order."""
    target = folder / BAKED_DIR
    sources = getattr(model, BAKED_ATTRIBUTE, [])
    if target.exists() and all(not str(s).startswith(str(target)) for s in sources):
        shutil.rmtree(target)
    for index, source in enumerate(sources):
        dest = target / str(index)
        if Path(source).resolve() == dest.resolve():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
            shutil.copyfile(Path(source) / name, dest / name)


def _load_state_dict(model: torch.nn.Module, path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise WeightsMismatchError(
            f"{path} holds {len(unknown)} tensors this model does not have (first: {unknown[:3]}); "
            "was it trained with another model config or LoRA setting (model.finetune, model.lora.*)?"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise WeightsMismatchError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return len(state)


def _load_adapter(model: torch.nn.Module, folder: Path) -> int:
    """Load a PEFT adapter folder into the (already LoRA-wrapped) `model`, checking that it fits."""
    if not isinstance(model, PeftModel):
        raise WeightsMismatchError(
            f"{folder} holds a LoRA adapter but this model is not under LoRA (model.finetune=full); "
            "load it with model.finetune=lora and the model.lora settings it was trained with"
        )
    saved = LoraConfig.from_pretrained(str(folder))
    ours = model.peft_config[ADAPTER_NAME]
    for setting, theirs, mine in (("r", saved.r, ours.r), ("alpha", saved.lora_alpha, ours.lora_alpha)):
        if theirs != mine:
            raise WeightsMismatchError(
                f"{folder} was trained with model.lora.{setting}={theirs}, this model has model.lora.{setting}={mine}"
            )
    state = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    # The adapter's own names (".default" stripped), as peft writes and reads them.
    expected = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        raise WeightsMismatchError(
            f"{folder / ADAPTER_WEIGHTS_FILE} does not fit this model's LoRA layers ({len(unknown)} tensors "
            f"it does not have, first {unknown[:2]}; {len(missing)} it lacks, first {missing[:2]}): was it "
            "trained with other model.lora.target_modules, model.freeze_vision or another model?"
        )
    for key, tensor in state.items():
        if expected[key].shape != tensor.shape:
            raise WeightsMismatchError(
                f"{folder / ADAPTER_WEIGHTS_FILE}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"this model's LoRA expects {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    return len(state)
