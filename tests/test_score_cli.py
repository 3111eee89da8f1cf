"""`python -m anomaly_rl.score`: end to end in a subprocess, and its input handling in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from anomaly_rl.score import ScoreInputError, read_cases, score_cases

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

CASES = [
    {  # exact box, full format, right letter: 1 + 1 + 1.2
        "response": "<think>Look at [10, 10, 20, 20].</think><rethink>A scratch defect.</rethink><answer>a</answer>",
        "label": "anomalous",
        "boxes": [[10, 10, 20, 20]],
        "image_size": [100, 100],
    },
    {  # right letter only: cls 1, no region -> loc 0, fmt 0.2 (exact answer)
        "response": "<answer>b</answer>",
        "label": "normal",
        "boxes": [],
        "image_size": [100, 100],
    },
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_end_to_end(tmp_path: Path) -> None:
    cases = write_lines(tmp_path / "cases.jsonl", [json.dumps(c) for c in CASES])
    env = {**os.environ, "ANOMALY_RL_ROOT": str(tmp_path), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anomaly_rl.score",
            "schema=adfm",
            "reward=adfm",
            f"input={cases}",
            "output=scores.jsonl",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and [r["line"] for r in rows] == [1, 2]
    assert rows[0]["cls"] == 1.0 and rows[0]["loc"] == 1.0 and rows[0]["fmt"] == pytest.approx(1.2)
    assert rows[0]["total"] == pytest.approx(3.2) and rows[0]["follows_schema"] is True
    assert (rows[1]["cls"], rows[1]["loc"], rows[1]["fmt"]) == (1.0, 0.0, 0.2)
    assert rows[1]["total"] == pytest.approx(1.2) and rows[1]["answer"] == "b"
    summaries = list((tmp_path / "logs" / "score").rglob("summary.json"))  # the run folder
    assert len(summaries) == 1
    assert json.loads(summaries[0].read_text())["total"]["mean"] == pytest.approx(2.2)


def test_cli_names_the_malformed_line(tmp_path: Path) -> None:
    cases = write_lines(tmp_path / "cases.jsonl", [json.dumps(CASES[0]), "{not json"])
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_rl.score", f"input={cases}", f"output={tmp_path / 'out.jsonl'}"],
        cwd=tmp_path,
        env={**os.environ, "ANOMALY_RL_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cases.jsonl, line 2" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_every_schema_and_reward_pair_composes() -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for schema in ("adfm", "r1", "direct"):
            for reward in ("adfm", "binary", "roam", "iou"):
                cfg = compose(
                    "score", overrides=[f"schema={schema}", f"reward={reward}", "input=x", "output=y"]
                )
                assert instantiate(cfg.schema).name == schema
                assert callable(instantiate(cfg.reward))
                assert cfg.skip_malformed is False
    GlobalHydra.instance().clear()


BAD_LINES = [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object"),
    ('{"response": "a", "label": "normal", "boxes": []}', "missing keys ['image_size']"),
    ('{"response": 3, "label": "normal", "boxes": [], "image_size": [1, 1]}', "'response' must be a string"),
    ('{"response": "a", "label": "good", "boxes": [], "image_size": [1, 1]}', "'label' must be"),
    ('{"response": "a", "label": "normal", "boxes": [], "image_size": [0, 1]}', "two positive integers"),
    ('{"response": "a", "label": "normal", "boxes": [], "image_size": [1.5, 1]}', "two positive integers"),
    (
        '{"response": "a", "label": "anomalous", "boxes": [[1, 2, 3]], "image_size": [9, 9]}',
        "each box must be",
    ),
    (
        '{"response": "a", "label": "anomalous", "boxes": [[1, 2, 3, "x"]], "image_size": [9, 9]}',
        "finite number",
    ),
    (
        '{"response": "a", "label": "anomalous", "boxes": [[1, 2, 3, NaN]], "image_size": [9, 9]}',
        "finite number",
    ),
    (
        '{"response": "a", "label": "normal", "boxes": [[1, 2, 3, 4]], "image_size": [9, 9]}',
        "cannot have boxes",
    ),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_malformed_line_is_an_error_naming_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = write_lines(tmp_path / "in.jsonl", [json.dumps(CASES[0]), "", line])
    with pytest.raises(ScoreInputError) as error:
        read_cases(path)
    assert f"{path}, line 3:" in str(error.value) and reason in str(error.value)


def test_skip_malformed_keeps_every_line_in_the_output(tmp_path: Path) -> None:
    from anomaly_rl.rewards.adfm import AdfmReward
    from anomaly_rl.schemas.config import load_schema

    lines = [json.dumps(CASES[0]), "", BAD_LINES[0][0], json.dumps(CASES[1])]
    cases = read_cases(write_lines(tmp_path / "in.jsonl", lines), skip_malformed=True)
    records = score_cases(cases, load_schema("adfm"), AdfmReward())
    assert [(r["index"], r["line"]) for r in records] == [(0, 1), (1, 3), (2, 4)]  # blank line 2 is no case
    assert "error" in records[1] and "total" not in records[1]
    assert records[0]["total"] == pytest.approx(3.2) and records[2]["total"] == pytest.approx(1.2)
