"""Fixtures of the formats tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run each formats test single-threaded (restored afterwards).

    These tests use small tensors; on the shared 2-core machine OpenMP threads spin against
    other processes and make small ops ~100x slower than one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
