"""Named corpora: where their text comes from and how their documents are joined.

Each corpus reads from a local path when ``DataConfig.path`` is set and from the hub through
``datasets`` otherwise. Local files reproduce the rows of the hub dataset the GPTQ code uses:

| corpus      | hub (datasets.load_dataset)                  | local path (file, or folder + split)   | join   |
|-------------|----------------------------------------------|----------------------------------------|--------|
| wikitext2   | Salesforce/wikitext wikitext-2-raw-v1, text  | wiki.<split>.raw; one document per line | "\n\n" |
| ptb         | ptb-text-only/ptb_text_only (Parquet), sent. | ptb.<split>.txt; one per line, stripped | " "    |
| c4          | allenai/c4 en/c4-validation.00000-of-00008   | that .json.gz (or .jsonl[.gz/.xz])      | " "    |
| gutenberg   | (local only)                                 | <split>.jsonl.xz or train-*.jsonl.xz    | "\n\n" |
| tinystories | roneneldan/TinyStories                       | a .txt; stories split on blank lines    | "\n\n" |
| text        | (local only)                                 | a .txt file or a folder of them         | "\n\n" |
| jsonl       | (local only)                                 | .jsonl[.gz/.xz] file(s), ``text_field`` | "\n\n" |

Join rules follow IST-DASLab/gptq ``datautils.py``: wikitext2 ``"\n\n".join(test["text"])``
where the hub rows are the file's lines with their newline kept and blank lines as ""
(the wikitext loading script: ``yield {"text": row if row.strip() else ""}``); ptb and c4
follow its ``ptb-new`` / ``c4-new`` variants: ``" ".join(sentences)`` (rows are stripped
lines) and ``" ".join(validation[:1100]["text"])``. (The older ``c4`` of the paper drew 256
random windows from long documents; ``c4-new`` truncates to 256 x seqlen tokens, which is
``EvalConfig.max_tokens = 256 * seqlen`` here.)
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import lzma
import os
import re
from dataclasses import dataclass

from ptqscale.errors import ConfigError


class DataError(ConfigError):
    """A corpus cannot be read: missing or empty file, unknown corpus or split."""


@dataclass(frozen=True)
class CorpusSpec:
    """How one named corpus is found, read and joined."""

    join: str
    splits: tuple[str, ...]  # () = any split is accepted and ignored (plain files)
    # (path, name, column, revision) for datasets.load_dataset: repositories that current
    # `datasets` (>= 4, no loading scripts) reads; revision None = the default branch
    hub: tuple[str, str | None, str, str | None] | None
    default_max_documents: int | None = None


CORPORA: dict[str, CorpusSpec] = {
    "wikitext2": CorpusSpec("\n\n", ("test", "valid", "train"),
                            ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", None)),
    # the script-era ptb_text_only, read from the hub's Parquet conversion of it
    "ptb": CorpusSpec(" ", ("test", "valid", "train"),
                      ("ptb-text-only/ptb_text_only", "penn_treebank", "sentence",
                       "refs/convert/parquet")),
    "c4": CorpusSpec(" ", ("valid",), ("allenai/c4", None, "text", None),
                     default_max_documents=1100),
    "gutenberg": CorpusSpec("\n\n", ("test", "valid", "train"), None),
    "tinystories": CorpusSpec("\n\n", ("valid", "train"),
                              ("roneneldan/TinyStories", None, "text", None)),
    "text": CorpusSpec("\n\n", (), None),
    "jsonl": CorpusSpec("\n\n", (), None),
}
_SPLIT_ALIASES = {"validation": "valid", "val": "valid"}
_HUB_SPLIT = {"valid": "validation"}
_C4_VALID_SHARD = "en/c4-validation.00000-of-00008.json.gz"


@dataclass
class DataConfig:
    """A corpus and split; ``path=None`` reads from the hub, a path reads local files.

    Example::

        >>> cfg = DataConfig(name="wikitext2", split="test", path="../shared/data/wikitext-2-raw")
        >>> CORPORA[cfg.name].join
        '\\n\\n'
    """

    name: str  # wikitext2 | ptb | c4 | gutenberg | tinystories | text | jsonl
    split: str = "test"
    path: str | None = None  # local file or folder; None -> hub via `datasets`
    text_field: str = "text"  # jsonl only: the field holding the document
    max_documents: int | None = None  # first N documents (c4 defaults to GPTQ's 1100)

    def __post_init__(self):
        if self.name not in CORPORA:
            from ptqscale.errors import unknown_name

            raise DataError("data.name: " + unknown_name("corpus", self.name, CORPORA))
        spec = CORPORA[self.name]
        if spec.splits and canonical_split(self.split) not in spec.splits:
            raise DataError(
                f"data.split={self.split!r} is not a split of {self.name}; allowed: "
                f"{list(spec.splits)} (validation = valid)"
            )
        if spec.hub is None and not self.path:
            raise DataError(f"corpus {self.name!r} has no hub source; set data.path")
        if self.max_documents is not None and self.max_documents < 1:
            raise DataError(f"data.max_documents={self.max_documents} must be >= 1 (or null)")


def canonical_split(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def validate_data_config(cfg: DataConfig, min_tokens: int = 0) -> list[str]:
    """Check the local files exist and hold UTF-8 text; returns them (``[]`` for the hub).

    ``min_tokens`` (one evaluation window): files with fewer bytes than that hold fewer
    tokens than that too (a token covers at least one byte, up to a BOS/EOS), so they are
    refused here, before the tokenizer or the model loads.
    """
    if cfg.path is None:
        return []
    files = _local_files(cfg)
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"corpus file is empty: {f} (data.name={cfg.name})")
        problem = _content_problem(f, os.path.getsize(f), os.path.getmtime(f))
        if problem:
            raise DataError(f"corpus file {problem}: {f} (data.name={cfg.name}); "
                            "allowed: UTF-8 text")
    if all(_is_blank(f, os.path.getsize(f), os.path.getmtime(f)) for f in files):
        raise DataError(f"corpus {cfg.name!r} holds only whitespace: {cfg.path}; "
                        "allowed: UTF-8 text")
    size = sum(len(_head(f)) for f in files) if min_tokens else 0
    if min_tokens and size < _CHECK_BYTES and size + 2 < min_tokens:
        raise DataError(f"corpus {cfg.path} holds {size} bytes, fewer tokens than one window "
                        f"of eval.seqlen={min_tokens} (data.name={cfg.name}); allowed: a "
                        "corpus of at least one window")
    return files


# Content checks read at most this much (decompressed) of each file: cheap even for big
# corpora, and a binary or mis-encoded file shows itself in its first bytes.
_CHECK_BYTES = 8 << 20


def _head(path: str) -> bytes:
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read(_CHECK_BYTES)


@functools.lru_cache(maxsize=256)
def _content_problem(path: str, size: int, mtime: float) -> str | None:
    """Why ``path`` is not a text corpus (binary, not UTF-8, unreadable), else None;
    keyed by size and mtime so that a changed file is checked again."""
    try:
        head = _head(path)
    except (OSError, EOFError, lzma.LZMAError) as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if b"\0" in head:
        return "is binary (it holds NUL bytes)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < _CHECK_BYTES or e.start < len(head) - 4:   # not a cut multi-byte char
            return f"is not UTF-8 (byte {e.start}: {head[e.start:e.start + 1]!r})"
    return None


@functools.lru_cache(maxsize=256)
def _is_blank(path: str, size: int, mtime: float) -> bool:
    return not _head(path).strip()


def load_documents(cfg: DataConfig) -> list[str]:
    """The corpus as a list of documents (see the module table for what a document is)."""
    docs = _hub_documents(cfg) if cfg.path is None else _local_documents(cfg)
    limit = cfg.max_documents or CORPORA[cfg.name].default_max_documents
    docs = docs[:limit] if limit else docs
    if not any(d.strip() for d in docs):
        raise DataError(f"corpus {cfg.name!r} ({cfg.path or 'hub'}) holds no text")
    return docs


def join_documents(cfg: DataConfig, docs: list[str]) -> str:
    """The one string the ``gptq`` protocol tokenizes: documents joined by the corpus's rule."""
    return CORPORA[cfg.name].join.join(docs)


