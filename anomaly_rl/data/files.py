"""Cheap, checked access to image and mask files.

Readers touch every file of a dataset, so images are only checked through their headers (and
PNG chunk checksums / the JPEG end marker, which catch truncation without decoding pixels);
masks are decoded fully because their pixels are needed for the boxes anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_rl.data.boxes import binarise
from anomaly_rl.data.errors import DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_JPEG_END = b"\xff\xd9"


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so reads are deterministic."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, after a truncation check that does not decode pixels."""
    try:
        with Image.open(path) as image:
            size = image.size
            fmt = image.format
            if fmt == "PNG":
                image.verify()  # walks the chunks and their CRCs up to IEND
            elif fmt == "JPEG":
                with open(path, "rb") as handle:
                    handle.seek(-min(64, path.stat().st_size), 2)
                    if _JPEG_END not in handle.read():
                        raise OSError("JPEG end-of-image marker missing (file truncated)")
            else:
                image.load()  # BMP/TIFF: no cheap integrity check, and they decode fast
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"unreadable or truncated image {path}: {exc}") from exc
    return int(size[0]), int(size[1])


def read_mask(path: Path) -> np.ndarray:
    """A decoded mask as a boolean array (value > 0 is defect)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGB")  # palette index 0 is not necessarily black
            elif image.mode in ("RGBA", "LA", "PA"):
                image = image.convert(image.mode[:-1] if image.mode != "PA" else "RGB")
            array = np.asarray(image)
    except Exception as exc:
        raise DataError(f"unreadable or truncated mask {path}: {exc}") from exc
    return binarise(array)


def read_mask_union(paths: Iterable[Path]) -> np.ndarray:
    """MVTec LOCO stores one mask per defect in a folder; the image's defect is their union."""
    union: np.ndarray | None = None
    for path in paths:
        mask = read_mask(path)
        if union is None:
            union = mask
        elif union.shape != mask.shape:
            raise DataError(f"mask {path} has shape {mask.shape}, other masks of the same image {union.shape}")
        else:
            union = union | mask
    if union is None:
        raise DataError("no mask files given")
    return union


def load_rgb(path: str | Path) -> Image.Image:
    """The image as RGB at its original size (greyscale datasets such as MVTec grid included)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:
        raise DataError(f"unreadable image {path}: {exc}") from exc


def read_sample_mask(mask_path: str | Path) -> np.ndarray:
    """The mask a reader recorded: a file, or (MVTec LOCO) a folder whose masks are united."""
    path = Path(mask_path)
    if path.is_dir():
        return read_mask_union(list_images(path))
    return read_mask(path)
