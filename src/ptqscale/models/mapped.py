"""Weights memory-mapped from a checkpoint's safetensors: which tensors are, and undoing writes.

transformers (5.x) reads safetensors through safetensors' mmap backend: when the requested dtype
is the stored one, every parameter stays a view into a private (copy-on-write) mapping of the
file, and no weight is copied into process memory (measured: a 640 MiB float32 llama loads with
RssAnon +2 MiB; in bfloat16 it is converted, +320 MiB). A page of such a mapping is read from
the page cache on first use (reclaimable memory, not the process's own); a write to it turns that
page, and only it, into private memory holding the change. So a model larger than host memory
can wait there, and only what a job changes costs host memory; ``set_spill`` sends even that
to disk (paths.spill).

This module tells which tensors are views of such a mapping (``/proc/self/maps``), which of their
pages a job wrote (``/proc/self/pagemap``: a written page of a private file mapping is anonymous)
and undoes those writes without reading anything: ``madvise(MADV_DONTNEED)`` drops the written
pages, and the next access maps the file's page again. On a system without these files
(not Linux) no tensor counts as mapped and callers fall back to copies.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

WEIGHTS_ATTR = "ptqscale_weights"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
_CHUNK = 1 << 20   # pagemap entries read at once (8 MiB)


@dataclass(frozen=True)
class FileMapping:
    """One private mapping of a file in this process (a line of ``/proc/self/maps``)."""

    start: int
    end: int
    path: str


def file_mappings() -> list[FileMapping]:
    """This process's private (copy-on-write) mappings of files, by start address.

    Shared mappings are left out: a write to one goes to the file, so it cannot be undone here.
    """
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[1][3] != "p" or not fields[5].startswith("/"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append(FileMapping(start, end, fields[5].rstrip("\n")))
    except OSError:
        return []
    return sorted(found, key=lambda m: m.start)


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` addresses of a contiguous tensor's bytes."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def mapping_of(t: torch.Tensor, mappings: list[FileMapping]) -> FileMapping | None:
    """The file mapping that holds all of ``t``'s bytes, or None (process memory, a device,
    an empty or non-contiguous tensor)."""
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return None
    start, end = byte_range(t)
    i = bisect.bisect_right(mappings, start, key=lambda m: m.start) - 1
    if i >= 0 and mappings[i].start <= start and end <= mappings[i].end:
        return mappings[i]
    return None


def describe_weights(model: nn.Module) -> str:
    """``mapped`` (every parameter's bytes are a view of a checkpoint file), ``copied`` (none
    are: converted dtype, GGUF, on a GPU) or ``partly mapped (NN% of bytes)``."""
    mappings = file_mappings()
    total = mapped = 0
    for p in {id(p): p for p in model.parameters()}.values():
        size = p.numel() * p.element_size()
        total += size
        mapped += size if mapping_of(p.data, mappings) is not None else 0
    if total and mapped == total:
        return "mapped"
    return "copied" if mapped == 0 else f"partly mapped ({100 * mapped / total:.0f}% of bytes)"


def weights_of(model: nn.Module) -> str | None:
    """What :func:`describe_weights` said when ``load_model`` loaded ``model`` (None: not loaded
    by it)."""
    return getattr(model, WEIGHTS_ATTR, None)


def record_weights(model: nn.Module) -> str:
    """Describe the model's weights as loaded and keep that on it (for the job's ``env``)."""
    text = describe_weights(model)
    object.__setattr__(model, WEIGHTS_ATTR, text)
    return text


# ------------------------------------------------------------------ written pages


def page_runs(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pages ``[first, last + 1)`` that byte ranges touch, merged into sorted runs."""
    runs: list[tuple[int, int]] = []
    for start, end in sorted(pages_of(r) for r in ranges if r[1] > r[0]):
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def written_pages(runs: list[tuple[int, int]]) -> np.ndarray:
    """Page numbers within ``runs`` that hold private memory: in a private file mapping, those
    this process wrote to (present and not a file page, or swapped out). Reads 8 bytes of
    ``/proc/self/pagemap`` per page, never the pages themselves."""
    found = []
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        for first, stop in runs:
            for lo in range(first, stop, _CHUNK):
                n = min(_CHUNK, stop - lo)
                f.seek(lo * 8)
                raw = b""
                while len(raw) < n * 8:   # /proc may answer a long read in parts
                    part = f.read(n * 8 - len(raw))
                    if not part:
                        raise OSError(f"short read of /proc/self/pagemap at page {lo}")
                    raw += part
                entry = np.frombuffer(raw, dtype=np.uint64)
                present, swapped = (entry >> 63) & 1, (entry >> 62) & 1
                file_page = (entry >> 61) & 1
                private = ((present == 1) & (file_page == 0)) | (swapped == 1)
                found.append(lo + np.flatnonzero(private))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _runs_of(pages: np.ndarray) -> Iterator[tuple[int, int]]:
    if pages.size == 0:
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    for chunk in np.split(pages, breaks):
        yield int(chunk[0]), int(chunk[-1]) + 1


