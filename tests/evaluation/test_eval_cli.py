"""A user's view of `python -m anomaly_rl.evaluate` and `python -m anomaly_rl.predict`.

One very small run is trained in process; the command lines then run as a user would type them
(subprocesses, offline) against that run folder, and their files are read back and checked
against what the run itself wrote and against metrics recomputed here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from anomaly_rl.evaluation.metrics import compute_metrics
from tests.small_run import SMALL, compose_config

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

# What the eval/predict configs also compose: the model and data groups (they have no algo group).
MODEL = [o for o in SMALL if o.startswith("model.")]
DATA = [o for o in SMALL if o.startswith("data.")]
MODEL_DATA = [*MODEL, *DATA]
# Two warm-start steps at a large learning rate: the trained weights must answer differently from
# the untrained model, or a checkpoint that silently failed to load would go unnoticed.
TRAIN = [
    "warm_start.max_steps=2",
    "++warm_start.checkpoint=null",
    "warm_start.warmup_steps=0",
    "warm_start.optimizer.lr=1e-2",
    "algo.max_steps=1",
    "eval.limit=4",
]
FIELDS = {
    "image_path", "category", "label", "boxes", "response", "answer", "pred_boxes", "p_anomalous",
    "follows_schema",
}


def cli(module: str, root: Path, args: list[str], overrides: list[str]) -> subprocess.CompletedProcess[str]:
    """Run an entry point as a user would: offline, one thread, data and model caches shared."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    env.pop("ANOMALY_RL_ROOT", None)
    paths = [f"paths.root_dir={root}", f"paths.data_dir={root / 'data'}", f"paths.cache_dir={root / 'cache'}"]
    result = subprocess.run(
        [sys.executable, "-m", module, *args, *overrides, *paths],
        cwd=root, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def same_number(stored: Any, computed: float) -> bool:
    """metrics.json stores NaN as null; everything else must match the recomputed value."""
    if isinstance(computed, float) and math.isnan(computed):
        return stored is None
    return stored is not None and math.isclose(stored, computed, rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished tiny run and the `evaluate ckpt=<run>` folder written from it."""
    from anomaly_rl.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("cli")
        run = root / "run"
        train(compose_config("train", root, run, [*SMALL, *TRAIN]))
    finally:
        torch.set_num_threads(threads)
    assert (run / "final" / "weights.pt").is_file()
    eval_dir = root / "eval_out"
    cli(
        "anomaly_rl.evaluate",
        root,
        [f"ckpt={run}", "eval.limit=6", "eval.max_new_tokens=24", f"hydra.run.dir={eval_dir}"],
        DATA,  # no model overrides: with ckpt the model is the one the run trained
    )
    return {"root": root, "run": run, "eval": eval_dir}


def test_evaluate_cli_writes_predictions_and_metrics_that_recompute(trained: dict[str, Path]) -> None:
    eval_dir = trained["eval"]
    predictions = read_jsonl(eval_dir / "predictions.jsonl")
    # The synthetic test split holds 6 images here (eval.limit=6 keeps them all).
    assert len(predictions) == 6
    assert len({p["image_path"] for p in predictions}) == 6, "one line per evaluated image"
    for p in predictions:
        assert FIELDS <= p.keys(), FIELDS - p.keys()
        assert Path(p["image_path"]).is_file()
        assert p["category"] in {"metal", "pill"} and p["label"] in {"normal", "anomalous"}
        assert 0.0 <= p["p_anomalous"] <= 1.0
        assert isinstance(p["follows_schema"], bool) and isinstance(p["response"], str)
        assert p["answer"] in {"a", "b", None}
        assert (p["label"] == "anomalous") == bool(p["boxes"]), "synthetic defects always have boxes"
    assert {p["label"] for p in predictions} == {"normal", "anomalous"}

    stored = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    recomputed = compute_metrics(predictions)
    assert set(stored["per_category"]) == {"metal", "pill"} == set(recomputed["per_category"])
    for key, value in recomputed["overall"].items():
        assert same_number(stored["overall"][key], value), (key, stored["overall"][key], value)
    for category, values in recomputed["per_category"].items():
        for key, value in values.items():
            assert same_number(stored["per_category"][category][key], value), (category, key)
    assert stored["overall"]["n_images"] == 6 and "image_AUROC" in stored["overall"]
    # evaluate adds the share of AUROC inputs not read from token probabilities.
    text_share = sum(p["p_source"] == "text" for p in predictions) / len(predictions)
    assert stored["overall"]["p_from_text_rate"] == pytest.approx(text_share)
    assert stored["notes"] == recomputed["notes"]

    markdown = (eval_dir / "metrics.md").read_text(encoding="utf-8")
    assert "| metal |" in markdown and "| pill |" in markdown and "**overall**" in markdown
    # The folder records the model actually evaluated: the run's, not the eval config's default.
    evaluated = OmegaConf.load(eval_dir / "config.yaml")
    assert evaluated.ckpt == str(trained["run"])
    assert evaluated.model == OmegaConf.load(trained["run"] / "config.yaml").model
    assert evaluated.model.tiny.hidden_size == 32


def test_evaluate_cli_uses_the_runs_final_weights(trained: dict[str, Path]) -> None:
    """The first four images are those the run evaluated itself after GRPO: same weights, same answers."""
    cli_predictions = read_jsonl(trained["eval"] / "predictions.jsonl")
    run_predictions = read_jsonl(trained["run"] / "eval_grpo" / "predictions.jsonl")
    assert len(run_predictions) == 4
    for ours, theirs in zip(cli_predictions[:4], run_predictions, strict=True):
        assert ours["image_path"] == theirs["image_path"]
        assert ours["response"] == theirs["response"]
        assert ours["p_anomalous"] == pytest.approx(theirs["p_anomalous"], abs=1e-5)


def test_evaluate_ckpt_compares_its_images_with_the_runs_training_images(trained: dict[str, Path]) -> None:
    """The run recorded its training images; evaluating with ckpt compares the split against them."""
    from anomaly_rl.data.leakage import LEAKAGE_CKPT_REPORT, LEAKAGE_REPORT, TRAINING_IMAGES, LeakageError
    from anomaly_rl.evaluate import evaluate

    assert (trained["run"] / TRAINING_IMAGES).is_file()
    clean = json.loads((trained["eval"] / LEAKAGE_CKPT_REPORT).read_text(encoding="utf-8"))
    assert clean["overlaps"] == [] and clean["evaluation_images"] == 6 and clean["training_images"] > 0
    assert json.loads((trained["eval"] / LEAKAGE_REPORT).read_text(encoding="utf-8"))["overlaps"] == []
    # Evaluating the run on its own training images: every one is a training image of that run.
    out = trained["root"] / "eval_on_train"
    cfg = compose_config("eval", trained["root"], out, [*DATA, f"ckpt={trained['run']}", "eval.split=train",
                                                          "eval.limit=3"])
    with pytest.raises(LeakageError, match=r"3 evaluation/training image pair\(s\)") as error:
        evaluate(cfg)
    assert "data.leakage.allow=true" in str(error.value)
    report = json.loads((out / LEAKAGE_CKPT_REPORT).read_text(encoding="utf-8"))
    assert all(o["identical"] and o["evaluation"] == o["training"] for o in report["overlaps"])
    assert not (out / "predictions.jsonl").exists(), "nothing is evaluated once leakage is found"


def test_zero_shot_evaluation_answers_with_the_untrained_model(trained: dict[str, Path]) -> None:
    """Without ckpt the configured (untrained) model is evaluated: the results table's zero-shot row."""
    from anomaly_rl.evaluate import evaluate

    root = trained["root"]
    out = root / "eval_zero_shot"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config("eval", root, out, [*MODEL_DATA, "eval.limit=6", "eval.max_new_tokens=24"])
        assert cfg.get("ckpt") is None
        metrics = evaluate(cfg)
    finally:
        torch.set_num_threads(threads)
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 6 and (out / "metrics.md").is_file()
    assert metrics["overall"]["n_images"] == 6.0
    stored = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key, value in compute_metrics(predictions)["overall"].items():
        assert same_number(stored["overall"][key], value), key
    trained_predictions = read_jsonl(trained["eval"] / "predictions.jsonl")
    assert [p["image_path"] for p in predictions] == [p["image_path"] for p in trained_predictions]
    assert [p["response"] for p in predictions] != [p["response"] for p in trained_predictions], (
        "zero-shot and trained weights gave identical responses: the weights were not told apart"
    )


def test_predict_cli_prints_the_answer_and_draws_the_boxes(trained: dict[str, Path]) -> None:
    root, run = trained["root"], trained["run"]
    evaluated = read_jsonl(trained["eval"] / "predictions.jsonl")
    target = next(p for p in evaluated if p["label"] == "anomalous")
    out_dir = root / "pred"
    result = cli(
        "anomaly_rl.predict",
        root,
        [
            f"ckpt={run}", f"image={target['image_path']}", f"category={target['category']}",
            "max_new_tokens=24", f"hydra.run.dir={out_dir}",
        ],
        [],  # with ckpt the model is the run's; predict composes no data group
    )
    saved = json.loads((out_dir / "prediction.json").read_text(encoding="utf-8"))
    assert {"image", "response", "decision", "p_anomalous", "boxes", "png"} <= saved.keys()
    assert saved["image"] == target["image_path"]
    # The same weights, image and prompt as the evaluation of that image: the same greedy answer.
    assert saved["response"] == target["response"]
    assert saved["p_anomalous"] == pytest.approx(target["p_anomalous"], abs=1e-5)
    expected = {"a": "anomalous", "b": "normal"}.get(target["answer"] or "", "undecided")
    assert saved["decision"] == expected
    assert saved["boxes"] == target["pred_boxes"]

    assert saved["response"] in result.stdout
    decision_lines = [line for line in result.stdout.splitlines() if line.startswith("decision: ")]
    assert len(decision_lines) == 1 and decision_lines[0].startswith(f"decision: {expected} (p_anomalous=")

    png = Path(saved["png"])
    assert png == out_dir / "prediction.png"
    original = Image.open(target["image_path"]).convert("RGB")
    drawn = Image.open(png)
    assert drawn.format == "PNG" and drawn.size == original.size
    drawn = drawn.convert("RGB")
    if saved["boxes"]:
        x1, y1 = (int(round(v)) for v in saved["boxes"][0][:2])
        assert drawn.getpixel((x1, y1)) == (255, 0, 0), "a predicted box is outlined in red"
    else:
        assert list(drawn.getdata()) == list(original.getdata()), "no box: the image is unchanged"


def test_predict_on_a_users_image_of_another_size(trained: dict[str, Path]) -> None:
    """An image of any size and shape: the PNG keeps the user's size, the boxes stay inside it."""
    from anomaly_rl.predict import predict

    root, run = trained["root"], trained["run"]
    photo = root / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)).save(photo)
    out = root / "pred_photo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config("predict", root, out, [f"ckpt={run}", f"image={photo}", "max_new_tokens=24"])
        result = predict(cfg)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "prediction.json").read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert Image.open(out / "prediction.png").size == (97, 61)
    assert result["decision"] in {"anomalous", "normal", "undecided"} and 0.0 <= result["p_anomalous"] <= 1.0
    for x1, y1, x2, y2 in result["boxes"]:
        assert 0 <= x1 <= x2 <= 97 and 0 <= y1 <= y2 <= 61


