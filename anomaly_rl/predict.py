"""`python -m anomaly_rl.predict ckpt=RUN_DIR image=PATH`: answer for one image, boxes drawn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from anomaly_rl.checkpoints import load_trained_policy, run_config, run_prompt_settings
from anomaly_rl.data.files import image_size as read_image_size
from anomaly_rl.data.records import Sample
from anomaly_rl.evaluation.placement import on_accelerator, placement_trainer
from anomaly_rl.evaluation.runner import predict as predict_samples
from anomaly_rl.utils.task import task_wrapper, write_json

log = logging.getLogger("anomaly_rl")


def draw_boxes(image_path: str | Path, boxes: list[list[float]], out: str | Path, colour: str = "red") -> Path:
    """The image with the boxes (original pixels) outlined, saved as PNG."""
    image = Image.open(image_path).convert("RGB")
    pen = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 100))
    for x1, y1, x2, y2 in boxes:
        pen.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


@task_wrapper
def predict(cfg: DictConfig) -> dict[str, Any]:
    image_path = Path(cfg.image).expanduser()
    if not image_path.is_file():
        raise FileNotFoundError(f"image={cfg.image}: no such file")
    run = run_config(cfg.ckpt) if cfg.get("ckpt") else None
    model_cfg, schema_cfg, max_new_tokens = run_prompt_settings(
        cfg.get("ckpt"), cfg.model, cfg.schema, cfg.get("max_new_tokens")
    )
    model, processor = load_trained_policy(model_cfg, cfg.get("ckpt"))
    schema = hydra.utils.instantiate(schema_cfg)
    references = (str(Path(cfg.reference).expanduser()),) if cfg.get("reference") else ()
    trained_with = int(OmegaConf.select(run, "data.num_references", default=0) or 0) if run is not None else 0
    if trained_with and not references:
        log.warning("the run was trained with %d normal reference image(s) beside each query "
                    "(data.num_references); pass reference=<a normal image of the same category>", trained_with)
    sample = Sample(
        image_path=str(image_path), label="normal", category=str(cfg.category), defect_type="unknown",
        mask_path=None, boxes=(), image_size=read_image_size(image_path), split="predict",
        reference_paths=references,
    )
    with on_accelerator(model, placement_trainer(cfg.trainer)):
        [prediction] = predict_samples(
            model, processor, schema, [sample], batch_size=1, max_new_tokens=max_new_tokens, progress=False
        )
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / "prediction.png"
    draw_boxes(image_path, prediction["pred_boxes"], out)
    decision = {"a": "anomalous", "b": "normal"}.get(prediction["answer"] or "", "undecided")
    result = {
        "image": str(image_path), "response": prediction["response"], "decision": decision,
        "p_anomalous": prediction["p_anomalous"], "boxes": prediction["pred_boxes"], "png": str(out),
    }
    write_json(Path(cfg.paths.output_dir) / "prediction.json", result)
    print(prediction["response"])
    print(f"decision: {decision} (p_anomalous={prediction['p_anomalous']:.3f}); boxes drawn in {out}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
