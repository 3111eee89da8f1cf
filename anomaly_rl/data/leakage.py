"""Is an evaluation image also a training image? Compared by content, never by file name.

The few-shot splits never evaluate what they train on, but they only know paths: a dataset folder
holding copies (a test image saved again under train/, as PNG or re-encoded as JPEG), or MMAD
(built from MVTec AD and VisA) evaluated after training on MVTec, leaks through them unseen.
Every image is fingerprinted once, from its decoded pixels:

- `sha256` of its RGB pixels and size: identical pixels, whatever the file format or name (a PNG
  re-saved as PNG, BMP or TIFF, a greyscale image stored as RGB);
- `thumbs`: its greyscale 32x32 area-average thumbnail (uint8), for near-duplicates. Two images
  are near-duplicates when the mean absolute difference of their thumbnails is at most
  `tolerance` grey levels (0-255, default 1.5).

Measured for this threshold (this project's synthetic set, 1,800 images at 112 px, and the real
MVTec AD sample in ../shared/datasets/mvtec_ad_sample, 2026-12):

    copies    JPEG quality 90: <= 0.40   quality 75: <= 0.88   quality 50: <= 1.44
              MVTec half size: <= 0.58   (a 2x upscale of a 112 px noisy texture: up to 3.9, missed)
    distinct  synthetic, same look: >= 2.52   MVTec bottle: >= 3.01   MVTec grid: >= 18.3

Why not a binary 8x8 perceptual hash (aHash / dHash) with a Hamming threshold alone, the usual
choice: measured on the same images, it is both too loose and too tight for industrial data —
distinct photos of an aligned object (MVTec bottle: all 406 pairs within distance 10, most at 0)
share one hash, while JPEG quality-90 copies of a noisy synthetic texture differ in up to 9 of
64 bits.

The search is exact and fast: the mean absolute difference of the 2x2, 8x8 or 16x16 block means of
two thumbnails never exceeds that of the thumbnails themselves (triangle inequality), so every
pair is first compared on 4 numbers (vectorised), the survivors on 64 (the small perceptual hash),
then 256, and only the last survivors on all 1,024. No pair within the tolerance is ever pruned.
Measured on one core: 8,366 x 3,629 images (MMAD against MVTec AD's training set) in clusters of
look-alikes, 2.4 s.

Fingerprints are cached by path, size and modification time (`cache_dir`), so a dataset is
decoded once, not at every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import track

from anomaly_rl.data.errors import DataError

log = logging.getLogger(__name__)

THUMB = 32
"""Side of the greyscale thumbnail compared for near-duplicates."""
PRUNE_LEVELS = (2, 8, 16)
"""Block-mean grids on which pairs are pruned, in turn, before the full thumbnail is compared."""
DEFAULT_TOLERANCE = 1.5
CACHE_FILE = "image_fingerprints.npz"
TRAINING_IMAGES = "training_images.npz"
"""A training run's record of its training images' fingerprints (in its run folder)."""
LEAKAGE_REPORT = "leakage.json"
LEAKAGE_CKPT_REPORT = "leakage_ckpt.json"
"""`evaluate ckpt=<run>` on a data module: its split against the run's recorded training images."""
ALLOW_SETTING = "data.leakage.allow"
PROGRESS_FROM = 200
"""Images to fingerprint before a progress bar is shown."""
MAX_LISTED = 20
"""Overlaps spelt out in an error message; all of them go to leakage.json."""


class LeakageError(DataError):
    """An evaluation image is also a training image; the message names both files and the setting."""