def test_predict_names_a_missing_image(tmp_path: Path) -> None:
    from anomaly_rl.predict import predict

    cfg = compose_config("predict", tmp_path, tmp_path / "out", [*MODEL, f"image={tmp_path / 'nope.png'}"])
    with pytest.raises(FileNotFoundError, match=r"image=.*nope\.png"):
        predict(cfg)


def test_draw_boxes_outlines_exclusive_edge_boxes_in_original_pixels(tmp_path: Path) -> None:
    """Box (x1, y1, x2, y2) covers pixels x1..x2-1: the outline sits on exactly those edge pixels."""
    from anomaly_rl.predict import draw_boxes

    source = tmp_path / "grey.png"
    Image.new("RGB", (90, 40), (128, 128, 128)).save(source)
    out = draw_boxes(source, [[10, 5, 30, 25]], tmp_path / "sub" / "drawn.png")
    drawn = Image.open(out)
    assert drawn.format == "PNG" and drawn.size == (90, 40)
    pixels = np.asarray(drawn.convert("RGB"))
    red = np.all(pixels == (255, 0, 0), axis=-1)
    expected = np.zeros((40, 90), dtype=bool)  # width max(1, round(40 / 100)) = 1 pixel
    expected[5, 10:30] = expected[24, 10:30] = True
    expected[5:25, 10] = expected[5:25, 29] = True
    assert np.array_equal(red, expected)
    assert np.all(pixels[~red] == 128), "nothing but the outline changes"


