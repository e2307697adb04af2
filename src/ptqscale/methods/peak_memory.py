"""Wall time and peak memory of one quantization, for the record (``QuantReport.extra``).

On CUDA the peak is ``torch.cuda.max_memory_allocated`` of the device, reset when the
measurement starts (tensors allocated through PyTorch's caching allocator; the cache itself
and other processes are not counted). Elsewhere it is the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``): a high-water mark over the whole process
life, so it also counts the model load and anything done earlier in the same process.

Example:
    >>> with CostMeter(torch.device("cpu")) as cost:
    ...     _ = torch.ones(1000)
    >>> sorted(cost.as_dict())
    ['peak_memory_bytes', 'peak_memory_kind', 'seconds']
"""

from __future__ import annotations

import resource
import sys
import time

import torch


class CostMeter:
    """Context manager measuring seconds and peak memory on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.peak_bytes: int | None = None
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "process_max_rss"

    def __enter__(self) -> CostMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # Linux reports kilobytes, macOS bytes
            self.peak_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
        self.seconds = time.perf_counter() - self._t0

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "peak_memory_bytes": self.peak_bytes,
                "peak_memory_kind": self.kind}
