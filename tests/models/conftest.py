"""Fixtures of the models tests: one thread, and tiny checkpoints on disk."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: OpenMP workers spinning against other processes make tiny matmuls
    # 40x slower; one thread is the fast setting for these tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """``tiny_checkpoint(family) -> (folder, in-memory model)``."""

    def make(family: str, seed: int = 0):
        folder = tmp_path / family
        return str(folder), save_tiny(family, folder, seed)

    return make
