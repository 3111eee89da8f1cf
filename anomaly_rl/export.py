"""`python -m anomaly_rl.export run=RUN_DIR [merged=true]`: a run's trained policy, for use outside.

Writes into `out` (default: this command's own run folder, logs/export/runs/<date>_<time>/):
- `adapter/` (LoRA runs): the adapter as a standard PEFT folder (adapter_config.json,
  adapter_model.safetensors) with the processor files, which `PeftModel.from_pretrained(base,
  adapter/)` puts on the base model the run was trained from (its `model.path`);
- `merged/` (merged=true): the adapter merged into the base weights, a Hugging Face model folder
  (config.json, safetensors weights, generation_config.json, tokenizer, preprocessor and chat
  template files) that `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
  `AutoProcessor.from_pretrained` load. A full fine-tuning run has no adapter; merged=true writes
  its whole model the same way.
The processor files carry the pixel budget the run trained with (model.image_min/max_pixels).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel

from anomaly_rl.checkpoints import load_trained_policy, run_model_config, weights_folder
from anomaly_rl.models.loading import (
    KNOWN_MODELS,
    ModelConfigError,
    checkpoint_dtype,
    load_processor,
    resolve_model_dir,
)
from anomaly_rl.models.processor import (
    CoordinateFrameImageProcessor,
    ImageOnlyQwenVLProcessor,
    save_stock_processor,
)
from anomaly_rl.models.weights import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    save_adapter,
    weights_format,
)
from anomaly_rl.utils.task import save_resolved_config, task_wrapper, write_json

log = logging.getLogger("anomaly_rl")


class ExportError(ValueError):
    """The export settings ask for something the run cannot give."""


def _fresh(folder: Path) -> Path:
    """`folder`, which must not hold files yet: an export never mixes with an older one."""
    if folder.exists() and any(folder.iterdir()):
        raise ExportError(f"{folder} already holds files: delete it or choose another out=<folder>")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _model_type(model_cfg: DictConfig) -> str:
    name = str(model_cfg.get("name"))
    if name not in KNOWN_MODELS:
        raise ModelConfigError(f"model.name={name!r} is not one of {sorted(KNOWN_MODELS)}")
    return KNOWN_MODELS[name][0]


def _run_processor(folder: Path, model_cfg: DictConfig) -> ImageOnlyQwenVLProcessor:
    """The processor the run saved beside its weights, else the one its model config loads."""
    if (folder / "processor").is_dir():
        return ImageOnlyQwenVLProcessor.from_pretrained(str(folder / "processor"), local_files_only=True)
    return load_processor(resolve_model_dir(model_cfg), model_cfg)


def _warn_if_not_stock(processor: ImageOnlyQwenVLProcessor, folder: Path) -> None:
    if isinstance(processor.image_processor, CoordinateFrameImageProcessor):
        # The tiny model reads pixel coordinates from the second temporal frame; a stock
        # processor would feed it a copy of the image instead.
        log.warning(
            "%s: this model was trained with the coordinate-frame image processor (model.tiny.coordinate_frame), "
            "which stock transformers does not have; load the processor with "
            "anomaly_rl.models.processor.ImageOnlyQwenVLProcessor.from_pretrained", folder,
        )


def export_adapter(weights: Path, model_cfg: DictConfig, out: Path) -> Path:
    """Copy a run's PEFT adapter folder to `out` with the processor files; no model is loaded."""
    _fresh(out)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        shutil.copy2(weights / name, out / name)
    processor = _run_processor(weights, model_cfg)
    save_stock_processor(processor, out, _model_type(model_cfg))
    _warn_if_not_stock(processor, out)
    return out


def export_loaded(model: Any, processor: ImageOnlyQwenVLProcessor, model_type: str, out: Path,
                  merged: bool) -> dict[str, str]:
    """Write the adapter (under LoRA) and, when `merged`, the merged model of a loaded policy."""
    written: dict[str, str] = {}
    if isinstance(model, PeftModel):
        written["adapter"] = str(save_adapter(model, _fresh(out / "adapter")))
        save_stock_processor(processor, out / "adapter", model_type)
    if merged:
        folder = _fresh(out / "merged")
        # merge_and_unload folds B @ A * alpha / r into each adapted weight and drops the LoRA layers.
        base = model.merge_and_unload() if isinstance(model, PeftModel) else model
        base.eval()
        base.save_pretrained(str(folder))
        save_stock_processor(processor, folder, model_type)
        _warn_if_not_stock(processor, folder)
        written["merged"] = str(folder)
    return written


@task_wrapper
def export(cfg: DictConfig) -> dict[str, Any]:
    """Export the trained policy of `cfg.run`; returns the folders written."""
    if OmegaConf.is_missing(cfg, "run") or not cfg.get("run"):
        raise ExportError("run=<folder of an anomaly_rl.train run> is required")
    run_dir = Path(str(cfg.run)).expanduser()
    try:
        weights = weights_folder(run_dir)  # before anything is loaded: a wrong folder fails at once
    except FileNotFoundError as error:
        raise FileNotFoundError(f"run={cfg.run}: {error}") from error
    model_cfg = run_model_config(run_dir, cfg.model).copy()
    with open_dict(model_cfg):
        if cfg.get("model_path"):
            model_cfg.path = str(cfg.model_path)
        model_cfg.gradient_checkpointing = False  # loaded only to be written: no training hooks
    save_resolved_config(cfg, Path(cfg.paths.output_dir))
    out = Path(str(cfg.out)).expanduser()
    found = weights_format(weights)
    lora = found == "adapter" or str(model_cfg.get("finetune", "lora")) == "lora"
    if not lora and not cfg.merged:
        raise ExportError(
            f"run={cfg.run} was trained with model.finetune=full: it has no LoRA adapter to export; "
            "merged=true writes its whole model as a Hugging Face model folder"
        )
    if found == "adapter" and not cfg.merged:
        written = {"adapter": str(export_adapter(weights, model_cfg, out / "adapter"))}
    else:
        with open_dict(model_cfg):
            # Merging and saving in the base checkpoint's own dtype keeps the folder its size.
            model_cfg.dtype = str(cfg.dtype) if cfg.get("dtype") else checkpoint_dtype(resolve_model_dir(model_cfg))
        model, processor = load_trained_policy(model_cfg, run_dir)
        written = export_loaded(model, processor, _model_type(model_cfg), out, bool(cfg.merged))
    summary = {"run": str(run_dir), "weights": str(weights), "format": found, "model": str(model_cfg.name),
               "base_model": model_cfg.get("path"), **written}
    write_json(out / "export.json", summary)
    for kind, folder in written.items():
        print(f"{kind}: {folder}")
    if "adapter" in written:
        print(f"  PeftModel.from_pretrained(<base model from {model_cfg.get('path') or 'model.path'}>, '{written['adapter']}')")
    if "merged" in written:
        print(f"  AutoModelForImageTextToText.from_pretrained('{written['merged']}')")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
