"""The processor used for every model, tiny or real: Qwen2.5-VL's, without the video processor.

Why a subclass: transformers 5 builds Qwen's video processor on torchvision, which this project
does not install (and never needs: inputs are still images). The subclass declares only the
image processor and the tokenizer, so `from_pretrained` loads a real checkpoint's folder and our
tiny model's folder through the same code, and never touches torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

PREPROCESSOR_FILE = "preprocessor_config.json"
# The stock processor class per config.json model_type, as published checkpoints name it.
STOCK_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL (and Qwen2-VL: same image-token logic) processor for still images only."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # ProcessorMixin zips positional args with the attributes found in this signature
        # (image_processor, tokenizer), so the parent's third positional (video processor) is dropped.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(
        cls, pretrained_model_name_or_path: Any, processor_dict: dict | None = None, **kwargs: Any
    ) -> list[Any]:
        """Load the image processor by class, not through AutoImageProcessor.

        Checkpoints name their image processor inconsistently (Qwen2VLImageProcessor,
        Qwen2_5_VLImageProcessor — a class transformers 5 no longer has), and the auto class would
        pick the torchvision backend when available; every Qwen-VL checkpoint's settings fit the PIL
        Qwen2-VL image processor, so we always build that one.
        """
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, **kwargs)
        image_config = (processor_dict or {}).get("image_processor")
        if isinstance(image_config, dict):  # processor_config.json (transformers 5 layout)
            config = {k: v for k, v in image_config.items() if k != "image_processor_type"}
            if config.pop("coordinate_frame", False):
                image_processor = CoordinateFrameImageProcessor(**config)
            else:
                image_processor = Qwen2VLImageProcessorPil(**config)
        else:  # preprocessor_config.json (the layout of published checkpoints and of our exports)
            # An exported tiny model keeps its coordinate frame in that file (save_stock_processor).
            image_class = (
                CoordinateFrameImageProcessor
                if _preprocessor_config(pretrained_model_name_or_path).get("coordinate_frame")
                else Qwen2VLImageProcessorPil
            )
            image_processor = image_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]


def _preprocessor_config(folder: Any) -> dict[str, Any]:
    path = Path(str(folder)) / PREPROCESSOR_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save_stock_processor(processor: ImageOnlyQwenVLProcessor, folder: str | Path, model_type: str) -> Path:
    """Write `processor` in the published Qwen-VL layout, which stock transformers loads.

    Our own `save_pretrained` names this subclass in processor_config.json, a class that
    `AutoProcessor` outside this project cannot find. The published layout — preprocessor_config.json
    naming `Qwen2VLImageProcessor` (a class of transformers 4.x and 5), tokenizer files,
    chat_template.json — is read by `AutoProcessor.from_pretrained` (which, in transformers 5, also
    builds Qwen's video processor and so needs torchvision) and by this project's loader. The pixel
    budget written is the one the model was trained with (model.image_min/max_pixels), not the
    base checkpoint's.
    """
    if model_type not in STOCK_PROCESSOR_CLASS:
        raise ValueError(f"no stock processor for model_type={model_type!r}; known: {sorted(STOCK_PROCESSOR_CLASS)}")
    processor_class = STOCK_PROCESSOR_CLASS[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = processor.image_processor.to_dict()
    size = dict(image.get("size") or {})
    image.update(
        image_processor_type="Qwen2VLImageProcessor",
        processor_class=processor_class,
        # transformers 4.x reads the budget from these two keys, 5 from `size`: write both.
        min_pixels=size.get("shortest_edge"),
        max_pixels=size.get("longest_edge"),
    )
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(image, indent=2, default=int) + "\n", encoding="utf-8")
    processor.tokenizer.save_pretrained(str(folder))
    template = processor.chat_template
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["processor_class"] = processor_class
    for key in ("is_local", "local_files_only"):  # loading arguments transformers 5 echoes back
        config.pop(key, None)
    if template:
        config["chat_template"] = template  # where transformers 4.4x tokenizers look for it
        (folder / "chat_template.json").write_text(
            json.dumps({"chat_template": template}, indent=2) + "\n", encoding="utf-8"
        )
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


class CoordinateFrameImageProcessor(Qwen2VLImageProcessorPil):
    """Qwen's PIL image processor whose second temporal frame holds pixel coordinates, not a copy.

    Why: a still image fills Qwen's two-frame temporal patch with two copies of itself. The vision
    tower has only rotary (relative) positions and the LM reads image tokens through attention,
    whose values carry no position either, so a from-scratch tiny model can tell *that* a patch is
    defective but hardly *where* it is: it learned box rows (from the raster order of the tokens)
    and not columns. Writing x and y ramps (-1 at the left/top edge, +1 at the right/bottom) into
    the second frame gives the patch embedding an absolute position, as CoordConv does, inside the
    stock Qwen2.5-VL architecture. Only the tiny model uses it: real checkpoints were trained on
    duplicated frames.
    """

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["coordinate_frame"] = True
        return output

    def patchify(
        self, image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
    ) -> tuple[np.ndarray, int, int]:
        if temporal_patch_size < 2:
            raise ValueError("the coordinate frame needs temporal_patch_size >= 2")
        channels, height, width = np.asarray(image).shape
        flat, grid_h, grid_w = super().patchify(image, patch_size, merge_size, temporal_patch_size)
        ys, xs = np.meshgrid(
            (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1,
            (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1,
            indexing="ij",
        )
        coords = np.zeros((channels, height, width), dtype=np.float32)
        coords[0], coords[1] = xs, ys
        # The same layout as the parent's patches, so that the frame lines up with its image patch.
        coord_flat, _, _ = super().patchify(coords, patch_size, merge_size, temporal_patch_size)
        shape = (grid_h * grid_w, channels, temporal_patch_size, patch_size * patch_size)
        patches = np.array(flat, dtype=np.float32).reshape(shape)
        patches[:, :, 1] = coord_flat.reshape(shape)[:, :, 1]
        return patches.reshape(flat.shape), grid_h, grid_w


def fixed_size_image_processor(
    image_size: int,
    *,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int = 2,
    coordinate_frame: bool = False,
) -> Qwen2VLImageProcessorPil:
    """A PIL image processor whose min = max pixel budget is image_size**2.

    With both bounds equal, a square image_size input is left at image_size x image_size, giving an
    (image_size / patch_size)^2 patch grid; other shapes keep their aspect ratio at about that area.
    """
    factor = patch_size * merge_size
    if image_size % factor:
        raise ValueError(
            f"model.tiny.image_size={image_size} must be a multiple of patch_size*spatial_merge_size={factor}"
        )
    pixels = image_size * image_size
    cls = CoordinateFrameImageProcessor if coordinate_frame else Qwen2VLImageProcessorPil
    return cls(
        min_pixels=pixels,
        max_pixels=pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
