"""What a job prints while it works: one stage line per stage, bars on a terminal, no noise.

Every long loop (windows of perplexity, blocks of a method, noise levels, Hessian probes,
training steps) goes through :func:`progress`, and every stage starts with :func:`stage`,
so the output of all stages looks alike and one flag (the job's ``progress``) governs it:

- on a terminal (stderr is a TTY) with ``progress`` on: a tqdm bar per loop;
- otherwise (logs, SLURM, CI, ``progress=false``): no bar; the stage lines (``log``) say
  what runs and how long it took, which is what a log file needs.

:func:`quiet_third_party` silences the known third-party messages that fill every log and
carry nothing for a ptqscale user, by exact message, never by category.
Imports nothing of the package (tqdm; transformers lazily, for its bars).

Example::

    >>> with stage("demo"):                                   # doctest: +SKIP
    ...     total = sum(progress(range(3), "items", enabled=True))
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

log = logging.getLogger("ptqscale")
T = TypeVar("T")

# Exact texts of third-party messages that are silenced (see quiet_third_party).
QUIET_WARNINGS = (
    # transformers on torch >= 2.2 (transformers/utils/generic.py), once per import
    r"torch\.utils\._pytree\._register_pytree_node is deprecated",
)
QUIET_LOGS = {
    # torchao built for another torch: its C++ kernels are skipped; ptqscale uses none
    "torchao": "Skipping import of cpp extensions",
    # GGUF files store "no token" as uint32 -1 (stories260K); models/loading.py clears it
    "transformers.configuration_utils": "must be `None` or an integer within the vocabulary",
}


def say(*args, **kwargs) -> None:
    """``print`` that flushes: a CLI's lines reach a log file (not a TTY) as they happen."""
    print(*args, **kwargs, flush=True)


def bars_wanted(enabled: bool) -> bool:
    """Whether a bar is drawn: asked for, and stderr is an interactive terminal."""
    return bool(enabled) and sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, enabled: bool, total: int | None = None,
             unit: str = "it") -> Iterable[T]:
    """``items`` with a tqdm bar on stderr when :func:`bars_wanted`, else ``items`` itself.

    Never touches what it iterates (no extra RNG draws, no device syncs): results are the
    same with and without bars.
    """
    if not bars_wanted(enabled):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def bar(total: int, desc: str, enabled: bool, unit: str = "it") -> Iterator[Any]:
    """A bar advanced by hand (``.update()``), for loops that :func:`progress` cannot wrap
    without changing what stays alive; a no-op object when :func:`bars_wanted` is false."""
    if not bars_wanted(enabled):
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
              file=sys.stderr) as b:
        yield b


@contextmanager
def stage(name: str, timings: dict[str, float] | None = None, key: str | None = None
          ) -> Iterator[None]:
    """Log ``stage <name>`` at the start and ``stage <name>: <s> s`` at the end; with
    ``timings``, also store the seconds there under ``key`` (default: ``name``)."""
    log.info("stage %s", name)
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    if timings is not None:
        timings[key or name] = seconds
    log.info("stage %s: %.1f s", name, seconds)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def library_bars(enabled: bool) -> None:
    """Let transformers draw its own bars (weight loading) only where ours are drawn."""
    from transformers.utils import logging as hf_logging

    if bars_wanted(enabled):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def quiet_third_party() -> None:
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_LOGS` (idempotent); nothing else."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, text in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
