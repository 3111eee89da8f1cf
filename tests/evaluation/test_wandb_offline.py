"""A user's view of W&B logging: run the pipeline with `logger=wandb` offline, read the run back.

The offline run folder is what `wandb sync` uploads, so what is in it is what the user will see:
the `.wandb` record log is parsed here (LevelDB-style log of protobuf `Record`s, as wandb writes
it) and the table files and staged artifact files it names are opened and checked.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from tests.small_run import compose_small_run

WANDB_RUN = [
    "logger=wandb",  # overrides SMALL's logger=none (the later override wins)
    "algo.log_samples_every=1",
    "algo.max_steps=2",
    "++warm_start.checkpoint=null",
    "eval.limit=6",  # the start and grpo rows, for the W&B summary
]
GROUP_SIZE, PROMPTS = 3, 2
TABLE_COLUMNS = ["step", "image", "category", "label", "response", "cls", "loc", "fmt", "total", "advantage"]

# ------------------------------------------------------------------ reading a .wandb file
# The record log wandb writes (its former `datastore` module, now in wandb-core): a 7-byte file
# header, then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type); a record
# is one FULL chunk or FIRST, MIDDLE..., LAST chunks. A block's tail under 7 bytes is padding.
FILE_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[Any]:
    """Every protobuf Record of a .wandb file, checksums verified (a format change fails loudly)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb record log"
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER.size:
            pos += left
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        pos += CHUNK_HEADER.size
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left - CHUNK_HEADER.size
            continue
        chunk = data[pos : pos + length]
        pos += length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_closed_log(path: Path, timeout_s: float = 60.0) -> list[Any]:
    """The records of a finished run's log, once wandb's writer process has flushed all of them.

    wandb-core writes the file from its own process and may still be flushing when `finish()` has
    returned (seen on a loaded 2-core machine: a checksum failed on a chunk whose bytes were not
    all written yet). Read again until the log ends with the exit record and every checksum holds;
    a log that is still broken after `timeout_s` fails the test with the last error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(read_records(path))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
            problem = f"{path}: no exit record yet ({len(records)} records)"
        except AssertionError as error:
            problem = str(error)
        if time.monotonic() > deadline:
            raise AssertionError(f"{problem} after {timeout_s:.0f} s")
        time.sleep(0.5)


def summary_values(records: list[Any]) -> dict[str, Any]:
    """The run's summary as the UI shows it (the last value written for each key)."""
    values: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """The logged rows, keys as the UI shows them ("train/reward"; nested keys joined by "/")."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


# ------------------------------------------------------------------ the run
def compose_run(tmp_path: Path, overrides: list[str]) -> DictConfig:
    return compose_small_run(tmp_path, "run", overrides)


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B offline, silent, without credentials, every folder it writes inside tmp_path.

    The base URL points at a closed local port: were anything to reach for the network, it would
    fail at once instead of hanging the test.
    """
    import wandb

    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for variable, sub in [
        ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts"),
    ]:
        monkeypatch.setenv(variable, str(home / sub))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wandb.teardown()  # settings are read when the W&B service starts: start it afresh under these
    try:
        yield home
    finally:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
        torch.set_num_threads(threads)


def varied_format_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    """AD-FM's reward with R_fmt replaced by a value read off the response text.

    A barely trained tiny model earns 0 everywhere, and a table of zeros would show nothing: this
    way each row's reward (and so its advantage) differs, and can be recomputed from the table.
    """
    from anomaly_rl.rewards.adfm import AdfmReward

    real = AdfmReward.components

    def components(self: AdfmReward, parsed: Any, sample: Any) -> dict[str, float]:
        return {**real(self, parsed, sample), "fmt": fake_fmt(parsed.text)}

    monkeypatch.setattr(AdfmReward, "components", components)


def fake_fmt(text: str) -> float:
    return (len(text) % 7) / 6


