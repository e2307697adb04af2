"""One job per GPU on a multi-GPU host: each job holds an exclusive lock on one device.

Parallel local workers (``hydra/launcher=local_gpus``, a joblib pool with one worker per
visible GPU) each take the first free GPU slot, so two jobs never share a device whatever
order the pool starts them in. Locks are ``flock`` files: they vanish with the process,
so a killed job never leaves a GPU marked busy.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def gpu_count() -> int:
    """Visible CUDA devices (0 on a CPU machine); the default size of the local pool."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextmanager
def claim_gpu(lock_dir: str | None = None) -> Iterator[int | None]:
    """Hold one free GPU for the duration of a job; yields its index (None without CUDA)."""
    n = gpu_count()
    if n == 0:
        yield None
        return
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), "ptqscale-gpu-locks")
    os.makedirs(lock_dir, exist_ok=True)
    handles = [open(os.path.join(lock_dir, f"gpu{i}.lock"), "a") for i in range(n)]
    try:
        index = _first_free(handles)
        if index is None:  # every GPU busy: queue on the one the job id hashes to
            index = os.getpid() % n
            fcntl.flock(handles[index], fcntl.LOCK_EX)
        torch.cuda.set_device(index)
        yield index
    finally:
        for h in handles:
            h.close()   # closing releases the lock


def _first_free(handles: list) -> int | None:
    for i, h in enumerate(handles):
        try:
            fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return i
        except BlockingIOError:
            continue
    return None
