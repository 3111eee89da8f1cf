"""Shared test fixtures: no network, offline W&B, and the location of ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
MVTEC_SAMPLE = SHARED / "datasets" / "mvtec_ad_sample"


@pytest.fixture
def mvtec_sample() -> Path:
    if not MVTEC_SAMPLE.is_dir():
        pytest.skip(f"shared MVTec AD sample not found at {MVTEC_SAMPLE}")
    return MVTEC_SAMPLE
