"""The LightningDataModule: read a dataset, split it, serve batches of prompts' raw material.

Batches are `PromptBatch`es of samples plus their decoded images at original size; resizing to
the model's input belongs to the model floor (and its Frame), not here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image
from torch.utils.data import Dataset

from anomaly_rl.data.boxes import BoxConfig
from anomaly_rl.data.errors import ON_ERROR_CHOICES, DataError
from anomaly_rl.data.files import load_rgb
from anomaly_rl.data.leakage import (
    TRAINING_IMAGES,
    Fingerprints,
    LeakageReport,
    LeakageSettings,
    check_leakage,
    fingerprint_images,
    write_report,
)
from anomaly_rl.data.readers import READERS, read_dataset
from anomaly_rl.data.records import Sample
from anomaly_rl.data.splits import make_splits
from anomaly_rl.data.synthetic import SyntheticConfig, ensure_synthetic

log = logging.getLogger(__name__)


@dataclass
class PromptBatch:
    """Samples with their query images (RGB, original size) and their reference images."""

    samples: list[Sample]
    images: list[Image.Image]
    references: list[list[Image.Image]]

    def __len__(self) -> int:
        return len(self.samples)

    def to(self, *args: Any, **kwargs: Any) -> PromptBatch:
        """Lightning moves batches with `.to(device)`; PIL images stay on the host (the processor
        turns them into tensors later), and this stops Lightning from rebuilding the frozen
        `Sample`s field by field, which it cannot do."""
        return self


class SampleDataset(Dataset):
    """Decodes one sample's query and reference images; workers run this in parallel."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Sample, Image.Image, list[Image.Image]]:
        sample = self.samples[index]
        return sample, load_rgb(sample.image_path), [load_rgb(p) for p in sample.reference_paths]


def load_prompt_batch(samples: Sequence[Sample]) -> PromptBatch:
    """Decode the images of `samples` into a PromptBatch: how every phase and evaluation loads data
    (training batches are drawn by `training.batches.ResumableBatches`, which calls this)."""
    dataset = SampleDataset(samples)
    return collate_prompts([dataset[i] for i in range(len(dataset))])


def collate_prompts(items: Sequence[tuple[Sample, Image.Image, list[Image.Image]]]) -> PromptBatch:
    return PromptBatch(samples=[i[0] for i in items], images=[i[1] for i in items],
                       references=[i[2] for i in items])


def _plain(value: Any) -> Any:
    """Config nodes (DictConfig/ListConfig) to plain containers, so Hydra's `_convert_` is optional."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class AnomalyDataModule(L.LightningDataModule):
    """Built from the `data` config group (conf/data/*.yaml) via Hydra's `_target_`.

    After `setup()`: `train_samples`, `val_samples`, `test_samples` (lists of `Sample`) and
    `skipped` (the per-sample errors passed over under on_error="skip").

    `setup()` also checks that no evaluation image (val, test) has the content of a training image
    (a query or reference image of the train split): `anomaly_rl.data.leakage`, settings
    `data.leakage.*`. An overlap stops the run naming both files, unless `data.leakage.allow=true`.
    """

    def __init__(
        self,
        reader: str = "synthetic",
        root: str | Path = "data/synthetic",
        boxes: Mapping[str, int] | None = None,
        shots: int | None = None,
        train_anomalous_fraction: float | None = None,
        categories: Sequence[str] | None = None,
        num_references: int = 0,
        val_size: int = 0,
        seed: int = 0,
        on_error: str = "raise",
        synthetic: Mapping[str, Any] | None = None,
        reader_options: Mapping[str, Any] | None = None,
        leakage: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if reader not in READERS:
            raise DataError(f"unknown data.reader {reader!r}; available: {sorted(READERS)}")
        if on_error not in ON_ERROR_CHOICES:
            raise DataError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.reader = reader
        self.root = Path(str(root))
        self.boxes = BoxConfig.from_any(_plain(boxes))
        self.shots = None if shots is None else int(shots)
        self.train_anomalous_fraction = None if train_anomalous_fraction is None else float(train_anomalous_fraction)
        categories = _plain(categories)
        self.categories = [categories] if isinstance(categories, str) else categories
        self.num_references = int(num_references)
        self.val_size = int(val_size)
        self.seed = int(seed)
        self.on_error = on_error
        # Validated now, so a bad generator setting fails at instantiation, not mid-training.
        self.synthetic = SyntheticConfig.from_mapping(_plain(synthetic)) if reader == "synthetic" else None
        self.reader_options = dict(_plain(reader_options) or {})
        self.leakage = LeakageSettings.from_any(_plain(leakage))
        self.training_fingerprints: Fingerprints | None = None
        self.leakage_report: LeakageReport | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.skipped: list[DataError] = []
        self._ready = False

    def prepare_data(self) -> None:
        """Generate the synthetic set if it is absent or stale (Lightning runs this on one process)."""
        if self.reader == "synthetic":
            ensure_synthetic(self.root, self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.reader == "synthetic":
            # Also here: tests and scripts call setup() without prepare_data(); cheap when cached.
            ensure_synthetic(self.root, self.synthetic)
        self.skipped = []
        samples = read_dataset(self.reader, self.root, categories=self.categories, boxes=self.boxes,
                               on_error=self.on_error, skipped=self.skipped, **self.reader_options)
        splits = make_splits(samples, shots=self.shots, train_anomalous_fraction=self.train_anomalous_fraction,
                             val_size=self.val_size, categories=self.categories,
                             num_references=self.num_references, seed=self.seed)
        self.train_samples, self.val_samples, self.test_samples = splits.train, splits.val, splits.test
        if not self.train_samples:
            log.warning("data: no training samples (reader %s at %s)", self.reader, self.root)
        log.info("data %s: %d train, %d val, %d test samples, %d skipped", self.reader, len(self.train_samples),
                 len(self.val_samples), len(self.test_samples), len(self.skipped))
        self._check_leakage()
        self._ready = True

    def training_image_paths(self) -> list[str]:
        """Every image a training prompt shows: the train split's query and reference images."""
        return list(dict.fromkeys(p for s in self.train_samples for p in (s.image_path, *s.reference_paths)))

    def _check_leakage(self) -> None:
        if not self.leakage.check:
            return
        evaluation = [s.image_path for s in (*self.val_samples, *self.test_samples)]
        self.training_fingerprints = fingerprint_images(
            self.training_image_paths(), self.leakage.cache_dir, description="fingerprinting training images"
        )
        if not evaluation or not len(self.training_fingerprints):
            return
        held_out = fingerprint_images(evaluation, self.leakage.cache_dir, description="fingerprinting evaluation images")
        self.leakage_report = check_leakage(
            held_out, self.training_fingerprints, self.leakage, f"{self.reader} at {self.root}: val and test "
            "against the train split"
        )

    def write_image_records(self, run_dir: str | Path, training_images: bool = True) -> None:
        """Into a run folder: the leakage check's report (`leakage.json`) and, with `training_images`,
        the training images' fingerprints (`training_images.npz`), which `evaluate ckpt=<run>` (MMAD
        included) compares its images against. Call after `setup()`; a no-op when the check is off."""
        if self.leakage_report is not None:
            write_report(self.leakage_report, run_dir)
        if training_images and self.training_fingerprints is not None:
            self.training_fingerprints.save(Path(run_dir) / TRAINING_IMAGES)
