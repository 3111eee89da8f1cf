"""The leakage guard: evaluation images that are training images, found by content at setup.

The dataset here is real (the MVTec AD sample's bottle, whose photos are aligned and look alike at
8x8), so the test also shows that distinct photos of one object are not taken for copies.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anomaly_rl.data import leakage
from anomaly_rl.data.datamodule import AnomalyDataModule
from anomaly_rl.data.errors import DataError
from anomaly_rl.data.leakage import (
    LEAKAGE_REPORT,
    TRAINING_IMAGES,
    Fingerprints,
    LeakageError,
    LeakageSettings,
    check_against_run,
    find_overlaps,
    fingerprint_images,
)


def link_category(sample: Path, root: Path, category: str = "bottle") -> Path:
    """`root/<category>` mirroring the sample's files as symlinks (nothing large is copied)."""
    for source in (sample / category).rglob("*.png"):
        target = root / category / source.relative_to(sample / category)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, target)
    return root / category


def module(root: Path, **leak: object) -> AnomalyDataModule:
    return AnomalyDataModule(reader="mvtec", root=root, boxes={"dilation": 4, "min_area": 16}, leakage=leak or None)


@pytest.fixture
def leaky(tmp_path: Path, mvtec_sample: Path) -> tuple[Path, Path, Path, Path, Path]:
    """The bottle with test/good/002.png copied into train/good (bytes unchanged) and
    test/broken_small/003.png re-encoded as JPEG quality 90 into train/good."""
    root = tmp_path / "mvtec"
    bottle = link_category(mvtec_sample, root)
    exact_src, reencoded_src = bottle / "test/good/002.png", bottle / "test/broken_small/003.png"
    exact_copy, reencoded_copy = bottle / "train/good/900.png", bottle / "train/good/901.jpg"
    shutil.copyfile(exact_src, exact_copy)
    Image.open(reencoded_src).convert("RGB").save(reencoded_copy, format="JPEG", quality=90)
    return root, exact_src, exact_copy, reencoded_src, reencoded_copy