def discard_writes(pages: np.ndarray) -> None:
    """Drop this process's private copies of ``pages`` of a private file mapping: the next
    access maps the file's page again (``madvise(MADV_DONTNEED)``), so the bytes are the
    file's. Nothing is read or copied."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for first, stop in _runs_of(np.sort(pages)):
        if libc.madvise(first * PAGE, (stop - first) * PAGE, _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on mapped weights")


def pages_of(t_range: tuple[int, int]) -> tuple[int, int]:
    """The pages ``[first, stop)`` a byte range touches."""
    start, end = t_range
    return start // PAGE, (end - 1) // PAGE + 1


def can_track_writes() -> bool:
    """Whether this system shows written pages (Linux ``/proc/self/pagemap``)."""
    return os.path.exists("/proc/self/pagemap") and os.access("/proc/self/pagemap", os.R_OK)


# ------------------------------------------------------------------ before loading

_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                       "F8_E4M3": "float8", "F8_E5M2": "float8"}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def copied_bytes(files: Iterable[str], dtype: str) -> tuple[int, int]:
    """``(bytes copied into process memory, weight bytes)`` when safetensors ``files`` are
    loaded in ``dtype``: floating tensors stored in another dtype are converted (copies);
    the others stay mapped. Reads only the files' headers."""
    import json
    import math
    import struct

    copied = total = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            total += end - start
            stored = _SAFETENSORS_FLOATS.get(entry["dtype"])
            if stored is not None and stored != dtype:
                copied += math.prod(entry["shape"]) * _BYTES[dtype]
    return copied, total


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ spilling changed weights

SPILL_ATTR = "ptqscale_spill"


def set_spill(model: nn.Module, folder: str | None) -> None:
    """Where :func:`spill_changed` moves the changed weights of a streamed ``model``'s decoder
    blocks (``paths.spill``); None keeps them in host memory. Models not streamed: ignored."""
    from ptqscale.models.anatomy import decoder_blocks
    from ptqscale.models.streaming import placement_of

    if not placement_of(model).streamed:
        return
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    for m in model.get_submodule(decoder_blocks(model)[0]).modules():
        if folder is None:
            vars(m).pop(SPILL_ATTR, None)
        else:
            object.__setattr__(m, SPILL_ATTR, folder)


@torch.no_grad()
def spill_changed(module: nn.Module) -> int:
    """Move ``module``'s CPU parameters that hold this process's own memory (a method changed
    them: pages written in place, or a new copy) to a safetensors file in its spill folder,
    memory-mapped back; returns the bytes moved. Host memory then holds none of them: the file
    is unlinked at once (the mapping keeps it until the weight is dropped), and the pages that
    only the weight lay on are given back. Without a folder (:func:`set_spill`): nothing."""
    folder = getattr(module, SPILL_ATTR, None)
    if folder is None:
        return 0
    mappings, moved = file_mappings(), 0
    for p in {id(p): p for p in module.parameters()}.values():
        data = p.data
        if data.device.type != "cpu" or data.numel() == 0:
            continue
        start, end = byte_range(data)
        mapped = mapping_of(data, mappings) is not None
        written = written_pages([pages_of((start, end))]) if mapped else None
        if mapped and written.size == 0:
            continue   # unchanged, or spilled already
        p.data = _to_file(data, folder)
        if mapped:   # the private copies of pages no other tensor lies on are garbage now
            discard_writes(written[(written * PAGE >= start) & ((written + 1) * PAGE <= end)])
        moved += end - start
    return moved


def _to_file(t: torch.Tensor, folder: str) -> torch.Tensor:
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    fd, path = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({"w": t.contiguous()}, path)
        with safe_open(path, framework="pt") as f:   # mmap: a private mapping of the file
            return f.get_tensor("w")
    finally:
        os.unlink(path)
