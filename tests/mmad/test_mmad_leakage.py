"""`evaluate data=mmad ckpt=<run>`: MMAD's query images against the training images the run recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from anomaly_rl.data.leakage import LEAKAGE_REPORT, TRAINING_IMAGES, LeakageError, fingerprint_images
from anomaly_rl.evaluation import mmad_runner
from tests.mmad.fixture import build_mmad_fixture

LEAKED = "VisA/candle/test/bad/000.JPG"


def run_folder(tmp_path: Path, root: Path) -> Path:
    """A training run whose training images include a copy of one of MMAD's VisA query images."""
    train = tmp_path / "train_data"
    train.mkdir()
    shutil.copyfile(root / LEAKED, train / "copy_of_candle.JPG")
    noise = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(train / "other.png")  # (the fixture's normal images are all one plain colour)
    run = tmp_path / "run"
    fingerprint_images([train / "copy_of_candle.JPG", train / "other.png"]).save(run / TRAINING_IMAGES)
    return run


def config(root: Path, ckpt: Path | None, **leakage: object) -> object:
    return OmegaConf.create({
        "ckpt": None if ckpt is None else str(ckpt),
        "data": {"_target_": "anomaly_rl.data.mmad.read_mmad", "root": str(root), "datasets": ["DS-MVTec", "VisA"],
                 "load_boxes": False, "leakage": leakage},
        "eval": {"batch_size": 2, "max_new_tokens": 4, "limit": None},
    })


def test_an_mmad_image_the_run_trained_on_stops_the_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_mmad_fixture(tmp_path).root
    run = run_folder(tmp_path, root)

    def no_answering(*args: object, **kwargs: object) -> None:
        raise AssertionError("questions were answered before the leakage check")

    monkeypatch.setattr(mmad_runner, "answer_mmad", no_answering)
    with pytest.raises(LeakageError) as error:
        mmad_runner.evaluate_mmad(None, None, None, config(root, run / "final"), tmp_path / "out")  # type: ignore[arg-type]
    message = str(error.value)
    assert f"evaluation {root / LEAKED}\n    = training {tmp_path / 'train_data' / 'copy_of_candle.JPG'}" in message
    assert "1 evaluation/training image pair(s)" in message and "data.leakage.allow=true" in message
    report = json.loads((tmp_path / "out" / LEAKAGE_REPORT).read_text(encoding="utf-8"))
    assert [o["evaluation"] for o in report["overlaps"]] == [str(root / LEAKED)]
    assert report["evaluation_images"] == 4 and report["training_images"] == 2  # the 4 selected query images


def test_allowed_it_is_logged_and_the_evaluation_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_mmad_fixture(tmp_path).root
    run = run_folder(tmp_path, root)
    answered: list[int] = []

    def scripted(model: object, processor: object, schema: object, data: object, **kwargs: object) -> tuple:
        items = data.items  # type: ignore[attr-defined]
        answered.append(len(items))
        return items, [q.answer for q in items], ["x"] * len(items)

    monkeypatch.setattr(mmad_runner, "answer_mmad", scripted)
    summary = mmad_runner.evaluate_mmad(None, None, None, config(root, run, allow=True), tmp_path / "out")  # type: ignore[arg-type]
    assert answered == [16] and summary["overall"] == 100.0
    report = json.loads((tmp_path / "out" / LEAKAGE_REPORT).read_text(encoding="utf-8"))
    assert report["allowed"] is True and len(report["overlaps"]) == 1


def test_without_a_run_nothing_is_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_mmad_fixture(tmp_path).root
    monkeypatch.setattr(mmad_runner, "answer_mmad", lambda *a, **k: (
        (items := a[3].items), [q.answer for q in items], ["x"] * len(items)))  # type: ignore[attr-defined]
    mmad_runner.evaluate_mmad(None, None, None, config(root, None), tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out" / LEAKAGE_REPORT).exists()