def test_a_copy_and_a_reencoded_copy_fail_at_setup_naming_both_files(leaky, tmp_path: Path) -> None:
    root, exact_src, exact_copy, reencoded_src, reencoded_copy = leaky
    dm = module(root)
    with pytest.raises(LeakageError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "2 evaluation/training image pair(s)" in message
    assert f"evaluation {exact_src}\n    = training {exact_copy} (identical pixels)" in message
    assert f"evaluation {reencoded_src}\n    ~ training {reencoded_copy} (near-duplicate" in message
    assert "data.leakage.allow=true" in message


def test_allowed_overlaps_are_logged_and_written_to_the_run_folder(
    leaky, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, exact_src, exact_copy, reencoded_src, reencoded_copy = leaky
    dm = module(root, allow=True)
    with caplog.at_level(logging.WARNING, logger="anomaly_rl.data.leakage"):
        dm.setup("fit")
    assert any("data.leakage.allow=true: going on anyway" in r.getMessage() for r in caplog.records)
    dm.write_image_records(tmp_path / "run")
    report = json.loads((tmp_path / "run" / LEAKAGE_REPORT).read_text(encoding="utf-8"))
    pairs = {(o["evaluation"], o["training"], o["identical"]) for o in report["overlaps"]}
    assert pairs == {(str(exact_src), str(exact_copy), True), (str(reencoded_src), str(reencoded_copy), False)}
    assert report["allowed"] is True and report["setting"] == "data.leakage.allow"
    near = next(o for o in report["overlaps"] if not o["identical"])
    assert 0 < near["difference"] <= 1.5
    # the run's record of its training images: every train image, the two copies included
    record = Fingerprints.load(tmp_path / "run" / TRAINING_IMAGES)
    assert {str(exact_copy), str(reencoded_copy)} <= set(record.paths)
    assert len(record) == len(dm.training_image_paths()) == 8  # 6 train/good + the 2 copies


def test_distinct_photos_of_an_aligned_object_are_no_overlap(tmp_path: Path, mvtec_sample: Path) -> None:
    link_category(mvtec_sample, tmp_path / "mvtec")
    dm = module(tmp_path / "mvtec")
    dm.setup("fit")
    assert dm.leakage_report is not None and dm.leakage_report.overlaps == []
    assert dm.leakage_report.evaluated == 23 and dm.leakage_report.trained == 6


def test_check_false_skips_everything(leaky) -> None:
    dm = module(leaky[0], check=False)
    dm.setup("fit")  # no error: nothing is compared
    assert dm.training_fingerprints is None and dm.leakage_report is None


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(DataError, match=r"unknown data.leakage setting\(s\) \['alow'\]"):
        LeakageSettings.from_any({"alow": True})
    with pytest.raises(DataError, match="data.leakage.tolerance"):
        LeakageSettings.from_any({"tolerance": -1})
    with pytest.raises(DataError, match="data.leakage.allow must be true or false"):
        LeakageSettings.from_any({"allow": "yes"})


# --- fingerprints and their cache --------------------------------------------------------------------


def noise_image(path: Path, seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_identical_pixels_in_another_format_have_one_sha(tmp_path: Path) -> None:
    png = noise_image(tmp_path / "a.png", 0)
    Image.open(png).save(tmp_path / "a.bmp")
    Image.open(png).save(tmp_path / "a.tif")
    prints = fingerprint_images([png, tmp_path / "a.bmp", tmp_path / "a.tif", png])
    assert prints.paths == [str(png), str(tmp_path / "a.bmp"), str(tmp_path / "a.tif")]  # duplicates once
    assert len(set(prints.sha256)) == 1 and prints.thumbs.shape == (3, 32, 32)


def test_the_cache_serves_unchanged_files_and_refreshes_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = noise_image(tmp_path / "a.png", 1), noise_image(tmp_path / "b.png", 2)
    first = fingerprint_images([a, b], tmp_path / "cache")
    assert (tmp_path / "cache" / leakage.CACHE_FILE).is_file()
    calls: list[str] = []
    real = leakage.fingerprint
    monkeypatch.setattr(leakage, "fingerprint", lambda p: calls.append(str(p)) or real(p))
    again = fingerprint_images([a, b], tmp_path / "cache")
    assert calls == [] and again.sha256 == first.sha256 and np.array_equal(again.thumbs, first.thumbs)
    noise_image(a, 3)  # new content
    os.utime(a, ns=(1, 1))  # and a different mtime, whatever the clock's resolution
    changed = fingerprint_images([a, b], tmp_path / "cache")
    assert calls == [str(a)] and changed.sha256[0] != first.sha256[0] and changed.sha256[1] == first.sha256[1]


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        fingerprint_images([bad])


# --- the search against a brute-force one ---------------------------------------------------------


def brute_force(evaluation: np.ndarray, training: np.ndarray, tolerance: float) -> set[tuple[int, int]]:
    """Every pair compared on all 1,024 thumbnail pixels, in float64, no pruning."""
    return {
        (i, j)
        for i in range(len(evaluation))
        for j in range(len(training))
        if np.abs(evaluation[i].astype(np.float64) - training[j].astype(np.float64)).mean() <= tolerance + 1e-6
    }


def prints(thumbs: np.ndarray, prefix: str) -> Fingerprints:
    return Fingerprints([f"{prefix}{i}" for i in range(len(thumbs))], [f"{prefix}{i}" for i in range(len(thumbs))],
                        thumbs)


def perturbed(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A changed copy: noise everywhere, or a local change that is large where it is (a shifted
    quadrant, a shifted 4x4 block, a few wild pixels) — what makes coarse comparisons misleading."""
    out = image.astype(np.int16).copy()
    kind = rng.integers(0, 4)
    if kind == 0:
        out += rng.integers(-6, 7, out.shape)
    elif kind == 1:
        y, x = rng.integers(0, 2, 2) * 16
        out[y : y + 16, x : x + 16] += int(rng.integers(-24, 25))
    elif kind == 2:
        y, x = rng.integers(0, 8, 2) * 4
        out[y : y + 4, x : x + 4] += int(rng.integers(-120, 121))
    else:
        ys, xs = rng.integers(0, 32, (2, 8))
        out[ys, xs] = rng.integers(0, 256, 8)
    return np.clip(out, 0, 255)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 8.0))
def test_pruning_never_loses_a_pair(seed: int, tolerance: float) -> None:
    rng = np.random.default_rng(seed)
    training = rng.integers(0, 256, (12, 32, 32))
    # evaluation images: changed copies of training images, exact copies and fresh images
    picks = rng.integers(0, len(training), 12)
    evaluation = np.stack([perturbed(training[i], rng) for i in picks[:10]] + [training[i] for i in picks[10:]])
    evaluation = np.concatenate([evaluation, rng.integers(0, 256, (3, 32, 32))])
    ev, tr = evaluation.astype(np.uint8), training.astype(np.uint8)
    found = find_overlaps(prints(ev, "e"), prints(tr, "t"), tolerance)
    want = brute_force(ev, tr, tolerance)
    assert {(int(o.evaluation[1:]), int(o.training[1:])) for o in found} == want
    for o in found:
        i, j = int(o.evaluation[1:]), int(o.training[1:])
        assert o.difference == pytest.approx(np.abs(ev[i].astype(float) - tr[j].astype(float)).mean(), abs=1e-4)


def test_a_local_change_is_compared_on_the_whole_thumbnail() -> None:
    """One quadrant brighter by 4 grey levels: 1.0 on average, within the tolerance, although the
    coarse 2x2 means differ by 4 in that quadrant (pruning must use the mean, which bounds from below)."""
    image = np.random.default_rng(0).integers(0, 250, (1, 32, 32)).astype(np.uint8)
    changed = image.copy()
    changed[0, :16, :16] += 4
    [overlap] = find_overlaps(prints(changed, "e"), prints(image, "t"), 1.5)
    assert not overlap.identical and overlap.difference == pytest.approx(1.0)


def test_identical_sha_is_an_overlap_even_beyond_the_tolerance() -> None:
    a = Fingerprints(["e"], ["same"], np.zeros((1, 32, 32), np.uint8))
    b = Fingerprints(["t"], ["same"], np.full((1, 32, 32), 200, np.uint8))
    [overlap] = find_overlaps(a, b, 1.5)
    assert overlap.identical and overlap.training == "t"


def test_jpeg_copy_is_found_and_a_different_image_is_not(tmp_path: Path) -> None:
    original = noise_image(tmp_path / "o.png", 5, size=96)
    image = Image.open(original).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    (tmp_path / "c.jpg").write_bytes(buffer.getvalue())
    other = noise_image(tmp_path / "x.png", 6, size=96)
    found = find_overlaps(fingerprint_images([tmp_path / "c.jpg", other]), fingerprint_images([original]))
    assert [(o.evaluation, o.identical) for o in found] == [(str(tmp_path / "c.jpg"), False)]


# --- against a training run's record (evaluate ckpt=<run>, MMAD) ---------------------------------------


def test_check_against_a_runs_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = [noise_image(tmp_path / "train" / f"{i}.png", 10 + i) for i in range(3)]
    fingerprint_images(trained).save(run / TRAINING_IMAGES)
    (run / "final").mkdir()
    shutil.copyfile(trained[1], tmp_path / "eval_copy.png")
    evaluated = [str(noise_image(tmp_path / "eval" / "0.png", 20)), str(tmp_path / "eval_copy.png")]
    with pytest.raises(LeakageError, match=r"(?s)evaluation .*eval_copy.png\n    = training .*train/1.png"):
        check_against_run(evaluated, run / "final", LeakageSettings(), "MMAD images")  # a weights folder works too
    report = check_against_run(evaluated, run, LeakageSettings(allow=True), "MMAD images", tmp_path / "out")
    assert report is not None and len(report.overlaps) == 1
    assert json.loads((tmp_path / "out" / LEAKAGE_REPORT).read_text())["overlaps"][0]["training"] == str(trained[1])
    # no record: a warning, nothing compared
    assert check_against_run(evaluated, tmp_path / "elsewhere", LeakageSettings(), "MMAD images") is None
    # an explicit record wins over the run
    explicit = LeakageSettings(training_images=str(run / TRAINING_IMAGES))
    with pytest.raises(LeakageError):
        check_against_run(evaluated, tmp_path / "elsewhere", explicit, "MMAD images")
