"""Reader names as the config uses them (`data.reader`), mapped to their functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.mvtec import read_mvtec
from anomaly_rl.data.records import Sample
from anomaly_rl.data.synthetic import read_synthetic
from anomaly_rl.data.visa import read_visa

READERS: dict[str, Callable[..., list[Sample]]] = {
    "mvtec": read_mvtec,  # also MPDD, BTAD, MVTec LOCO (same layout)
    "visa": read_visa,
    "synthetic": read_synthetic,
}


def read_dataset(reader: str, root: str | Path, **kwargs: Any) -> list[Sample]:
    """Dispatch by name; `kwargs` are the reader's keyword arguments (categories, boxes, ...)."""
    if reader not in READERS:
        raise DataError(f"unknown data.reader {reader!r}; available: {sorted(READERS)}")
    try:
        return READERS[reader](root, **kwargs)
    except TypeError as exc:
        # A reader_options key the reader does not take: name the setting rather than a traceback.
        if "unexpected keyword argument" in str(exc):
            raise DataError(f"data.reader_options for reader {reader!r}: {exc}") from exc
        raise