def test_offline_wandb_run_holds_the_logged_scalars_and_sample_tables(
    tmp_path: Path, offline_wandb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomaly_rl.train import train

    varied_format_reward(monkeypatch)
    cfg = compose_run(tmp_path, WANDB_RUN)
    train(cfg)
    run_dir = tmp_path / "run"

    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    [log_file] = offline[0].glob("run-*.wandb")
    records = read_closed_log(log_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "run" in kinds and kinds[-1] == "exit", "the run was not closed"
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "anomaly_rl" and run.display_name == "train"
    rows = history_rows(records)

    # Warm start: one row per SFT step, with its loss.
    sft = [row for row in rows if "sft/loss" in row]
    assert len(sft) == 2 and all(math.isfinite(row["sft/loss"]) and row["sft/loss"] > 0 for row in sft)

    # GRPO: every scalar of every step, as the run recorded it in grpo_history.json.
    history = json.loads((run_dir / "grpo_history.json").read_text(encoding="utf-8"))
    grpo = [row for row in rows if "train/reward" in row]
    assert len(history) == len(grpo) == 2
    for logged, recorded in zip(grpo, history, strict=True):
        for key in ("train/reward", "train/zero_std_group_fraction", "train/lr", "time/step_s", "time/rollout_s"):
            assert key in recorded and key in logged, key
        for key, value in recorded.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    # One table of sampled responses per step (log_samples_every=1), before that step's scalars.
    tables = [row for row in rows if "train/samples/_type" in row]
    assert len(tables) == 2
    weights = {name: float(cfg.reward[f"w_{name}"]) for name in ("cls", "loc", "fmt")}
    for step, (row, recorded) in enumerate(zip(tables, history, strict=True), start=1):
        assert row["train/samples/_type"] == "table-file" and row["train/samples/nrows"] == PROMPTS * GROUP_SIZE
        table_file = offline[0] / "files" / row["train/samples/path"]
        table = json.loads(table_file.read_text(encoding="utf-8"))
        assert table["columns"] == TABLE_COLUMNS
        data = [dict(zip(TABLE_COLUMNS, values, strict=True)) for values in table["data"]]
        assert len(data) == PROMPTS * GROUP_SIZE and {d["step"] for d in data} == {step}
        assert {d["category"] for d in data} <= {"metal", "pill"}
        assert all(isinstance(d["response"], str) and d["response"] for d in data)
        for d in data:  # each row's reward belongs to that row's response
            assert d["fmt"] == pytest.approx(fake_fmt(d["response"]))
            assert d["total"] == pytest.approx(sum(w * d[name] for name, w in weights.items()))
        totals = np.array([d["total"] for d in data]).reshape(PROMPTS, GROUP_SIZE)
        assert totals.std() > 0, "the rewards should vary in this run"
        # The table shows the very rollout whose mean reward was logged for that step ...
        assert totals.mean() == pytest.approx(recorded["train/reward"], abs=1e-6)
        # ... with its group-relative advantages: (r - group mean) / (group std + eps), 0 if flat.
        advantages = np.array([d["advantage"] for d in data]).reshape(PROMPTS, GROUP_SIZE)
        spread = totals.std(axis=1, ddof=1, keepdims=True)
        expected = np.where(
            spread > 1e-6, (totals - totals.mean(axis=1, keepdims=True)) / (spread + cfg.algo.advantage_eps), 0.0
        )
        assert np.allclose(advantages, expected, atol=1e-5), (advantages, expected)
        for group in range(PROMPTS):  # one prompt per group: one image, category and label
            members = data[group * GROUP_SIZE : (group + 1) * GROUP_SIZE]
            assert len({(d["category"], d["label"]) for d in members}) == 1

    check_table_images(records, cfg, tmp_path)
    check_evaluation_summary(records, run_dir)


def check_evaluation_summary(records: list[Any], run_dir: Path) -> None:
    """Every evaluation row's metrics (localisation accuracy included) are in the run's summary, and
    the run folder records its training images and its (clean) leakage check."""
    from anomaly_rl.data.leakage import LEAKAGE_REPORT, TRAINING_IMAGES, Fingerprints

    summary = summary_values(records)
    for row in ("start", "grpo"):
        metrics = json.loads((run_dir / f"eval_{row}" / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["overall"]["box_n_scored"] > 0, "no scored image: the LocAcc checks below would be empty"
        for scope, values in [("", metrics["overall"]), *((f"{c}/", v) for c, v in metrics["per_category"].items())]:
            for key in ("n_images", "box_LocAcc@0.1", "box_LocAcc@0.3", "box_LocAcc@0.5"):
                if values[key] is None:  # NaN in metrics.json: left out of the summary
                    assert f"eval/{row}/{scope}{key}" not in summary
                else:
                    assert summary[f"eval/{row}/{scope}{key}"] == pytest.approx(values[key]), (row, scope, key)
    leakage = json.loads((run_dir / LEAKAGE_REPORT).read_text(encoding="utf-8"))
    assert leakage["overlaps"] == [] and leakage["training_images"] > 0
    assert len(Fingerprints.load(run_dir / TRAINING_IMAGES)) == leakage["training_images"]


def check_table_images(records: list[Any], cfg: DictConfig, tmp_path: Path) -> None:
    """The images of the table (in its run_table artifact) are dataset images with their true boxes."""
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert len(artifacts) == 2 and all(a.type == "run_table" for a in artifacts)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    by_pixels = {
        np.asarray(Image.open(s.image_path).convert("RGB")).tobytes(): s for s in datamodule.train_samples
    }
    for artifact in artifacts:
        entries = {c.path: Path(c.local_path) for c in artifact.manifest.contents}
        for local in entries.values():
            assert local.is_file() and local.is_relative_to(tmp_path), f"W&B wrote outside the test: {local}"
        table = json.loads(entries["train/samples.table.json"].read_text(encoding="utf-8"))
        check_table_rows(table, entries, by_pixels)


def check_table_rows(table: dict[str, Any], entries: dict[str, Path], by_pixels: dict[bytes, Any]) -> None:
    image_column = table["columns"].index("image")
    label_column = table["columns"].index("label")
    assert len(table["data"]) == PROMPTS * GROUP_SIZE
    for values in table["data"]:
        picture = values[image_column]
        assert picture["_type"] == "image-file"
        pixels = np.asarray(Image.open(entries[picture["path"]]).convert("RGB")).tobytes()
        sample = by_pixels.get(pixels)
        assert sample is not None, "a table image is not one of the training images"
        assert values[label_column] == sample.label
        w, h = sample.image_size
        shown = sorted(
            (b["position"]["minX"] * w, b["position"]["minY"] * h, b["position"]["maxX"] * w, b["position"]["maxY"] * h)
            for b in picture["boxes"]["truth"]
        )
        truth = sorted(tuple(map(float, b)) for b in sample.boxes)
        assert len(shown) == len(truth)
        assert np.allclose(np.array(shown).reshape(-1, 4), np.array(truth).reshape(-1, 4), atol=1e-6)
        assert {b["class_id"] for b in picture["boxes"]["truth"]} <= {0}
        assert {b["class_id"] for b in picture["boxes"]["prediction"]} <= {1}
