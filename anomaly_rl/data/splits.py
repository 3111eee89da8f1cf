"""Training / validation / evaluation splits, few-shot or full, and reference images.

Pools (per category):
  normal training pool   = normal samples the reader put in its "train" split (MVTec train/good);
  anomalous pool         = all anomalous samples (MVTec and our synthetic set have them only in test).

Modes:
  shots=k                 k normals from the normal training pool + k anomalous from the anomalous
                          pool train; evaluation = the reader's test split minus those shots.
  shots=None              train = the reader's train split; if train_anomalous_fraction=f is set, a
                          seeded fraction f of each category's anomalous test images moves to train
                          (how the synthetic set, and MVTec in a "full-shot" setting, get labelled
                          anomalous training images); evaluation = the rest of the test split.
  val_size=n              n evaluation samples per category move to "val" (half anomalous, rounded
                          up, where the category has enough of both).

Nothing used for training is ever evaluated. All draws are seeded by (seed, category, purpose) and
order-independent keys, so the split does not depend on file-system order or machine paths.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.mvtec import check_categories
from anomaly_rl.data.records import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def all(self) -> list[Sample]:
        return [*self.train, *self.val, *self.test]


def sample_key(sample: Sample) -> str:
    """A machine-independent identity: the category and the image path's last three parts.

    File names alone repeat (MVTec's train/good/000.png and test/good/000.png), and absolute
    paths differ between machines; <split>/<defect>/<name> (MVTec) and Images/<Normal|Anomaly>/
    <name> (VisA) are unique and portable, so seeded draws are the same everywhere.
    """
    return "/".join([sample.category, *Path(sample.image_path).parts[-3:]])


def _rng(seed: int, *parts: str) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def _draw(pool: Sequence[Sample], count: int, rng: np.random.Generator) -> list[Sample]:
    ordered = sorted(pool, key=sample_key)
    picks = rng.choice(len(ordered), size=count, replace=False) if count else []
    return [ordered[i] for i in sorted(picks)]


def select_categories(samples: Iterable[Sample], categories: Sequence[str] | None) -> list[Sample]:
    """Keep only the named categories; an unknown name is an error that lists the available ones."""
    samples = list(samples)
    available = sorted({s.category for s in samples})
    chosen = set(check_categories(categories, available, "the dataset that was read"))
    return [s for s in samples if s.category in chosen]


def make_splits(
    samples: Sequence[Sample],
    *,
    shots: int | None = None,
    train_anomalous_fraction: float | None = None,
    val_size: int = 0,
    categories: Sequence[str] | None = None,
    num_references: int = 0,
    seed: int = 0,
) -> Splits:
    """Split reader output into train / val / test (see the module docstring for the rules).

    `shots` takes precedence over `train_anomalous_fraction` (the few-shot setting defines its
    own anomalous training set), so a sweep over shots needs no second override; the fraction
    being ignored is logged.
    """
    if shots is not None and (isinstance(shots, bool) or int(shots) < 1):
        raise DataError(f"shots must be a positive integer or null (full split), got {shots!r}")
    if train_anomalous_fraction is not None and not 0 <= float(train_anomalous_fraction) <= 1:
        raise DataError(f"train_anomalous_fraction must lie in [0, 1], got {train_anomalous_fraction!r}")
    if shots is not None and train_anomalous_fraction:
        log.info("shots=%s given: train_anomalous_fraction=%s is ignored", shots, train_anomalous_fraction)
        train_anomalous_fraction = None
    if int(val_size) < 0:
        raise DataError(f"val_size must be >= 0, got {val_size!r}")
    if int(num_references) < 0:
        raise DataError(f"num_references must be >= 0, got {num_references!r}")
    chosen = select_categories(samples, categories)
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for category in sorted({s.category for s in chosen}):
        own = [s for s in chosen if s.category == category]
        cat_train, cat_eval = _train_eval(own, category, shots, train_anomalous_fraction, seed)
        cat_val = _draw_val(cat_eval, category, int(val_size), seed)
        val_keys = {sample_key(s) for s in cat_val}
        train += [replace(s, split="train") for s in cat_train]
        val += [replace(s, split="val") for s in cat_val]
        test += [replace(s, split="test") for s in cat_eval if sample_key(s) not in val_keys]
    if num_references:
        pool = [s for s in chosen if s.split == "train" and not s.is_anomalous]
        train, val, test = (attach_references(part, pool, int(num_references), seed) for part in (train, val, test))
    return Splits(train=train, val=val, test=test)


def _train_eval(
    own: list[Sample], category: str, shots: int | None, fraction: float | None, seed: int
) -> tuple[list[Sample], list[Sample]]:
    normal_pool = [s for s in own if s.split == "train" and not s.is_anomalous]
    anomalous_pool = [s for s in own if s.is_anomalous]
    if shots is not None:
        k = int(shots)
        for name, pool in (("normal training", normal_pool), ("anomalous", anomalous_pool)):
            if len(pool) < k:
                raise DataError(f"shots={k} but category {category!r} has only {len(pool)} {name} image(s)")
        picked = _draw(normal_pool, k, _rng(seed, category, "shots-normal"))
        picked += _draw(anomalous_pool, k, _rng(seed, category, "shots-anomalous"))
    else:
        picked = [s for s in own if s.split == "train"]
        if fraction:
            test_anomalous = [s for s in anomalous_pool if s.split != "train"]
            count = int(round(float(fraction) * len(test_anomalous)))
            picked += _draw(test_anomalous, count, _rng(seed, category, "train-anomalous"))
    used = {sample_key(s) for s in picked}
    evaluation = [s for s in own if s.split != "train" and sample_key(s) not in used]
    return picked, evaluation


def _draw_val(evaluation: list[Sample], category: str, val_size: int, seed: int) -> list[Sample]:
    if val_size == 0:
        return []
    if val_size > len(evaluation):
        raise DataError(f"val_size={val_size} but category {category!r} has only {len(evaluation)} "
                        f"evaluation image(s) left after training took its share")
    anomalous = [s for s in evaluation if s.is_anomalous]
    normal = [s for s in evaluation if not s.is_anomalous]
    n_anomalous = min(len(anomalous), (val_size + 1) // 2)
    n_normal = min(len(normal), val_size - n_anomalous)
    n_anomalous = val_size - n_normal  # spill over when one label is short
    rng = _rng(seed, category, "val")
    return _draw(anomalous, n_anomalous, rng) + _draw(normal, n_normal, rng)


def attach_references(samples: Sequence[Sample], pool: Sequence[Sample], k: int, seed: int) -> list[Sample]:
    """Give each sample k normal reference images of its own category, never itself.

    The pool is the reader's normal training images, which are never evaluated, so references
    cannot leak evaluation images. The draw is seeded per sample key, so it does not depend on
    the order of `samples` or on which split a sample landed in.
    """
    by_category: dict[str, list[Sample]] = {}
    for candidate in sorted(pool, key=sample_key):
        by_category.setdefault(candidate.category, []).append(candidate)
    out: list[Sample] = []
    for sample in samples:
        candidates = [c for c in by_category.get(sample.category, []) if c.image_path != sample.image_path]
        if len(candidates) < k:
            raise DataError(f"num_references={k} but category {sample.category!r} has only "
                            f"{len(candidates)} normal training image(s) to draw from for {sample.image_path}")
        picks = _rng(seed, "references", sample_key(sample)).choice(len(candidates), size=k, replace=False)
        out.append(replace(sample, reference_paths=tuple(candidates[i].image_path for i in picks)))
    return out
