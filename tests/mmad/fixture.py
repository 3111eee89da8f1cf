"""A tiny MMAD-format benchmark drawn on the fly, for any test that needs one.

    from tests.mmad.fixture import build_mmad_fixture
    fx = build_mmad_fixture(tmp_path)      # writes <tmp_path>/mmad/mmad.json and its images
    data = read_mmad(fx.root)

Three source datasets, seven query images, 22 questions of all eight MMAD types:

    key (size w x h)                                                label      AD answer  questions
    DS-MVTec/bottle/image/broken_large/000.png (40x30)              anomalous  A (Yes)    8: one of each type
    DS-MVTec/bottle/image/good/000.png (40x30)                      normal     B (No)     3: AD, OC, OD
    VisA/candle/test/bad/000.JPG (32x24)                            anomalous  B (Yes)    3: AD, DL, OS; AD reversed
    VisA/candle/test/good/001.JPG (32x24)                           normal     B (No)     2: AD, OS
    MVTec-LOCO/breakfast_box/test/logical_anomalies/000.png (48x36) anomalous  A (Yes)    2: AD, DD; mask folder
    MVTec-LOCO/breakfast_box/test/good/000.png (48x36)              normal     B (No)     2: AD, OC
    MVTec-LOCO/breakfast_box/test/structural_anomalies/001.png      anomalous  A (Yes)    2: AD, DC; no mask_path

Masks (0/255 PNG; boxes are (x1, y1, x2, y2) with exclusive x2, y2 — anomaly_rl.data.boxes):
    bottle 000: rectangles x5-9 y4-7 -> (5,4,10,8); x12-13 y5-6 -> (12,5,14,7) (2-px gap to the
                first: merged by dilation 1 into (5,4,14,8)); x20-29 y15-24 -> (20,15,30,25);
                one pixel (35,2) -> (35,2,36,3), dropped by min_area 2.
    candle 000: x3-6 y10-12 -> (3,10,7,13).
    breakfast_box 000: folder with 000.png x0-3 y0-3 -> (0,0,4,4) and 001.png x40-47 y30-35 -> (40,30,48,36).

Templates: `<dataset>/<category>/train/good/00k.<ext>`, k = 0..3; similar = [000, 001], random = [002, 003].
The numbers above are facts the tests use, hand-written there; keep them in step with this file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

Rect = tuple[int, int, int, int]  # inclusive pixel corners x0, y0, x1, y1, as PIL's rectangle draws them

SIZES = {
    ("DS-MVTec", "bottle"): ((40, 30), ".png"),
    ("VisA", "candle"): ((32, 24), ".JPG"),
    ("MVTec-LOCO", "breakfast_box"): ((48, 36), ".png"),
}
BOTTLE_RECTS: list[Rect] = [(5, 4, 9, 7), (12, 5, 13, 6), (20, 15, 29, 24), (35, 2, 35, 2)]
CANDLE_RECTS: list[Rect] = [(3, 10, 6, 12)]
LOCO_RECTS: dict[str, list[Rect]] = {"000.png": [(0, 0, 3, 3)], "001.png": [(40, 30, 47, 35)]}

YES_NO = {"A": "Yes.", "B": "No."}


def _q(qtype: str, question: str, options: dict[str, str], answer: str) -> dict[str, Any]:
    return {"Question": question, "Options": options, "Answer": answer, "type": qtype}


def _ad(answer: str, options: dict[str, str] | None = None) -> dict[str, Any]:
    return _q("Anomaly Detection", "Is there any defect in the object?", options or YES_NO, answer)


def _templates(dataset: str, category: str) -> dict[str, list[str]]:
    ext = SIZES[(dataset, category)][1]
    paths = [f"{dataset}/{category}/train/good/{k:03d}{ext}" for k in range(4)]
    return {"similar_templates": paths[:2], "random_templates": paths[2:]}


def mmad_entries() -> dict[str, Any]:
    """The fixture's mmad.json content (a fresh copy: tests may mutate it and rewrite)."""
    defect_kinds = {"A": "Scratch", "B": "Broken part", "C": "Contamination", "D": "Crack"}
    places = {"A": "Top left", "B": "Center", "C": "Bottom right", "D": "No defect"}
    objects = {"A": "Bottle", "B": "Cable", "C": "Candle", "D": "Box"}
    entries = {
        "DS-MVTec/bottle/image/broken_large/000.png": {
            "mask_path": "../ground_truth/broken_large/000_mask.png",
            **_templates("DS-MVTec", "bottle"),
            "conversation": [
                _ad("A"),
                _q("Defect Classification", "What type of defect is present?", defect_kinds, "B"),
                _q("Defect Localization", "Where is the defect?", places, "A"),
                _q(
                    "Defect Description",
                    "How does the defect look?",
                    {
                        "A": "A thin line",
                        "B": "A dark spot",
                        "C": "A missing piece of the rim",
                        "D": "A stain",
                    },
                    "C",
                ),
                _q(
                    "Defect Analysis",
                    "What effect does the defect have?",
                    {"A": "None", "B": "Cosmetic only", "C": "Leaks slowly", "D": "It cannot hold liquid"},
                    "D",
                ),
                _q("Object Classification", "What is the object?", objects, "A"),
                _q("Object Structure", "What shape is the opening?", {"A": "Square", "B": "Round"}, "B"),
                _q(
                    "Object Details",
                    "What colour is the bottle?",
                    {"A": "Green", "B": "Clear", "C": "Brown"},
                    "C",
                ),
            ],
        },
        "DS-MVTec/bottle/image/good/000.png": {
            **_templates("DS-MVTec", "bottle"),
            "conversation": [
                _ad("B"),
                _q("Object Classification", "What is the object?", objects, "A"),
                _q("Object Details", "What colour is the bottle?", {"A": "Brown", "B": "Green"}, "A"),
            ],
        },
        "VisA/candle/test/bad/000.JPG": {
            "mask_path": "../ground_truth/bad/000.png",
            **_templates("VisA", "candle"),
            "conversation": [
                _ad("B", {"A": "No", "B": "Yes"}),  # reversed on purpose: the label comes from the text
                _q("Defect Localization", "Where is the defect?", places, "C"),
                _q("Object Structure", "How many candles are there?", {"A": "Four", "B": "One"}, "A"),
            ],
        },
        "VisA/candle/test/good/001.JPG": {
            **_templates("VisA", "candle"),
            "conversation": [
                _ad("B"),
                _q("Object Structure", "How many candles are there?", {"A": "One", "B": "Four"}, "B"),
            ],
        },
        "MVTec-LOCO/breakfast_box/test/logical_anomalies/000.png": {
            "mask_path": "../ground_truth/logical_anomalies/000",
            **_templates("MVTec-LOCO", "breakfast_box"),
            "conversation": [
                _ad("A"),
                _q(
                    "Defect Description",
                    "What is wrong?",
                    {"A": "Too many nuts", "B": "A torn lid"},
                    "A",
                ),
            ],
        },
        "MVTec-LOCO/breakfast_box/test/good/000.png": {
            "mask_path": "",  # MMAD writes empty strings too; means no mask
            **_templates("MVTec-LOCO", "breakfast_box"),
            "conversation": [_ad("B"), _q("Object Classification", "What is the object?", objects, "D")],
        },
        "MVTec-LOCO/breakfast_box/test/structural_anomalies/001.png": {
            **_templates("MVTec-LOCO", "breakfast_box"),
            "conversation": [
                _ad("A"),
                _q("Defect Classification", "What type of defect is present?", defect_kinds, "B"),
            ],
        },
    }
    return copy.deepcopy(entries)


