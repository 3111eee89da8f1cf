from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from anomaly_rl.data.export import main, samples_to_coco
from anomaly_rl.data.records import Sample


def sample(name: str, boxes: tuple, label: str = "anomalous") -> Sample:
    return Sample(image_path=f"/d/{name}.png", label=label, category="pill", defect_type="crack" if boxes else "good",
                  mask_path=None, boxes=boxes, image_size=(40, 30), split="test")


def test_hand_worked_conversion() -> None:
    coco = samples_to_coco([sample("a", ((2.0, 3.0, 12.0, 8.0), (0.0, 0.0, 1.0, 1.0))),
                            sample("b", (), "normal")])
    assert [i["id"] for i in coco["images"]] == [1, 2]
    assert coco["images"][1] == {"id": 2, "file_name": "/d/b.png", "width": 40, "height": 30, "label": "normal",
                                 "category": "pill", "defect": "good", "split": "test"}
    assert [a["bbox"] for a in coco["annotations"]] == [[2.0, 3.0, 10.0, 5.0], [0.0, 0.0, 1.0, 1.0]]
    assert [a["area"] for a in coco["annotations"]] == [50.0, 1.0]
    assert {a["image_id"] for a in coco["annotations"]} == {1}
    assert [a["id"] for a in coco["annotations"]] == [1, 2]
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in coco["annotations"])


def test_pycocotools_loads_it_and_scores_ground_truth_perfectly(tmp_path: Path) -> None:
    samples = [sample("a", ((2.0, 3.0, 12.0, 8.0),)), sample("b", ((20.0, 10.0, 35.0, 28.0), (1.0, 1.0, 6.0, 9.0))),
               sample("c", (), "normal")]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(samples_to_coco(samples)))
    gt = COCO(str(path))
    assert len(gt.getImgIds()) == 3 and len(gt.getAnnIds()) == 3 and gt.loadCats(1)[0]["name"] == "defect"
    detections = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
                  for a in gt.dataset["annotations"]]
    # A box shifted by half its width must lower AP: the bbox really is [x, y, w, h].
    shifted = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]) for d in detections]
    scores = []
    for dets in (detections, shifted):
        evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        scores.append(evaluator.stats[1])  # AP50
    assert scores[0] == pytest.approx(1.0) and scores[1] < 0.5


def test_cli_on_the_synthetic_reader(tmp_path: Path, tiny_synthetic: Path, tiny_synthetic_config) -> None:
    out = tmp_path / "coco" / "synthetic.json"
    overrides = [f"data.synthetic.{k}={json.dumps(v).replace(' ', '')}" for k, v in tiny_synthetic_config.to_dict().items()]
    assert main(["data=synthetic", f"data.root={tiny_synthetic}", f"out={out}", "split=test", "data.val_size=2", *overrides]) == 0
    gt = COCO(str(out))
    images = gt.dataset["images"]
    assert images and {i["split"] for i in images} == {"test"}
    assert len(gt.getAnnIds()) >= sum(i["label"] == "anomalous" for i in images)


def test_cli_on_the_real_sample(tmp_path: Path, mvtec_sample: Path) -> None:
    out = tmp_path / "mvtec.json"
    assert main(["data=mvtec", f"data.root={mvtec_sample}", f"out={out}", "data.shots=2"]) == 0
    gt = COCO(str(out))
    assert len(gt.getImgIds()) == 49 - (6 - 2) * 2  # unused train/good images are in no split
    assert main(["data=mvtec", f"data.root={tmp_path / 'missing'}", f"out={out}"]) == 1
    assert main(["data=visa", f"out={out}"]) == 1  # no data.root


def test_cli_usage() -> None:
    assert main(["data=synthetic"]) == 2