@dataclass(frozen=True)
class LeakageSettings:
    """`data.leakage` in the config."""

    check: bool = True  # false: no fingerprints, no check, no record
    allow: bool = False  # true: overlaps are logged and listed in leakage.json instead of stopping the run
    tolerance: float = DEFAULT_TOLERANCE  # mean grey-level difference of the 32x32 thumbnails
    cache_dir: str | None = None  # where fingerprints are cached; None: not cached
    training_images: str | None = None  # MMAD / evaluate: a run folder or its training_images.npz

    @classmethod
    def from_any(cls, value: LeakageSettings | Mapping[str, Any] | None) -> LeakageSettings:
        if value is None:
            return cls()
        if isinstance(value, LeakageSettings):
            return value
        if not isinstance(value, Mapping):
            raise DataError(f"data.leakage must be a mapping, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise DataError(f"unknown data.leakage setting(s) {unknown}; known: {sorted(known)}")
        tolerance = value.get("tolerance", DEFAULT_TOLERANCE)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < 255:
            raise DataError(f"data.leakage.tolerance must be a number of grey levels in [0, 255), got {tolerance!r}")
        for name in ("check", "allow"):
            if not isinstance(value.get(name, True), bool):
                raise DataError(f"data.leakage.{name} must be true or false, got {value.get(name)!r}")
        cache_dir, training = value.get("cache_dir"), value.get("training_images")
        return cls(
            check=bool(value.get("check", True)),
            allow=bool(value.get("allow", False)),
            tolerance=float(tolerance),
            cache_dir=None if cache_dir in (None, "") else str(cache_dir),
            training_images=None if training in (None, "") else str(training),
        )


# --- fingerprints -------------------------------------------------------------------------------


@dataclass
class Fingerprints:
    """One row per image, in the order given (duplicate paths kept once)."""

    paths: list[str]
    sha256: list[str]
    thumbs: np.ndarray  # (n, THUMB, THUMB) uint8

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path: str | Path) -> Path:
        """An .npz file (written to a temp file, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, paths=np.array(self.paths, dtype=str), sha256=np.array(self.sha256, dtype=str),
                 thumbs=self.thumbs.astype(np.uint8))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Fingerprints:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                paths, sha, thumbs = (data[k] for k in ("paths", "sha256", "thumbs"))
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path}: not a fingerprint record ({error})") from error
        if thumbs.shape != (len(paths), THUMB, THUMB) or len(sha) != len(paths):
            raise DataError(f"{path}: inconsistent fingerprint record (shapes {paths.shape}, {thumbs.shape})")
        return cls([str(p) for p in paths], [str(s) for s in sha], thumbs.astype(np.uint8))

    @classmethod
    def empty(cls) -> Fingerprints:
        return cls([], [], np.zeros((0, THUMB, THUMB), dtype=np.uint8))


def fingerprint(path: str | Path) -> tuple[str, np.ndarray]:
    """(sha256 of the RGB pixels and size, 32x32 greyscale thumbnail) of one image file."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except Exception as exc:  # PIL raises many types
        raise DataError(f"unreadable image {path}: {exc}") from exc
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    thumb = np.asarray(rgb.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)
    return digest.hexdigest(), thumb


class _Cache:
    """Fingerprints by absolute path, valid while the file's size and mtime are unchanged."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.path = None if cache_dir is None else Path(cache_dir) / CACHE_FILE
        self.entries: dict[str, tuple[int, int, str, np.ndarray]] = {}
        self.changed = False
        if self.path is not None and self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    for p, m, s, h, t in zip(data["paths"], data["mtime_ns"], data["size"], data["sha256"],
                                             data["thumbs"], strict=True):
                        self.entries[str(p)] = (int(m), int(s), str(h), t)
            except Exception as error:  # a damaged cache is rebuilt, never a reason to stop
                log.warning("ignoring unreadable fingerprint cache %s (%s)", self.path, error)
                self.entries = {}

    def get(self, key: str, stat: os.stat_result) -> tuple[str, np.ndarray] | None:
        entry = self.entries.get(key)
        if entry is None or entry[0] != stat.st_mtime_ns or entry[1] != stat.st_size:
            return None
        return entry[2], entry[3]

    def put(self, key: str, stat: os.stat_result, sha: str, thumb: np.ndarray) -> None:
        self.entries[key] = (stat.st_mtime_ns, stat.st_size, sha, thumb)
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        keys = list(self.entries)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            paths=np.array(keys, dtype=str),
            mtime_ns=np.array([self.entries[k][0] for k in keys], dtype=np.int64),
            size=np.array([self.entries[k][1] for k in keys], dtype=np.int64),
            sha256=np.array([self.entries[k][2] for k in keys], dtype=str),
            thumbs=np.stack([self.entries[k][3] for k in keys]) if keys else np.zeros((0, THUMB, THUMB), np.uint8),
        )
        tmp.replace(self.path)  # atomic: concurrent runs may lose each other's additions, never corrupt it


def fingerprint_images(
    paths: Iterable[str | Path],
    cache_dir: str | Path | None = None,
    *,
    description: str = "fingerprinting images",
    workers: int | None = None,
) -> Fingerprints:
    """Fingerprints of `paths` (each once, in first-seen order), decoded in parallel threads.

    A progress bar is shown when more than `PROGRESS_FROM` images are not in the cache.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))
    cache = _Cache(cache_dir)
    found: dict[str, tuple[str, np.ndarray]] = {}
    todo: list[tuple[str, str, os.stat_result]] = []
    for path in unique:
        key = os.path.abspath(path)
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DataError(f"image not found for the leakage check: {path} ({error})") from error
        hit = cache.get(key, stat)
        if hit is None:
            todo.append((path, key, stat))
        else:
            found[path] = hit
    if todo:
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
            results = pool.map(fingerprint, [t[0] for t in todo])
            for (path, key, stat), (sha, thumb) in zip(
                todo, track(results, total=len(todo), description=description, disable=len(todo) < PROGRESS_FROM),
                strict=True,
            ):
                found[path] = (sha, thumb)
                cache.put(key, stat, sha, thumb)
        cache.save()
    if not unique:
        return Fingerprints.empty()
    return Fingerprints(unique, [found[p][0] for p in unique], np.stack([found[p][1] for p in unique]))


