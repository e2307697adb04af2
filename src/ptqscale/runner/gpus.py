"""One job per GPU on a multi-GPU host: each job holds an exclusive lock on one device.

Parallel local workers (``hydra/launcher=local_gpus``, a joblib pool with one worker per
visible GPU) each take the first free GPU, so two jobs never share a device whatever
order the pool starts them in. The worker then pins itself to that GPU through
``CUDA_VISIBLE_DEVICES`` (the job sees it as ``cuda:0``, and nothing the job or a
library does can touch another GPU). The pin holds for the worker's life, because CUDA
reads the variable once: the worker's later jobs run on the same GPU.

Locks are ``flock`` files named after the physical device (the entry of the parent's
``CUDA_VISIBLE_DEVICES``, e.g. the GPU SLURM gave a job): they vanish with the process,
so a killed job never leaves a GPU marked busy, and two SLURM jobs on one node that each
see their own GPU as device 0 do not wait on each other.

Example (on a 2-GPU host, in two fresh processes)::

    with claim_gpu() as index:      # first process: CUDA_VISIBLE_DEVICES=0, index 0
        ...                         # second process: CUDA_VISIBLE_DEVICES=1, index 0
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger("ptqscale")

# The physical device this process pinned itself to (an entry of CUDA_VISIBLE_DEVICES).
_pinned: str | None = None


def visible_devices() -> list[str]:
    """The physical ids of the visible CUDA devices ([] on a CPU machine).

    Counted through NVML (``torch.cuda.device_count``), which does not initialise CUDA,
    so that the process can still be pinned afterwards.
    """
    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env is not None else []
    return ids[:n] if env is not None else [str(i) for i in range(n)]


def gpu_count() -> int:
    """Visible CUDA devices (0 on a CPU machine); the default size of the local pool."""
    return len(visible_devices())


@contextmanager
def claim_gpu(lock_dir: str | None = None) -> Iterator[int | None]:
    """Hold one free GPU for the duration of a job; yields its torch index (None without CUDA).

    A fresh process is pinned to the GPU (``CUDA_VISIBLE_DEVICES``; index 0). Where CUDA
    was initialised before the claim, pinning has no effect: the job then uses
    ``torch.cuda.set_device`` on the claimed index instead.
    """
    devices = [_pinned] if _pinned is not None else visible_devices()
    if not devices:
        yield None
        return
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), "ptqscale-gpu-locks")
    os.makedirs(lock_dir, exist_ok=True)
    handles = [open(os.path.join(lock_dir, f"gpu-{_safe(d)}.lock"), "a") for d in devices]
    try:
        index = _first_free(handles)
        if index is None:  # every GPU busy: queue on the one the process id hashes to
            index = os.getpid() % len(devices)
            fcntl.flock(handles[index], fcntl.LOCK_EX)
        yield _use(devices[index], index)
    finally:
        for h in handles:
            h.close()   # closing releases the lock


def _use(device: str, index: int) -> int:
    """Make ``device`` the job's GPU; return its torch index."""
    global _pinned
    if _pinned is not None:
        return 0
    if not torch.cuda.is_initialized():
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        torch.cuda.init()
        # Something may have initialised the CUDA driver without torch (e.g. a call to
        # torch.cuda.is_available()); the runtime then still sees every device.
        if _runtime_device_count() == 1:
            _pinned = device
            return 0
        _restore_env(before)
        log.warning("CUDA was initialised before the GPU claim: using set_device(%d)", index)
    torch.cuda.set_device(index)
    return index


def _runtime_device_count() -> int:
    # What the CUDA runtime sees (torch.cuda.device_count may answer from NVML).
    count = getattr(torch._C, "_cuda_getDeviceCount", None)   # absent from CPU builds
    return count() if count is not None else 0


def _restore_env(value: str | None) -> None:
    if value is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = value


def _safe(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", device)


def _first_free(handles: list) -> int | None:
    for i, h in enumerate(handles):
        try:
            fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return i
        except BlockingIOError:
            continue
    return None
