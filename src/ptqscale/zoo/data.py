"""Gutenberg and WikiText readers, cached token streams and the fixed training order.

Read with lzma + json alone (no ``datasets``) so the zoo trains on a bare GPU machine.

Stream format (training and checkpoint selection): each book's tokens followed by one
``<|endoftext|>``, books in file order, no BOS. Windows of ``seqlen`` inputs start anywhere
in the stream, so every window starts mid-text, as the windows of the GPTQ evaluation
protocol do (documents joined with "\\n\\n", tokenized once, cut into windows).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ptqscale.errors import ConfigError

EOS = "<|endoftext|>"  # the one special token: end of a book (also used as BOS/pad)
SPLITS = {"train": "train-*.jsonl.xz", "valid": "valid.jsonl.xz", "test": "test.jsonl.xz"}
STREAM_FORMAT = 1  # bump when the stream layout changes: it is part of the cache key
BOOKS_PER_BATCH = 16  # books tokenized at once: enough for the Rust thread pool, bounded memory


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The jsonl.xz shards of one Gutenberg split, sorted (the order books are read in)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {sorted(SPLITS)}")
    files = sorted(Path(data_dir).glob(SPLITS[split]))
    if not files:
        raise FileNotFoundError(f"no {SPLITS[split]} in {data_dir} (the gutenberg-en folder, "
                                "e.g. ../shared/data/gutenberg-en)")
    return files


def read_books(data_dir: str | Path, split: str, shards: int | None = None) -> Iterator[str]:
    """Texts of the books of ``split`` (its first ``shards`` files if given), in shard order
    then line order.

    Example::

        >>> first = next(read_books("../shared/data/gutenberg-en", "test"))  # doctest: +SKIP
    """
    files = split_files(data_dir, split)
    if shards is not None and not 0 < shards <= len(files):
        raise ConfigError(f"train_shards={shards}: {data_dir} holds {len(files)} {split} shards")
    for path in files[:shards]:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_corpus(data_dir: str | Path, chars: int, shards: int | None = None) -> list[str]:
    """A deterministic ``chars``-character subset of the train split to fit the BPE on.

    Every book gives the same leading fraction of itself, cut at a line end, so all authors
    are represented and the subset depends only on the data and ``chars``.
    """
    books = list(read_books(data_dir, "train", shards))
    frac = min(1.0, chars / sum(len(b) for b in books))
    out = []
    for book in books:
        cut = book.rfind("\n", 0, int(len(book) * frac))  # keep whole lines, "\n" included
        out.append(book if frac == 1.0 else book[: cut + 1])
    return out


def _encode_books(tokenizer, books: Iterator[str], eos_id: int) -> np.ndarray:
    parts, batch = [], []

    def flush():
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos_id], dtype=np.uint16))
        batch.clear()

    for book in books:
        batch.append(book)
        if len(batch) == BOOKS_PER_BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def token_stream(tokenizer, data_dir: str | Path, split: str,
                 cache_dir: str | Path) -> tuple[np.ndarray, dict]:
    """Token ids (uint16, read-only memmap) of ``split`` in the stream format, and its record.

    Cached under ``cache_dir/<key>/`` where the key hashes the tokenizer, the shard files and
    the stream format, so a changed tokenizer or data can never be served a stale file.
    ``tokenizer`` is a ``tokenizers.Tokenizer``.
    """
    files = split_files(data_dir, split)
    tok_sha = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    sources = {p.name: sha256_file(p) for p in files}
    key = hashlib.sha256(json.dumps([STREAM_FORMAT, tok_sha, sources]).encode()).hexdigest()
    folder = Path(cache_dir) / key[:16]
    npy, meta = folder / f"{split}.npy", folder / f"{split}.json"
    if not (npy.exists() and meta.exists()):
        eos_id = tokenizer.token_to_id(EOS)
        ids = _encode_books(tokenizer, read_books(data_dir, split), eos_id)
        info = {"split": split, "tokens": int(ids.size), "books": int((ids == eos_id).sum()),
                "sha256_tokens": hashlib.sha256(ids.tobytes()).hexdigest(),
                "sources": sources, "tokenizer_sha256": tok_sha, "format": STREAM_FORMAT}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, ids)
        os.replace(tmp, npy)  # atomic: a crashed run never leaves a half file under the name
        meta.write_text(json.dumps(info, indent=1))
    return np.load(npy, mmap_mode="r"), json.loads(meta.read_text())



def train_order(n_tokens: int, seqlen: int, n_windows: int, seed: int) -> np.ndarray:
    """Start offsets of the first ``n_windows`` training windows, in the order trained.

    The stream is cut into non-overlapping windows of ``seqlen`` inputs (+1 target token,
    shared with the next window's first input); a fixed permutation (``seed``) orders them.
    The order depends only on the data, ``seqlen`` and ``seed``: every size sees the same.
    """
    available = (n_tokens - 1) // seqlen
    if n_windows > available:
        raise ConfigError(f"zoo.train_tokens asks for {n_windows} windows of {seqlen} tokens "
                          f"but the train split holds {available} ({n_tokens} tokens): lower "
                          "train_tokens (one pass, no repeats, is the recipe)")
    perm = np.random.default_rng(seed).permutation(available)[:n_windows]
    return perm.astype(np.int64) * seqlen


def gather_windows(tokens: np.ndarray, starts: np.ndarray, seqlen: int) -> np.ndarray:
    """``[len(starts), seqlen + 1]`` int64 windows: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
    idx = starts[:, None] + np.arange(seqlen + 1)[None, :]
    return np.asarray(tokens[idx], dtype=np.int64)


# ---- evaluation texts (the GPTQ protocol: documents joined with "\n\n") -------------------

def gutenberg_documents(data_dir: str | Path, split: str) -> list[str]:
    """Books of a Gutenberg split, one document each."""
    return list(read_books(data_dir, split))


def wikitext_documents(path: str | Path) -> list[str]:
    """Rows of a WikiText raw file as the Hugging Face ``wikitext`` loader yields them.

    Each line keeps its "\\n"; a blank line (" \\n" in the raw file) becomes "" (the loader's
    rule), so "\\n\\n".join(rows) is the text GPTQ's wikitext2 loader tokenizes.
    """
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def gptq_windows(ids: np.ndarray, seqlen: int) -> np.ndarray:
    """Non-overlapping windows of ``seqlen`` tokens, remainder dropped: ``[n, seqlen]``."""
    n = len(ids) // seqlen
    if n == 0:
        raise ConfigError(f"{len(ids)} tokens do not fill one window of seqlen={seqlen}")
    return np.asarray(ids[: n * seqlen], dtype=np.int64).reshape(n, seqlen)
