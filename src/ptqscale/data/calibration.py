"""Calibration samples: ``nsamples`` windows of ``seqlen`` tokens drawn with a seed.

The draw is GPTQ's: ``random.seed(seed)`` then, per sample, a start
``i = random.randint(0, len(stream) - seqlen - 1)`` and the window ``stream[i:i+seqlen]``, on
the corpus's token stream (``tokenize_corpus``). A private ``random.Random(seed)`` is used so
nothing else in the process shifts the draw. The sha256 of the drawn ids is returned and belongs
in the record: two jobs calibrated on the same tokens have the same hash.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from ptqscale.data.corpora import DataConfig, DataError
from ptqscale.data.stream import tokenize_corpus
from ptqscale.errors import ConfigError


@dataclass
class CalibConfig:
    """Which tokens a PTQ method calibrates on.

    Example::

        >>> cfg = CalibConfig(DataConfig("wikitext2", "test", path="../shared/data/wikitext-2-raw"),
        ...                   nsamples=4, seqlen=128, seed=0)
        >>> cfg.nsamples * cfg.seqlen
        512
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(name="wikitext2", split="train"))
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1:
            raise ConfigError(f"calib.nsamples={self.nsamples} must be >= 1")
        if self.seqlen < 2:
            raise ConfigError(f"calib.seqlen={self.seqlen} must be >= 2")


def sample_calibration(cfg: CalibConfig, tokenizer, cache_dir: str | None):
    """Draw ``(LongTensor[nsamples, seqlen], sha256_hex)`` from the calibration corpus."""
    stream = tokenize_corpus(cfg.data, tokenizer, cache_dir, preset="gptq")
    if stream.numel() < cfg.seqlen + 1:
        raise DataError(
            f"calibration corpus {cfg.data.name} has {stream.numel()} tokens, fewer than "
            f"seqlen + 1 = {cfg.seqlen + 1}"
        )
    rng = random.Random(cfg.seed)
    starts = [rng.randint(0, stream.numel() - cfg.seqlen - 1) for _ in range(cfg.nsamples)]
    samples = torch.stack([stream[i:i + cfg.seqlen] for i in starts])
    return samples, hash_tokens(samples)


def hash_tokens(ids: torch.Tensor) -> str:
    """sha256 of the shape and the int64 little-endian bytes of ``ids``."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()
