"""The reference family's recipe: one ``ZooConfig`` per family, the size a field of it.

Every member of a family sees the same tokens in the same order with the same recipe; only
the shape (width, depth) and the width-scaled peak learning rate change with ``size``.
The size table below is the whole family; its names give the approximate number of
non-embedding parameters (counted on the built model in tests/zoo).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ptqscale.errors import ConfigError


@dataclass(frozen=True)
class SizeSpec:
    """The shape of one member: hidden width and number of decoder blocks."""

    hidden: int
    layers: int


# name -> shape. Head dim is 32 for every member (heads = hidden / 32), the SwiGLU width is
# Llama's rule (8/3 of hidden, rounded up to a multiple of 32). Names are the approximate
# non-embedding parameter counts (0.21M to 21M); neighbours differ by 1.8x to 2.7x.
SIZES: dict[str, SizeSpec] = {
    "200k": SizeSpec(hidden=64, layers=4),
    "500k": SizeSpec(hidden=96, layers=5),
    "1m": SizeSpec(hidden=128, layers=5),
    "2m": SizeSpec(hidden=160, layers=6),
    "4m": SizeSpec(hidden=224, layers=7),
    "8m": SizeSpec(hidden=288, layers=8),
    "20m": SizeSpec(hidden=384, layers=12),
}


def unknown(what: str, value, allowed) -> str:
    """Error text for a value outside a fixed set: the value, then what is allowed."""
    return f"{what}={value!r} is not one of {sorted(allowed)}"


@dataclass(frozen=True)
class ZooConfig:
    """Recipe of one member of a reference family (defaults: the committed family).

    Example::

        >>> cfg = ZooConfig(size="1m")
        >>> cfg.name, cfg.hidden, cfg.heads, cfg.ffn, cfg.peak_lr
        ('gutenberg-llama-1m', 128, 4, 352, 0.004)
        >>> cfg.steps, cfg.warmup_steps
        (1280, 64)
    """

    size: str = "1m"
    family: str = "gutenberg-llama"
    # tokenizer: byte-level BPE trained on a deterministic subset of the train split
    vocab_size: int = 8192
    tokenizer_chars: int = 30_000_000  # characters of train text the BPE is trained on
    # data: train split for training, valid for checkpoint selection, test for reporting
    seqlen: int = 512
    train_tokens: int = 1280 * 32768  # same for every size: 41.9M tokens, one pass, no repeats
    batch_tokens: int = 32768  # 64 sequences of 512
    data_seed: int = 0  # permutation of the train windows (the order every size sees)
    # optimizer: AdamW, linear warmup then cosine decay to min_lr_ratio * peak
    lr_base: float = 2e-3  # peak LR at hidden=lr_base_width; peak_lr = lr_base*width_ref/hidden
    lr_base_width: int = 256
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and the embedding, not on norm gains
    grad_clip: float = 1.0
    # model init: N(0, init_std); o_proj/down_proj also scaled by 1/sqrt(2*layers) (GPT-2)
    init_std: float = 0.02
    residual_init_scaling: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 1234  # model init and anything else random in training
    # checkpoint selection: valid loss on the first valid_tokens at `evals` evenly spaced steps
    evals: int = 4
    valid_tokens: int = 1 << 20
    train_dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU always trains in float32
    save_dtype: str = "bfloat16"  # dtype of the saved safetensors
    head_dim: int = 32
    ffn_multiple: int = 32

    def __post_init__(self):
        if self.size not in SIZES:
            raise ConfigError("zoo.size: " + unknown("size", self.size, SIZES))
        for key in ("vocab_size", "seqlen", "train_tokens", "batch_tokens", "evals",
                    "valid_tokens", "tokenizer_chars", "head_dim", "ffn_multiple"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"zoo.{key}={getattr(self, key)!r} must be a positive int")
        if not 256 < self.vocab_size <= 65536:
            # token files are uint16 and the byte alphabet alone takes 256 ids
            raise ConfigError(f"zoo.vocab_size={self.vocab_size} must be in (256, 65536]")
        if self.batch_tokens % self.seqlen:
            raise ConfigError(f"zoo.batch_tokens={self.batch_tokens} must be a multiple of "
                              f"seqlen={self.seqlen}")
        if self.train_tokens % self.batch_tokens:
            raise ConfigError(f"zoo.train_tokens={self.train_tokens} must be a multiple of "
                              f"batch_tokens={self.batch_tokens} (whole steps only)")
        if self.hidden % self.head_dim:
            raise ConfigError(f"zoo.head_dim={self.head_dim} must divide hidden={self.hidden}")
        self._check_ranges()

    def _check_ranges(self):
        checks = {
            "lr_base": 0 < self.lr_base < 1, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_frac": 0 <= self.warmup_frac < 1, "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip > 0,
            "init_std": self.init_std > 0, "betas": all(0 <= b < 1 for b in self.betas),
            "lr_base_width": self.lr_base_width > 0, "norm_eps": self.norm_eps > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"zoo.{key}={getattr(self, key)!r} is out of range")
        if self.train_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError("zoo." + unknown("train_dtype", self.train_dtype,
                                               ("bfloat16", "float16", "float32")))
        if self.save_dtype not in ("bfloat16", "float32"):
            raise ConfigError("zoo." + unknown("save_dtype", self.save_dtype,
                                               ("bfloat16", "float32")))

    # ---- derived, never set by hand -------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}"

    @property
    def hidden(self) -> int:
        return SIZES[self.size].hidden

    @property
    def layers(self) -> int:
        return SIZES[self.size].layers

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def ffn(self) -> int:
        # Llama: int(2 * 4d / 3), rounded up to a multiple
        return self.ffn_multiple * math.ceil(int(8 * self.hidden / 3) / self.ffn_multiple)

    @property
    def peak_lr(self) -> float:
        # Adam's update size is width-independent, so the LR falls as 1/width to keep the
        # change of each hidden activation about constant across sizes (the muP rule for
        # hidden matrices, applied to all of them for simplicity).
        return round(self.lr_base * self.lr_base_width / self.hidden, 10)

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_tokens

    @property
    def batch_seqs(self) -> int:
        return self.batch_tokens // self.seqlen

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_frac * self.steps)

    def replace(self, **changes) -> ZooConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["derived"] = {k: getattr(self, k) for k in (
            "name", "hidden", "layers", "heads", "ffn", "peak_lr", "steps", "batch_seqs",
            "warmup_steps")}
        return d


def lr_at(cfg: ZooConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, cosine to the floor.

    Example::

        >>> cfg = ZooConfig(size="4m")
        >>> lr_at(cfg, 0) < lr_at(cfg, cfg.warmup_steps) == cfg.peak_lr
        True
        >>> round(lr_at(cfg, cfg.steps - 1) / cfg.peak_lr, 3)
        0.1
    """
    peak, warm, total = cfg.peak_lr, cfg.warmup_steps, cfg.steps
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - 1 - warm)
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
