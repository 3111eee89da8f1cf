"""COCO detection JSON from samples: for pycocotools AP and for outside tools.

    python -m anomaly_rl.data.export data=<reader> data.root=DIR out=FILE.json [split=all|train|val|test]

One COCO category, "defect" (id 1): the model's boxes carry no class, so AP is class-agnostic.
Image ids are 1 + the sample's position in the list given, which is how the evaluation floor
matches its predictions to these images. The dataset category, label, defect type and split
ride along as extra image fields (pycocotools ignores them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomaly_rl.data.records import Sample

DEFECT_CATEGORY_ID = 1
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SPLIT_CHOICES = ("all", "train", "val", "test")


def samples_to_coco(samples: Sequence[Sample]) -> dict[str, Any]:
    """The COCO dict for these samples; bbox = [x1, y1, x2 - x1, y2 - y1] (x2, y2 exclusive)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, sample in enumerate(samples, start=1):
        width, height = sample.image_size
        images.append({"id": image_id, "file_name": sample.image_path, "width": width, "height": height,
                       "label": sample.label, "category": sample.category, "defect": sample.defect_type,
                       "split": sample.split})
        for x1, y1, x2, y2 in sample.boxes:
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "bbox": [float(x1), float(y1), w, h], "area": w * h,
                                "category_id": DEFECT_CATEGORY_ID, "iscrowd": 0})
    return {"info": {"description": "anomaly_rl ground truth (boxes from masks)"}, "images": images,
            "annotations": annotations, "categories": [{"id": DEFECT_CATEGORY_ID, "name": "defect",
                                                        "supercategory": "anomaly"}]}


def compose_data_config(reader: str, overrides: Sequence[str]) -> Any:
    """The `data` node as training sees it: conf/data/<reader>.yaml plus the project's `paths`.

    Only the data and paths groups are composed (not the whole train config), so exporting does
    not depend on the model or reward configs. Without conf/paths/default.yaml, `paths.data_dir`
    (used by the synthetic root) defaults to "data".
    """
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    if (CONF_DIR / "paths" / "default.yaml").is_file():
        groups = [f"+data={reader}", "+paths=default"]
    else:
        groups = [f"+data={reader}"]
        if not any(o.lstrip("+").startswith("paths.data_dir=") for o in overrides):
            overrides.append("paths.data_dir=data")
        overrides = [("+" + o) if o.startswith("paths.") else o for o in overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(overrides=[*groups, *overrides])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    named = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    reader, out, split = named.get("data"), named.get("out"), named.get("split", "all")
    if not reader or not out or split not in SPLIT_CHOICES:
        print("usage: python -m anomaly_rl.data.export data=<reader> data.root=DIR out=FILE.json "
              f"[split={'|'.join(SPLIT_CHOICES)}] [data.<key>=<value> ...]", file=sys.stderr)
        return 2
    overrides = [a for a in args if a.split("=", 1)[0] not in ("data", "out", "split")]
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from anomaly_rl.data.errors import DataError

    try:
        cfg = compose_data_config(reader, overrides)
        if OmegaConf.is_missing(cfg.data, "root"):
            raise DataError(f"data.root is required for data={reader} (add data.root=DIR)")
        module = instantiate(cfg.data)
        module.prepare_data()
        module.setup("fit")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parts = {"train": module.train_samples, "val": module.val_samples, "test": module.test_samples}
    samples = [s for name in ("train", "val", "test") if split in ("all", name) for s in parts[name]]
    coco = samples_to_coco(samples)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(coco))
    print(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes ({split})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
