"""Building the default schemas from `conf/schema/*.yaml` outside a Hydra run (tests, corpus).

The yaml files are the one source of the prompt and target wording; this module only locates and
instantiates them, so Python never holds a second copy of the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import OmegaConf

from anomaly_rl.schemas.base import Schema

SCHEMA_NAMES: tuple[str, ...] = ("adfm", "r1", "direct")
SCHEMA_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "schema"


def load_schema(name: str, conf_dir: Path | None = None, **overrides: Any) -> Schema:
    """Instantiate `conf/schema/<name>.yaml`, with top-level keys replaced by `overrides`."""
    path = (conf_dir or SCHEMA_CONF_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"schema config {path} not found: `conf/schema` must sit beside the anomaly_rl package "
            f"(a source checkout), or pass conf_dir"
        )
    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        cfg[key] = value
    schema = hydra.utils.instantiate(cfg)
    if not isinstance(schema, Schema):
        raise TypeError(f"{path}: _target_ built a {type(schema).__name__}, not a Schema")
    return schema