def _image(path: Path, size: tuple[int, int], rects: Sequence[Rect] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (180, 180, 170))
    draw = ImageDraw.Draw(image)
    for rect in rects:
        draw.rectangle(rect, fill=(40, 30, 30))
    image.save(path)


def _mask(path: Path, size: tuple[int, int], rects: Sequence[Rect]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for rect in rects:
        draw.rectangle(rect, fill=255)
    mask.save(path)


@dataclass
class MmadFixture:
    root: Path
    json_path: Path

    def entries(self) -> dict[str, Any]:
        return json.loads(self.json_path.read_text(encoding="utf-8"))

    def write(self, entries: Any) -> None:
        """Replace mmad.json (for tests that break an entry on purpose)."""
        self.json_path.write_text(json.dumps(entries, indent=1), encoding="utf-8")


def build_mmad_fixture(base: Path) -> MmadFixture:
    """Draw the benchmark described in the module docstring under `base / "mmad"`."""
    root = Path(base) / "mmad"
    for (dataset, category), (size, ext) in SIZES.items():
        for k in range(4):
            _image(root / dataset / category / "train" / "good" / f"{k:03d}{ext}", size)
    bottle = SIZES[("DS-MVTec", "bottle")][0]
    candle = SIZES[("VisA", "candle")][0]
    loco = SIZES[("MVTec-LOCO", "breakfast_box")][0]
    _image(root / "DS-MVTec/bottle/image/broken_large/000.png", bottle, BOTTLE_RECTS)
    _mask(root / "DS-MVTec/bottle/ground_truth/broken_large/000_mask.png", bottle, BOTTLE_RECTS)
    _image(root / "DS-MVTec/bottle/image/good/000.png", bottle)
    _image(root / "VisA/candle/test/bad/000.JPG", candle, CANDLE_RECTS)
    _mask(root / "VisA/candle/ground_truth/bad/000.png", candle, CANDLE_RECTS)
    _image(root / "VisA/candle/test/good/001.JPG", candle)
    _image(root / "MVTec-LOCO/breakfast_box/test/logical_anomalies/000.png", loco, [(0, 0, 3, 3)])
    for name, rects in LOCO_RECTS.items():
        _mask(root / "MVTec-LOCO/breakfast_box/ground_truth/logical_anomalies/000" / name, loco, rects)
    _image(root / "MVTec-LOCO/breakfast_box/test/good/000.png", loco)
    _image(root / "MVTec-LOCO/breakfast_box/test/structural_anomalies/001.png", loco, [(10, 10, 12, 12)])
    fixture = MmadFixture(root=root, json_path=root / "mmad.json")
    fixture.write(mmad_entries())
    return fixture
