"""Bad input: each case gives a DataError naming the file or setting; on_error=skip counts them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.files import image_size
from anomaly_rl.data.mvtec import read_mvtec
from anomaly_rl.data.visa import read_visa


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_root_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*MVTec layout.*ground_truth"):
        read_mvtec(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"VisA root .*nowhere.*split_csv/1cls.csv"):
        read_visa(tmp_path / "nowhere")


def test_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "random_folder").mkdir()
    with pytest.raises(DataError, match="no category folders"):
        read_mvtec(tmp_path)


def test_anomalous_image_without_mask(tiny_mvtec) -> None:
    root, paths = tiny_mvtec
    paths["mask1"].unlink()
    with pytest.raises(DataError, match=r"anomalous image .*dent/001\.png has no mask"):
        read_mvtec(root)


def test_skip_logs_each_bad_sample_and_counts_them(tiny_mvtec, caplog: pytest.LogCaptureFixture) -> None:
    root, paths = tiny_mvtec
    paths["mask1"].unlink()
    truncate(paths["test/good/000"])
    skipped: list[DataError] = []
    with caplog.at_level(logging.WARNING):
        samples = read_mvtec(root, on_error="skip", skipped=skipped)
    assert len(samples) == 3 and len(skipped) == 2
    messages = caplog.text
    assert "dent/001.png has no mask" in messages and "test/good/000.png" in messages
    assert "skipped 2 bad sample(s)" in messages


def test_mask_size_mismatch_names_both_files(tiny_mvtec, builders) -> None:
    root, paths = tiny_mvtec
    builders["png"](np.zeros((5, 5), np.uint8), paths["mask0"])
    with pytest.raises(DataError, match=r"mask .*000_mask\.png is 5x5 but its image .*dent/000\.png is 20x16"):
        read_mvtec(root)


def test_truncated_png_image(tiny_mvtec) -> None:
    root, paths = tiny_mvtec
    truncate(paths["train/good/001"])
    with pytest.raises(DataError, match=r"truncated image .*train/good/001\.png"):
        read_mvtec(root)


def test_truncated_mask(tiny_mvtec) -> None:
    root, paths = tiny_mvtec
    truncate(paths["mask0"], keep=0.6)
    with pytest.raises(DataError, match=r"truncated mask .*000_mask\.png"):
        read_mvtec(root)


def test_truncated_and_garbage_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    assert image_size(path) == (32, 32)
    truncate(path, keep=0.7)
    with pytest.raises(DataError, match=r"x\.jpg.*end-of-image"):
        image_size(path)
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"unreadable or truncated image .*x\.jpg"):
        image_size(path)


def test_category_with_no_images(tiny_mvtec) -> None:
    root, _ = tiny_mvtec
    (root / "empty" / "train" / "good").mkdir(parents=True)
    (root / "empty" / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"category 'empty' .* has no images"):
        read_mvtec(root)
    assert {s.category for s in read_mvtec(root, categories=["widget"])} == {"widget"}


def test_bad_on_error_value(tiny_mvtec) -> None:
    with pytest.raises(DataError, match="on_error"):
        read_mvtec(tiny_mvtec[0], on_error="ignore")


def test_csv_missing_columns(tiny_visa: Path) -> None:
    csv = tiny_visa / "split_csv" / "1cls.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0].replace(",mask", "")] + [line.rsplit(",", 1)[0] for line in lines[1:]]))
    with pytest.raises(DataError, match=r"1cls\.csv lacks column\(s\) \['mask'\]"):
        read_visa(tiny_visa)


def test_csv_header_only(tiny_visa: Path) -> None:
    csv = tiny_visa / "split_csv" / "1cls.csv"
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no rows"):
        read_visa(tiny_visa)


def test_visa_anomaly_without_mask_and_bad_rows(tiny_visa: Path) -> None:
    csv = tiny_visa / "split_csv" / "1cls.csv"
    text = csv.read_text()
    pcb_line = [line for line in text.splitlines() if line.startswith("pcb1,test,anomaly")][0]
    csv.write_text(text.replace(pcb_line, pcb_line.rsplit(",", 1)[0] + ","))
    with pytest.raises(DataError, match=r"1cls\.csv:\d+: anomalous image .*pcb1.*has no mask"):
        read_visa(tiny_visa)
    csv.write_text(text.replace(pcb_line, pcb_line.replace(",anomaly,", ",broken,")))
    with pytest.raises(DataError, match="label 'broken'"):
        read_visa(tiny_visa)
    skipped: list[DataError] = []
    assert len(read_visa(tiny_visa, on_error="skip", skipped=skipped)) == 6 and len(skipped) == 1


def test_visa_missing_image_and_mask_size(tiny_visa: Path, builders) -> None:
    (tiny_visa / "candle" / "Data" / "Images" / "Normal" / "001.JPG").unlink()
    with pytest.raises(DataError, match=r"image .*candle/Data/Images/Normal/001\.JPG not found"):
        read_visa(tiny_visa)
    skipped: list[DataError] = []
    read_visa(tiny_visa, on_error="skip", skipped=skipped)
    assert len(skipped) == 1
    builders["png"](np.zeros((3, 3), np.uint8), tiny_visa / "pcb1" / "Data" / "Masks" / "Anomaly" / "000.png")
    with pytest.raises(DataError, match=r"mask .*pcb1.*000\.png is 3x3 but its image .* is 16x12"):
        read_visa(tiny_visa, categories=["pcb1"])


def test_visa_unknown_object(tiny_visa: Path) -> None:
    with pytest.raises(DataError, match=r"unknown category \['capsules'\].*available: \['candle', 'pcb1'\]"):
        read_visa(tiny_visa, categories=["capsules"])
