"""Safe file primitives shared by the store and every on-disk cache (imports nothing of the
package, so that data/, methods/ and store/ may all use it).

- :func:`atomic_write`: a unique temporary file in the target's folder, fsync, rename,
  fsync of the folder. Writers never share a temporary file, so two processes writing one
  path at once each rename a whole file and the last rename wins; a reader sees the old
  file or a new one, never half of one.
- :func:`locked`: an exclusive ``flock`` on a lock file, for a read-modify-write that two
  processes must not interleave (consolidation, computing a shared cache entry). The
  kernel drops the lock when its process dies, even by ``kill -9``.
- :func:`quarantine`: a file that cannot be read (bad JSON, missing fields, truncated
  Parquet) is renamed to ``<name>.corrupt-<UTC time>`` with one log line that names it,
  so that it reads as absent (and is recomputed) but stays for inspection.

Example::

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> _ = atomic_write_json(p, {"a": 1})
    >>> read_json(p, required=("a",), what="demo file")
    {'a': 1}
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("ptqscale.store")


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False
                 ) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)   # the rename itself survives a power cut
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # some filesystems refuse fsync on a directory; the data is synced
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True,
                                                  default=_json_default))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text))


def _json_default(o: Any) -> Any:
    # numpy scalars and paths appear in metrics and configs; store them as plain JSON.
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield   # closing the file releases the lock


def quarantine(path: str | os.PathLike, reason: str, what: str, then: str) -> Path | None:
    """Move the unreadable file ``path`` aside and say so in one line; the new path or None.

    ``what`` names the kind of file ("record", "fp_eval cache entry"), ``then`` what
    happens next ("it will be recomputed").
    """
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:   # another process moved it aside first
        return None
    except OSError as e:        # a read-only store: still say which file, and go on
        log.warning("corrupt %s %s (%s); could not move it aside (%s); %s",
                    what, path, reason, e, then)
        return None
    log.warning("corrupt %s %s (%s): moved to %s; %s", what, path, reason, aside.name, then)
    return aside


def json_problem(text: bytes | str, required: tuple[str, ...]) -> tuple[Any, str | None]:
    """``(value, None)`` for a JSON object holding ``required``, else ``(None, reason)``."""
    try:
        value = json.loads(text)
    except ValueError as e:   # JSONDecodeError, or bytes that are not UTF-8
        return None, f"invalid JSON: {e}"
    if not isinstance(value, dict):
        return None, f"not a JSON object but {type(value).__name__}"
    missing = [k for k in required if k not in value]
    if missing:
        return None, f"missing required keys {missing}"
    return value, None


def read_json(path: str | os.PathLike, required: tuple[str, ...] = (), what: str = "file",
              then: str = "it will be recomputed") -> dict | None:
    """The JSON object at ``path``; None when absent, or when corrupt (then quarantined)."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    value, reason = json_problem(text, required)
    if reason is not None:
        quarantine(path, reason, what, then)
    return value