def _hub_documents(cfg: DataConfig) -> list[str]:
    import datasets

    path, name, column, revision = CORPORA[cfg.name].hub
    split = _HUB_SPLIT.get(canonical_split(cfg.split), canonical_split(cfg.split))
    if cfg.name == "c4":
        ds = datasets.load_dataset(path, data_files={"validation": _C4_VALID_SHARD},
                                   split="validation")
    else:
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
    return list(ds[column])


def _local_files(cfg: DataConfig) -> list[str]:
    path = os.path.expanduser(cfg.path)
    if not os.path.exists(path):
        raise DataError(f"data.path does not exist: {cfg.path} (corpus {cfg.name})")
    if os.path.isfile(path):
        return [path]
    split = canonical_split(cfg.split)
    patterns = {
        "wikitext2": [f"wiki.{split}.raw"],
        "ptb": [f"ptb.{split}.txt"],
        "c4": ["c4-validation.00000-of-00008.json*", "*.jsonl*"],
        "gutenberg": [f"{split}.jsonl.xz", f"{split}-*.jsonl.xz"],
        "tinystories": ["*.txt"],
        "text": ["*.txt"],
        "jsonl": ["*.jsonl", "*.jsonl.gz", "*.jsonl.xz"],
    }[cfg.name]
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise DataError(f"no file matching {patterns} in {cfg.path} (corpus {cfg.name}, split {split})")


def _local_documents(cfg: DataConfig) -> list[str]:
    docs: list[str] = []
    for f in validate_data_config(cfg):
        docs.extend(_read_file(cfg, f))
    return docs


def _read_file(cfg: DataConfig, path: str) -> list[str]:
    if cfg.name in ("c4", "gutenberg", "jsonl") or ".json" in os.path.basename(path):
        return _read_jsonl(path, cfg.text_field)
    # Lines are read exactly as the hub loading scripts read them (``for row in open(f)``).
    with open(path, encoding="utf-8") as fh:
        rows = list(fh)
    if cfg.name == "wikitext2":  # hub rows: each line with its newline, blank lines as ""
        return [row if row.strip() else "" for row in rows]
    if cfg.name == "ptb":  # hub rows: stripped lines
        return [row.strip() for row in rows]
    text = "".join(rows)
    if cfg.name == "tinystories":
        return [s.strip() for s in re.split(r"\n\s*\n", text) if s.strip()]
    return [text]


def _read_jsonl(path: str, field: str) -> list[str]:
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if field not in row:
                raise DataError(f"{path}:{lineno} has no field {field!r} (fields: {sorted(row)})")
            docs.append(row[field])
    return docs
