"""What a model or corpus name stands for: fingerprints of the files, bound to names per store.

A job key names a model by ``model.name`` and a corpus by ``data.name`` (+ split), so the same
study finds its finished jobs from any folder or machine. What was actually loaded must still
decide the key, or other weights under the same name would be answered "already complete"
or measured against the first weights' cached full-precision NLL. So:

- **Fingerprint** (cheap, deterministic across machines): SHA-256 over each file that is read
  (config, tokenizer and weight files of a model folder, a GGUF file, a corpus's files): its
  size and whole content up to 256 MiB, beyond that its size, first 1 MiB (a safetensors
  header) and 256 chunks of 64 KiB spread evenly over the file. A hub model is its resolved
  commit (from the local hub cache, else the hub); a hub corpus is its id and revision.
- **Binding**: the first job of a results root that uses a name records the fingerprint in
  ``<results>/_identity/<kind>-<name>.json`` (created atomically; concurrent first users agree
  on one). While the files match the binding, keys are exactly the name's keys (committed
  stores keep theirs); files that differ put their fingerprint into the job key and the
  model-level cache keys, with one warning line. The planner reads bindings, never writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("ptqscale")

FULL_HASH_MAX = 256 << 20
SAMPLES, CHUNK, HEAD = 256, 64 << 10, 1 << 20
_SHA = re.compile(r"[0-9a-f]{40}")
_SKIP = re.compile(r"^(\..*|README.*|.*\.md|zoo\.json|SOURCE.*)$")  # files that are not read


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(HEAD))
            for i in range(SAMPLES):
                f.seek((size - CHUNK) * i // (SAMPLES - 1))
                h.update(f.read(CHUNK))
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Fingerprint of one file (memoised on path, size and modification time)."""
    st = os.stat(path)
    return _file_digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def files_fingerprint(paths: list[str]) -> str:
    """Fingerprint of a set of files: their names (not folders) and contents, order-free."""
    items = sorted((os.path.basename(p), file_digest(p)) for p in paths)
    return "sha256:" + hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


def model_fingerprint(cfg: Any, resolve_hub: bool = True) -> str | None:
    """What ``cfg`` loads: local files' fingerprint or the hub commit (None: not resolvable
    without the network and ``resolve_hub`` is False, as when planning offline)."""
    from ptqscale.models import validate_model_config

    if getattr(cfg, "stand_in", False):
        from ptqscale.models.standins import fingerprint

        return fingerprint(cfg)
    source = validate_model_config(cfg)
    if source.kind == "hub":
        return hub_commit(source.path, cfg.revision, resolve_hub)
    if source.kind == "gguf":
        files = [source.path]
    else:
        files = [str(p) for p in Path(source.path).iterdir()
                 if p.is_file() and not _SKIP.match(p.name)]
    if cfg.tokenizer and os.path.exists(os.path.expanduser(cfg.tokenizer)):
        tok = os.path.expanduser(cfg.tokenizer)
        files += [tok] if os.path.isfile(tok) else [str(p) for p in Path(tok).iterdir()
                                                     if p.is_file() and not _SKIP.match(p.name)]
    return files_fingerprint(files)


def hub_commit(repo: str, revision: str | None, resolve: bool = True) -> str | None:
    """The commit ``revision`` of hub model ``repo`` resolves to: a pinned sha as it is, else
    the local hub cache's ref, else (``resolve``) the hub's answer."""
    if revision and _SHA.fullmatch(revision):
        return f"hub:{repo}@{revision}"
    ref = revision or "main"
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        cached = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / ref
        if cached.is_file():
            return f"hub:{repo}@{cached.read_text().strip()}"
        if not resolve:
            return None
        from huggingface_hub import HfApi

        return f"hub:{repo}@{HfApi().model_info(repo, revision=ref).sha}"
    except Exception as e:  # noqa: BLE001 - no network, no such repo: say what to do
        from ptqscale.errors import ConfigError

        raise ConfigError(f"model.path={repo!r}: cannot resolve revision {ref!r} to a hub "
                          f"commit ({type(e).__name__}); run where the hub is reachable or "
                          "pin model.revision to a 40-character commit sha") from None


def data_fingerprint(cfg: Any) -> str:
    """What ``cfg`` reads: the fingerprint of its local files, or its hub id and revision."""
    from ptqscale.data import validate_data_config
    from ptqscale.data.corpora import CORPORA

    files = validate_data_config(cfg)
    if files:
        return files_fingerprint(files)
    hub = CORPORA[cfg.name].hub
    return f"hub:{hub[0]}/{hub[1]}@{hub[3] or 'main'}"


# ---------------------------------------------------------------- bindings in the store


def _binding_path(results: str, kind: str, label: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.@=-]", "_", label)
    return Path(results) / "_identity" / f"{kind}-{safe}.json"


def bound(results: str, kind: str, label: str) -> str | None:
    """The fingerprint the store bound ``label`` to, or None (not bound yet, or unreadable)."""
    try:
        return json.loads(_binding_path(results, kind, label).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bind(results: str, kind: str, label: str, fingerprint: str, where: str) -> str:
    """Bind ``label`` to ``fingerprint`` unless it is bound already; returns the binding.

    Created with a hard link of a finished temporary file: the binding appears whole or not
    at all, and of two concurrent first users exactly one wins.
    """
    path = _binding_path(results, kind, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "first_path": where}) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bound(results, kind, label) or fingerprint


def labels(spec_model: Any, data: Any, calib: Any | None) -> dict[str, tuple[str, str, Any]]:
    """``role -> (kind, label, config)`` of what a job loads: the label is what the key names."""
    model = f"{spec_model.name}@{spec_model.revision or 'default'}"
    if getattr(spec_model, "stand_in", False):
        model += "~stand-in"   # a stand-in never binds (or is checked against) the real name
    out = {"model": ("model", model, spec_model),
           "data": ("data", f"{data.name}-{data.split}", data)}
    if calib is not None:
        out["calib"] = ("data", f"{calib.data.name}-{calib.data.split}", calib.data)
    return out


def resolve(results: str, roles: dict[str, tuple[str, str, Any]], fingerprints: dict[str, str],
            write: bool) -> dict[str, str]:
    """The roles whose files differ from the store's binding (``role -> fingerprint``); with
    ``write``, bind the labels seen for the first time. An unbound label counts as matching."""
    differing = {}
    for role, (kind, label, _) in roles.items():
        fp = fingerprints.get(role)
        if fp is None:
            continue
        have = bound(results, kind, label)
        if have is None and write:
            where = getattr(roles[role][2], "path", None) or ""
            have = bind(results, kind, label, fp, str(where))
        if have is not None and have != fp:
            differing[role] = fp
            _warn_once(kind, label, str(getattr(roles[role][2], "path", "")), fp, have)
    return differing


@functools.cache
def _warn_once(kind: str, label: str, where: str, fp: str, have: str) -> None:
    log.warning("%s %r: files at %s differ from those this store first saw under the name "
                "(fingerprint %s, bound %s); jobs are keyed by their files", kind, label, where,
                fp[:19], have[:19])
