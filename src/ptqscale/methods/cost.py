"""The cost of a method: wall-clock seconds and peak memory, for every record.

Peak memory is the high-water mark of the method's run, the model included, with the
counter reset at the start:

- CUDA (``kind: cuda_max_allocated``): ``torch.cuda.max_memory_allocated``.
- Linux CPU (``kind: rss_peak``): the process's peak resident set size (``VmHWM``), reset to
  the current RSS through ``/proc/self/clear_refs`` (Linux >= 4.0); ``rss_start_bytes`` is
  the RSS at the start, so ``peak_memory_bytes - rss_start_bytes`` is what the method added.
  Without the reset, the lifetime peak of a process that ran several jobs says nothing of
  the later ones.
- Elsewhere (``kind: rss_peak_delta``): the growth of the lifetime peak
  (``resource.getrusage``), 0 when the method stayed below an earlier peak: a lower bound.

Example::

    >>> with measure_cost() as cost:
    ...     _ = torch.ones(1000)
    >>> sorted(cost)[:3]
    ['kind', 'peak_memory_bytes', 'rss_start_bytes']
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1)) * 1024


def reset_peak_rss() -> bool:
    """Set this process's peak RSS to its current RSS; False where the kernel cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@contextmanager
def measure_cost() -> Iterator[dict]:
    """Yield a dict that holds ``seconds``, ``peak_memory_bytes`` and ``kind`` on exit."""
    cost: dict = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        kind = "cuda_max_allocated"
    elif reset_peak_rss():
        kind = "rss_peak"
        cost["rss_start_bytes"] = _status_bytes("VmRSS")
    else:
        kind = "rss_peak_delta"
        before = _lifetime_peak_rss_bytes()
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost["seconds"] = time.perf_counter() - start
        cost["kind"] = kind
        if kind == "cuda_max_allocated":
            cost["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        elif kind == "rss_peak":
            cost["peak_memory_bytes"] = _status_bytes("VmHWM")
        else:
            peak = _lifetime_peak_rss_bytes()
            cost.update(peak_memory_bytes=peak - before, process_peak_rss_bytes=peak)
