"""`python -m anomaly_rl.evaluate data=mmad`: end to end in a subprocess, and the answering in process.

The subprocess run uses an untrained tiny model, so its answers are noise: it checks the plumbing
(every selected question answered or counted unparseable, MMAD's files, scores that match a
rescoring of the answers file). The in-process test scripts the model's answers to check, by hand,
how responses become letters and letters become scores.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import pytest
from omegaconf import OmegaConf

from anomaly_rl.data.files import load_rgb
from anomaly_rl.evaluation import mmad_runner
from anomaly_rl.evaluation.mmad import SCORES_CSV, SCORES_MD, SCORES_MMAD_CSV, read_answers, score_mmad
from anomaly_rl.models.loading import load_model_and_processor
from tests.mmad.fixture import build_mmad_fixture

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

TINY = {
    "image_size": 56,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "vision_hidden_size": 32,
    "vision_depth": 1,
    "vision_heads": 2,
    "bpe_vocab_size": 400,
}

# The fixture's DS-MVTec and VisA questions (tests/mmad/fixture.py docstring), in mmad.json order.
SELECTED = {
    "DS-MVTec/bottle/image/broken_large/000.png": [
        "Anomaly Detection", "Defect Classification", "Defect Localization", "Defect Description",
        "Defect Analysis", "Object Classification", "Object Structure", "Object Details",
    ],
    "DS-MVTec/bottle/image/good/000.png": ["Anomaly Detection", "Object Classification", "Object Details"],
    "VisA/candle/test/bad/000.JPG": ["Anomaly Detection", "Defect Localization", "Object Structure"],
    "VisA/candle/test/good/001.JPG": ["Anomaly Detection", "Object Structure"],
}
MMAD_FIELDS = {"image", "question", "question_type", "correct_answer", "gpt_answer", "response"}


def _csv_grid(path: Path) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0][1:], [(r[0], [float(v) if v else None for v in r[1:]]) for r in rows[1:]]


def test_evaluate_cli_end_to_end(tmp_path: Path) -> None:
    fixture = build_mmad_fixture(tmp_path)
    overrides = [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "anomaly_rl.evaluate", "data=mmad", f"data.root={fixture.root}",
            "data.datasets=[DS-MVTec,VisA]", *overrides, "eval.max_new_tokens=16", "eval.batch_size=4",
            f"paths.root_dir={tmp_path}",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answers_files = list((tmp_path / "logs" / "evaluate").rglob(mmad_runner.ANSWERS_JSON))
    assert len(answers_files) == 1
    run_dir = answers_files[0].parent
    records = json.loads(answers_files[0].read_text(encoding="utf-8"))

    # One record per selected question, in the file's order, in MMAD's format.
    assert isinstance(records, list)
    assert [(r["image"], r["question_type"]) for r in records] == [
        (key, qtype) for key, types in SELECTED.items() for qtype in types
    ]
    entries = fixture.entries()
    for record in records:
        assert set(record) == MMAD_FIELDS
        asked = entries[record["image"]]["conversation"][
            [q["type"] for q in entries[record["image"]]["conversation"]].index(record["question_type"])
        ]
        assert record["question"]["type"] == "text"
        assert record["question"]["options"] == asked["Options"]
        assert record["question"]["text"].splitlines()[0] == asked["Question"]
        assert record["correct_answer"] == asked["Answer"]
        # Answered with one of its letters, or None (unparseable); never anything else.
        assert record["gpt_answer"] is None or record["gpt_answer"] in asked["Options"]
        assert isinstance(record["response"], str)

    # Every question is in the table: counted, and unparseable ones counted as such.
    table = score_mmad(read_answers(answers_files[0]))
    assert table.total == len(records) == 16
    assert table.unparseable == sum(r["gpt_answer"] is None for r in records)
    per_dataset = Counter(r["image"].split("/")[0] for r in records)
    assert {d: sum(t.total for t in row.values()) for d, row in table.tallies.items()} == per_dataset
    assert table.tallies["DS-MVTec"]["Object Analysis"].total == 3  # Structure + Details pooled

    # The CSV holds exactly the numbers a rescoring of answers.json gives.
    columns, grid = _csv_grid(run_dir / SCORES_CSV)
    assert columns == [*table.question_types, "Average"]
    assert grid == table.grid()
    markdown = (run_dir / SCORES_MD).read_text(encoding="utf-8")
    assert f"Unparseable answers (scored wrong, not dropped): {table.unparseable} of 16." in markdown
    assert "# MMAD accuracy (%)" in result.stdout
    # MMAD's convention beside it, and no training run to check leakage against (an untrained model)
    assert (run_dir / SCORES_MMAD_CSV).is_file() and "MMAD's summary script" in markdown
    assert not (run_dir / "leakage.json").exists()


# --- in process, with scripted answers ----------------------------------------------------------


def _tiny_model(tmp_path: Path) -> tuple[Any, Any]:
    cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    cfg.cache_dir = str(tmp_path / "tiny_models")
    cfg.tiny = OmegaConf.merge(cfg.tiny, TINY)
    return load_model_and_processor(OmegaConf.to_container(cfg))


def test_scripted_answers_become_letters_and_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_mmad_fixture(tmp_path).root
    model, processor = _tiny_model(tmp_path)
    schema = hydra.utils.instantiate(OmegaConf.load(CONF / "schema" / "adfm.yaml"))

    # VisA, in order: bad AD (options reversed: A "No", B "Yes"; answer B), bad DL (C), bad OS (A),
    # good AD (B), good OS (B).
    detections = {"VisA/candle/test/bad/000.JPG": "a", "VisA/candle/test/good/001.JPG": None}
    seen_samples: list[Any] = []

    def scripted_predict(model: Any, processor: Any, schema: Any, samples: Any, **kwargs: Any) -> list[dict]:
        seen_samples.extend(samples)
        return [
            {"answer": detections[s.image_path.split("/mmad/")[1]], "response": f"said {s.category}"}
            for s in samples
        ]

    choice_texts = iter(["The answer is C.", "I am not sure.", "B. Four"])  # DL, bad OS, good OS
    encoded_calls: list[tuple[list[str], list[list[Any]]]] = []
    real_sample, real_encode = mmad_runner.sample_responses, mmad_runner.encode_prompts

    def recording_encode(model: Any, processor: Any, texts: Any, images: Any) -> Any:
        encoded_calls.append((list(texts), [list(i) for i in images]))
        return real_encode(model, processor, texts, images)

    def scripted_sample(model: Any, enc: Any, group_size: int, **kwargs: Any) -> Any:
        assert kwargs["temperature"] == 0.0 and kwargs["eos_token_ids"]  # greedy, stops at <|im_end|>
        rollout = real_sample(model, enc, group_size, **kwargs)
        return dataclasses.replace(rollout, texts=[next(choice_texts) for _ in rollout.texts])

    monkeypatch.setattr(mmad_runner, "predict", scripted_predict)
    monkeypatch.setattr(mmad_runner, "encode_prompts", recording_encode)
    monkeypatch.setattr(mmad_runner, "sample_responses", scripted_sample)

    cfg = OmegaConf.create(
        {
            "data": {"_target_": "anomaly_rl.data.mmad.read_mmad", "root": str(root), "datasets": ["VisA"],
                     "load_boxes": False},
            "eval": {"batch_size": 2, "max_new_tokens": 4, "limit": None},
        }
    )
    summary = mmad_runner.evaluate_mmad(model, processor, schema, cfg, tmp_path / "run")

    records = read_answers(tmp_path / "run" / mmad_runner.ANSWERS_JSON)
    assert [r["gpt_answer"] for r in records] == ["B", "C", None, None, "B"]
    assert [r["response"] for r in records] == [
        "said candle", "The answer is C.", "I am not sure.", "said candle", "B. Four"
    ]
    assert [s.image_path.split("/mmad/")[1] for s in seen_samples] == list(detections)
    assert all(len(s.reference_paths) == 1 for s in seen_samples)

    # Two batches of at most 2 prompts; query first, then its one reference (random template 002).
    assert [len(texts) for texts, _ in encoded_calls] == [2, 1]
    texts, images = encoded_calls[0]
    assert "Where is the defect?\nA. Top left\nB. Center\nC. Bottom right\nD. No defect" in texts[0]
    assert mmad_runner.CHOICE_INSTRUCTION in texts[0]
    query, reference = images[0]
    assert query.tobytes() == load_rgb(root / "VisA/candle/test/bad/000.JPG").tobytes()
    assert reference.tobytes() == load_rgb(root / "VisA/candle/train/good/002.JPG").tobytes()

    # By hand: AD = (normal 0/1 + anomalous 1/1) / 2 = 50; DL 1/1 = 100; Object Analysis 1/2 = 50.
    assert summary["cells"]["VisA"] == pytest.approx(
        {"Anomaly Detection": 50.0, "Defect Localization": 100.0, "Object Analysis": 50.0}
    )
    assert summary["overall"] == pytest.approx(200 / 3)
    assert (summary["total"], summary["unparseable"]) == (5, 2)
    columns, grid = _csv_grid(tmp_path / "run" / SCORES_CSV)
    assert grid[-1] == ("Average", pytest.approx([50.0, 100.0, 50.0, 200 / 3]))
    # MMAD's convention: bad OS (None) is dropped and good AD, right after it, skipped (None too);
    # AD = (normal: none counted -> 0 + anomalous 1/1) / 2 = 50; DL 100; OA: good OS 1/1 = 100.
    assert summary["mmad"]["cells"]["VisA"] == pytest.approx(
        {"Anomaly Detection": 50.0, "Defect Localization": 100.0, "Object Analysis": 100.0}
    )
    assert (summary["mmad"]["total"], summary["mmad"]["unparseable"], summary["mmad"]["skipped"]) == (3, 1, 1)
    columns, grid = _csv_grid(tmp_path / "run" / SCORES_MMAD_CSV)
    assert grid[-1] == ("Average", pytest.approx([50.0, 100.0, 100.0, 250 / 3]))
