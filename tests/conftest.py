"""Shared fixtures. Offline data lives in ../shared/data beside the checkout (see its README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: tiny test tensors run faster without thread hand-offs, and results
# do not depend on the machine's core count.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("PTQSCALE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $PTQSCALE_SHARED_DATA); tests that need it are skipped without it."""
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"offline data folder not found: {path}")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_collection_modifyitems(config, items):
    # gpu tests run only where CUDA is present
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
