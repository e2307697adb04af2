"""Tokenized token streams, cached on disk by (tokenizer, corpus, protocol).

A stream is the corpus's documents joined by the corpus's rule (see ``corpora``) and tokenized
once, with the tokenizer's own special tokens (a Llama tokenizer puts one BOS in front), as
GPTQ's ``tokenizer("\\n\\n".join(test["text"]))`` does. Both perplexity presets read the same
stream; they differ only in how windows are cut from it (``ptqscale.metrics``), but the preset
is part of the cache key so that a later change of one preset's stream cannot reuse the other's.

Cache layout: ``<cache_dir>/streams/<corpus>-<split>-<key>.npy`` plus a ``.json`` with what the
key was made of. Writes are atomic (a temporary file of its own, then rename); a cached stream
that cannot be read is moved aside with one log line and tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from ptqscale.data.corpora import (
    CORPORA,
    DataConfig,
    DataError,
    canonical_split,
    join_documents,
    load_documents,
    validate_data_config,
)
from ptqscale.files import atomic_write, atomic_write_json, quarantine

STREAM_PROTOCOL_VERSION = 1  # bump when the text -> tokens rule changes
STREAM_PRESETS = ("gptq", "rolling")


def tokenize_corpus(cfg: DataConfig, tokenizer, cache_dir: str | None,
                    preset: str = "gptq") -> torch.Tensor:
    """The corpus as one 1-D LongTensor of token ids, read from the cache when present.

    Example::

        >>> cfg = DataConfig("wikitext2", "test", path="../shared/data/wikitext-2-raw")
        >>> ids = tokenize_corpus(cfg, tokenizer, cache_dir="/tmp/ptq-cache")  # doctest: +SKIP
        >>> ids.dtype, ids.ndim  # doctest: +SKIP
        (torch.int64, 1)
    """
    if preset not in STREAM_PRESETS:
        raise DataError(f"unknown preset {preset!r}; allowed: {list(STREAM_PRESETS)}")
    files = validate_data_config(cfg)
    meta = stream_key_material(cfg, tokenizer, preset, files)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = None
    if cache_dir:
        name = f"{cfg.name}-{canonical_split(cfg.split)}-{key}.npy"
        path = os.path.join(cache_dir, "streams", name)
        if os.path.exists(path):
            try:
                return torch.from_numpy(np.load(path).astype(np.int64))
            except (OSError, ValueError, EOFError) as e:   # truncated or not a .npy
                quarantine(path, f"{type(e).__name__}: {e}", "token stream cache file",
                           "it will be recomputed")
    ids = encode(tokenizer, join_documents(cfg, load_documents(cfg)))
    if ids.numel() == 0:
        raise DataError(f"corpus {cfg.name!r} tokenized to an empty stream")
    if path:
        _atomic_save(path, ids, dict(meta, key=key, tokens=int(ids.numel())))
    return ids


def encode(tokenizer, text: str) -> torch.Tensor:
    """Tokenize ``text`` once, with the tokenizer's default special tokens."""
    # verbose=False: silences "sequence longer than model max length" for whole-corpus strings.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides the token ids (the full backend serialization)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizers: vocabulary + class + special tokens
        blob = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                           tokenizer.all_special_tokens])
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None),
                        getattr(tokenizer, "add_eos_token", None)])
    return hashlib.sha256((blob + extra).encode()).hexdigest()


def stream_key_material(cfg: DataConfig, tokenizer, preset: str, files: list[str]) -> dict:
    """What the cache key hashes: corpus config, source files (size, mtime), tokenizer, rules."""
    sources = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    return {
        "protocol": STREAM_PROTOCOL_VERSION,
        "preset": preset,
        "corpus": cfg.name,
        "split": canonical_split(cfg.split),
        "path": cfg.path,
        "text_field": cfg.text_field,
        "max_documents": cfg.max_documents or CORPORA[cfg.name].default_max_documents,
        "join": CORPORA[cfg.name].join,
        "sources": sources,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def _atomic_save(path: str, ids: torch.Tensor, meta: dict) -> None:
    # int32 halves the file; every vocabulary we meet is far below 2**31.
    arr = ids.numpy().astype(np.int32 if ids.max() < 2**31 else np.int64)
    atomic_write(path, lambda fh: np.save(fh, arr), binary=True)
    atomic_write_json(path[:-4] + ".json", meta)
