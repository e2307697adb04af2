"""measure_cost: a method's peak memory is its own, whatever the process did before."""

from __future__ import annotations

import sys

import pytest
import torch

from ptqscale.methods.cost import measure_cost

MB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.cuda.is_available(),
                    reason="the RSS peak reset is Linux's; CUDA measures allocations")
def test_cpu_peak_is_reset_at_the_start():
    big = torch.ones(300 * MB // 4)          # an earlier, higher peak of the process
    del big
    with measure_cost() as small:
        t = torch.ones(64 * MB // 4)
        t.add_(1)
        del t
    with measure_cost() as idle:
        pass
    assert small["kind"] == idle["kind"] == "rss_peak"
    added = small["peak_memory_bytes"] - small["rss_start_bytes"]
    assert 60 * MB <= added < 200 * MB, added
    assert idle["peak_memory_bytes"] - idle["rss_start_bytes"] < 16 * MB
    assert small["seconds"] >= 0