# --- comparing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """An evaluation image and a training image with the same content."""

    evaluation: str
    training: str
    identical: bool  # same pixels (sha256); else a near-duplicate
    difference: float  # mean absolute grey-level difference of the 32x32 thumbnails

    def describe(self, tolerance: float) -> str:
        how = (
            "identical pixels" if self.identical
            else f"near-duplicate: 32x32 thumbnails differ by {self.difference:.2f} grey levels on average, "
            f"tolerance {tolerance:g}"
        )
        return f"  evaluation {self.evaluation}\n    {'=' if self.identical else '~'} training {self.training} ({how})"

    def to_dict(self) -> dict[str, Any]:
        return {"evaluation": self.evaluation, "training": self.training, "identical": self.identical,
                "difference": round(self.difference, 4)}


def _blocks(thumbs: np.ndarray, grid: int) -> np.ndarray:
    """(n, grid*grid) float32 block means of (n, THUMB, THUMB) thumbnails."""
    n, step = len(thumbs), THUMB // grid
    return thumbs.reshape(n, grid, step, grid, step).mean(axis=(2, 4), dtype=np.float32).reshape(n, grid * grid)


def _close_pairs(evaluation: np.ndarray, training: np.ndarray, tolerance: float) -> list[tuple[int, int, float]]:
    """(evaluation index, training index, difference) of every pair within `tolerance` (exact)."""
    if not len(evaluation) or not len(training):
        return []
    # Exact in float32: uint8 thumbnails, block sizes and means over powers of two keep every sum a
    # multiple of 1/256 below 2**24, so no pair is lost to rounding at the tolerance itself.
    limit = tolerance + 1e-6
    e_coarse, t_coarse = _blocks(evaluation, PRUNE_LEVELS[0]), _blocks(training, PRUNE_LEVELS[0])
    rows = max(1, 4_000_000 // (len(training) * e_coarse.shape[1]))
    ei_parts, ti_parts = [], []
    for start in range(0, len(evaluation), rows):
        chunk = e_coarse[start : start + rows]
        close = np.abs(chunk[:, None, :] - t_coarse[None, :, :]).mean(axis=2) <= limit
        e_idx, t_idx = np.nonzero(close)
        ei_parts.append(e_idx + start)
        ti_parts.append(t_idx)
    e_idx, t_idx = np.concatenate(ei_parts), np.concatenate(ti_parts)
    levels: list[tuple[np.ndarray, np.ndarray]] = [
        (_blocks(evaluation, grid), _blocks(training, grid)) for grid in PRUNE_LEVELS[1:]
    ]
    levels.append((evaluation.reshape(len(evaluation), -1).astype(np.float32),
                   training.reshape(len(training), -1).astype(np.float32)))
    difference = np.zeros(0, dtype=np.float32)
    for e_level, t_level in levels:
        kept_e, kept_t, kept_d = [], [], []
        batch = max(1, 2_000_000 // e_level.shape[1])
        for start in range(0, len(e_idx), batch):
            e, t = e_idx[start : start + batch], t_idx[start : start + batch]
            d = np.abs(e_level[e] - t_level[t]).mean(axis=1)
            keep = d <= limit
            kept_e.append(e[keep])
            kept_t.append(t[keep])
            kept_d.append(d[keep])
        if not kept_e:
            return []
        e_idx, t_idx, difference = np.concatenate(kept_e), np.concatenate(kept_t), np.concatenate(kept_d)
    return [(int(e), int(t), float(d)) for e, t, d in zip(e_idx, t_idx, difference, strict=True)]


def find_overlaps(evaluation: Fingerprints, training: Fingerprints, tolerance: float = DEFAULT_TOLERANCE) -> list[Overlap]:
    """Every (evaluation, training) pair with identical pixels or near-identical thumbnails.

    Sorted by evaluation image, then training image; a pair is listed once.
    """
    by_sha: dict[str, list[int]] = {}
    for j, sha in enumerate(training.sha256):
        by_sha.setdefault(sha, []).append(j)
    pairs: dict[tuple[int, int], Overlap] = {}
    for i, sha in enumerate(evaluation.sha256):
        for j in by_sha.get(sha, ()):
            pairs[(i, j)] = Overlap(evaluation.paths[i], training.paths[j], True, 0.0)
    for i, j, d in _close_pairs(evaluation.thumbs, training.thumbs, tolerance):
        pairs.setdefault((i, j), Overlap(evaluation.paths[i], training.paths[j], False, d))
    return [pairs[k] for k in sorted(pairs)]


# --- the check ------------------------------------------------------------------------------------


@dataclass
class LeakageReport:
    """What one check compared and found."""

    what: str  # e.g. "the test split against the training split"
    evaluated: int  # evaluation images compared
    trained: int  # training images compared
    overlaps: list[Overlap] = field(default_factory=list)
    allowed: bool = False
    tolerance: float = DEFAULT_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.what,
            "evaluation_images": self.evaluated,
            "training_images": self.trained,
            "tolerance": self.tolerance,
            "overlaps": [o.to_dict() for o in self.overlaps],
            "allowed": self.allowed,
            "setting": ALLOW_SETTING,
        }

    def message(self, report_dir: str | Path | None = None, report_name: str = LEAKAGE_REPORT) -> str:
        shown = [o.describe(self.tolerance) for o in self.overlaps[:MAX_LISTED]]
        more = len(self.overlaps) - len(shown)
        where = f"{Path(report_dir) / report_name}" if report_dir else f"the run folder's {report_name}"
        lines = [
            f"data leakage: {len(self.overlaps)} evaluation/training image pair(s) with the same content "
            f"({self.what}; compared by pixels, not by file name):",
            *shown,
            *([f"  ... and {more} more"] if more > 0 else []),
        ]
        if self.allowed:
            lines.append(f"{ALLOW_SETTING}=true: going on anyway; the pairs are listed in {where}.")
        else:
            lines.append(
                f"Remove the copies, or set {ALLOW_SETTING}=true to go on anyway "
                f"(the pairs are then listed in {where})."
            )
        return "\n".join(lines)


def check_leakage(
    evaluation: Fingerprints,
    training: Fingerprints,
    settings: LeakageSettings,
    what: str,
    report_dir: str | Path | None = None,
    report_name: str = LEAKAGE_REPORT,
) -> LeakageReport:
    """Compare; raise LeakageError on any overlap unless `settings.allow` (then warn).

    With `report_dir`, the report is also written to `<report_dir>/<report_name>` (before raising).
    """
    report = LeakageReport(
        what=what,
        evaluated=len(evaluation),
        trained=len(training),
        overlaps=find_overlaps(evaluation, training, settings.tolerance),
        allowed=settings.allow,
        tolerance=settings.tolerance,
    )
    if report_dir is not None:
        write_report(report, report_dir, report_name)
    if report.overlaps:
        if not settings.allow:
            raise LeakageError(report.message(report_dir, report_name))
        log.warning(report.message(report_dir, report_name))
    else:
        log.info("leakage check: %d evaluation vs %d training images (%s): no overlap", report.evaluated,
                 report.trained, what)
    return report


def write_report(report: LeakageReport, report_dir: str | Path, name: str = LEAKAGE_REPORT) -> Path:
    path = Path(report_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def find_training_record(source: str | Path) -> Path | None:
    """A run's training_images.npz, from the file itself, the run folder, or a weights folder in it."""
    source = Path(source).expanduser()
    if source.is_file():
        return source
    for folder in (source, source.parent):
        if (folder / TRAINING_IMAGES).is_file():
            return folder / TRAINING_IMAGES
    return None


def check_against_run(
    evaluation_paths: Sequence[str],
    source: str | Path | None,
    settings: LeakageSettings,
    what: str,
    report_dir: str | Path | None = None,
    report_name: str = LEAKAGE_REPORT,
) -> LeakageReport | None:
    """Compare evaluation images with the training images a run recorded (`source`: run folder or file).

    `settings.training_images`, when set, takes precedence over `source`. Returns None (after a
    warning when a run was named) when there is no record to compare with.
    """
    if not settings.check:
        return None
    source = settings.training_images or source
    if not source:
        log.info("leakage check skipped for %s: no trained run given (ckpt) and no data.leakage.training_images", what)
        return None
    record = find_training_record(source)
    if record is None:
        log.warning(
            "leakage check skipped for %s: %s holds no %s (a run trained before runs recorded their training "
            "images); set data.leakage.training_images=<run folder or file> to check", what, source, TRAINING_IMAGES,
        )
        return None
    training = Fingerprints.load(record)
    evaluation = fingerprint_images(evaluation_paths, settings.cache_dir, description=f"fingerprinting {what}")
    return check_leakage(
        evaluation, training, settings, f"{what} against the training images of {record}", report_dir, report_name
    )
