"""The tiny model's coordinate frame: pixel positions in the second temporal frame of each patch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_rl.models.processor import (
    CoordinateFrameImageProcessor,
    ImageOnlyQwenVLProcessor,
    fixed_size_image_processor,
)


def _patches(processor, image: Image.Image, patch: int) -> np.ndarray:
    values = processor(images=[image], return_tensors="np")["pixel_values"]
    return values.reshape(values.shape[0], 3, 2, patch, patch)  # (patch, channel, frame, py, px)


def test_first_frame_is_the_image_and_second_holds_coordinates() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    plain = _patches(fixed_size_image_processor(56, patch_size=14, merge_size=1), image, 14)
    coord = _patches(
        fixed_size_image_processor(56, patch_size=14, merge_size=1, coordinate_frame=True), image, 14
    )
    np.testing.assert_array_equal(coord[:, :, 0], plain[:, :, 0])  # the image itself is untouched
    np.testing.assert_array_equal(plain[:, :, 1], plain[:, :, 0])  # stock: a copy of the image
    # merge 1: patches in raster order, 4 x 4 of 14 px. Hand-worked pixel centres, scaled to [-1, 1].
    for index in range(16):
        row, col = divmod(index, 4)
        xs = (col * 14 + np.arange(14) + 0.5) / 56 * 2 - 1
        ys = (row * 14 + np.arange(14) + 0.5) / 56 * 2 - 1
        np.testing.assert_allclose(coord[index, 0, 1], np.tile(xs, (14, 1)), atol=1e-6)
        np.testing.assert_allclose(coord[index, 1, 1], np.tile(ys[:, None], (1, 14)), atol=1e-6)
        assert not coord[index, 2, 1].any()


def test_merge_order_is_followed() -> None:
    """With merge 2 the processor lists patches by 2 x 2 windows; the ramps must follow that order."""
    image = Image.new("RGB", (56, 56))
    coord = _patches(
        fixed_size_image_processor(56, patch_size=14, merge_size=2, coordinate_frame=True), image, 14
    )
    # Window order: (0,0) (0,1) (1,0) (1,1) of the first 2x2 window, then the next window to the right.
    expected_cells = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for index, (row, col) in enumerate(expected_cells):
        centre_x = coord[index, 0, 1].mean()
        centre_y = coord[index, 1, 1].mean()
        assert abs(centre_x - ((col * 14 + 7) / 56 * 2 - 1)) < 1e-5
        assert abs(centre_y - ((row * 14 + 7) / 56 * 2 - 1)) < 1e-5


def test_saved_and_loaded_processor_keeps_the_coordinate_frame(tmp_path: Path, small_dir: Path) -> None:
    processor = ImageOnlyQwenVLProcessor.from_pretrained(small_dir)
    processor.image_processor = fixed_size_image_processor(
        56, patch_size=14, merge_size=1, coordinate_frame=True
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["coordinate_frame"] is True
    loaded = ImageOnlyQwenVLProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, CoordinateFrameImageProcessor)
