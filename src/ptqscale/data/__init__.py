"""Corpora, tokenized streams and calibration sampling.

Example::

    >>> from ptqscale.data import DataConfig, load_documents
    >>> cfg = DataConfig(name="wikitext2", split="test", path="../shared/data/wikitext-2-raw")
    >>> len(load_documents(cfg))  # the hub dataset's 4358 rows  # doctest: +SKIP
    4358

How to add a corpus: add a ``CorpusSpec`` to ``CORPORA`` in ``corpora.py`` (join rule, splits,
hub source), the file pattern its local folder uses in ``_local_files``, and how a file becomes
documents in ``_read_file``; then a test in ``tests/data`` that the local files give the same
documents the hub dataset has.
"""

from ptqscale.data.calibration import CalibConfig, hash_tokens, sample_calibration
from ptqscale.data.corpora import (
    CORPORA,
    CorpusSpec,
    DataConfig,
    DataError,
    canonical_split,
    join_documents,
    load_documents,
    validate_data_config,
)
from ptqscale.data.stream import (
    STREAM_PRESETS,
    STREAM_PROTOCOL_VERSION,
    encode,
    tokenize_corpus,
    tokenizer_fingerprint,
)

__all__ = [
    "CORPORA",
    "STREAM_PRESETS",
    "STREAM_PROTOCOL_VERSION",
    "CalibConfig",
    "CorpusSpec",
    "DataConfig",
    "DataError",
    "canonical_split",
    "encode",
    "hash_tokens",
    "join_documents",
    "load_documents",
    "sample_calibration",
    "tokenize_corpus",
    "tokenizer_fingerprint",
    "validate_data_config",
]
