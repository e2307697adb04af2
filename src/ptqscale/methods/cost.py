"""The cost of a method: wall-clock seconds and peak memory, for every record.

Peak memory is ``torch.cuda.max_memory_allocated`` over the method's run when CUDA is
available (``kind: cuda_max_allocated``, counters reset at the start); otherwise the growth of
the process's peak resident set size (``kind: rss_peak_delta``, ``resource.getrusage``): the
lifetime peak after the method minus the one before it, so it is 0 when the method stayed below
an earlier peak of the process (a lower bound of what the method needed on top of the model);
``process_peak_rss_bytes`` is that lifetime peak itself.

Example::

    >>> with measure_cost() as cost:
    ...     _ = torch.ones(1000)
    >>> sorted(cost)
    ['kind', 'peak_memory_bytes', 'seconds']
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@contextmanager
def measure_cost() -> Iterator[dict]:
    """Yield a dict that holds ``seconds``, ``peak_memory_bytes`` and ``kind`` on exit."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = 0 if cuda else _peak_rss_bytes()
    cost: dict = {}
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost["seconds"] = time.perf_counter() - start
        if cuda:
            cost.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
                        kind="cuda_max_allocated")
        else:
            peak = _peak_rss_bytes()
            cost.update(peak_memory_bytes=peak - before, kind="rss_peak_delta",
                        process_peak_rss_bytes=peak)
