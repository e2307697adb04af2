"""Job claims: a job that a live process is running is not run a second time.

A claim is an exclusive ``flock`` on ``<root>/<study>/claims/<job_key>.lock``, held for
the whole job (compute, record, mirror). The kernel releases it when the process ends in
any way, ``kill -9`` included, so a claim never outlives its process and never blocks a
re-launch. The file holds ``<pid> <host>`` of its holder, which is what a second launch
reports (``[busy] ... is being run by pid N``).

The holder deletes the file while it still holds the lock, and a claimer checks after
locking that the file it locked is still the one at the path: otherwise two processes
could each lock a different inode of one path. A file left behind by a killed process is
unlocked, so the next claimer simply takes it over.

Example::

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> with claim_job(root, "demo", "ab12") as holder:
    ...     holder is None          # None: this process holds the claim
    True
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def claim_path(root: str | os.PathLike, study: str, key: str) -> Path:
    return Path(root) / study / "claims" / f"{key}.lock"


@contextmanager
def claim_job(root: str | os.PathLike, study: str, key: str) -> Iterator[str | None]:
    """Claim job ``key`` for the block: yields None when this process holds the claim, else
    a description of the live holder (``"pid 1234"``, or ``"pid 1234 on host"``) without
    waiting; then the caller must leave the job to that holder."""
    path = claim_path(root, study, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _holder(fd)
            os.close(fd)
            break
        if _is_linked(fd, path):
            holder = None
            break
        os.close(fd)   # its holder finished and deleted it meanwhile: claim the new file
    if holder is not None:
        yield holder
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield None
    finally:
        path.unlink(missing_ok=True)   # while still locked (see the module docstring)
        os.close(fd)


def _is_linked(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """Who holds the claim, from the file it wrote (it writes it right after locking)."""
    for _ in range(50):
        parts = os.pread(fd, 512, 0).decode(errors="replace").split()
        if len(parts) == 2 and parts[0].isdigit():
            pid, host = parts
            return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"
        time.sleep(0.01)
    return "another process"


def running_claims(root: str | os.PathLike, study: str) -> dict[str, str]:
    """``job_key -> holder`` of the jobs of ``study`` that a live process runs now.

    Takes no lock (a probe could make a launcher see the job as busy): a claim file
    left by a killed process is told apart by its pid no longer running. On another
    host that cannot be checked, so its claims count as running.
    """
    folder = Path(root) / study / "claims"
    if not folder.is_dir():
        return {}
    here = socket.gethostname()
    out = {}
    for path in folder.glob("*.lock"):
        try:
            parts = path.read_text().split()
        except OSError:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid, host = int(parts[0]), parts[1]
        if host != here:
            out[path.stem] = f"pid {pid} on {host}"
        elif _alive(pid):
            out[path.stem] = f"pid {pid}"
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by someone else
        return True
    return True
