"""Shared test fixtures: no network, offline W&B, and the location of ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads that spin while another process holds a core make each small op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