def test_evaluating_a_run_asks_in_its_wording_at_its_length(tmp_path: Path) -> None:
    """`evaluate ckpt=RUN` takes the run's model, schema and evaluation length (unless set)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from anomaly_rl.evaluate import _run_settings

    run = tmp_path / "run"
    run.mkdir()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        trained = compose("train", overrides=["+experiment=mvtec_fewshot"])
        OmegaConf.save(trained, run / "config.yaml")
        for overrides, tokens in (([f"ckpt={run}"], 512), ([f"ckpt={run}", "eval.max_new_tokens=100"], 100), ([], 64)):
            cfg = compose("eval", overrides=overrides)
            _run_settings(cfg)
            assert cfg.eval.max_new_tokens == tokens
            assert cfg.schema.style == ("instruction" if overrides else "short")
            assert cfg.model.name == ("qwen2_5_vl_3b" if overrides else "tiny")


def test_evaluation_with_the_static_backend_gives_the_eager_answers(trained: dict[str, Path]) -> None:
    """`eval.rollout_backend=static` (a static KV cache; a CUDA graph per token on a GPU) decodes the
    same greedy answers as the eager loop, so the metrics do not depend on the backend."""
    from anomaly_rl.evaluate import evaluate

    out = trained["root"] / "eval_static"
    cfg = compose_config("eval", trained["root"], out, [*DATA, f"ckpt={trained['run']}", "eval.rollout_backend=static"])
    evaluate(cfg)
    static = read_jsonl(out / "predictions.jsonl")
    eager = read_jsonl(trained["eval"] / "predictions.jsonl")
    assert [p["response"] for p in static] == [p["response"] for p in eager]
    for ours, theirs in zip(static, eager, strict=True):
        assert ours["p_anomalous"] == pytest.approx(theirs["p_anomalous"], abs=1e-5)
