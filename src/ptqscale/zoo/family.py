"""A family is a recipe plus a list of sizes: ``conf/zoo/<family>.yaml`` -> ``FamilyConfig``.

The recipe fixes the architecture preset (presets.py), the width/depth rule, the tokenizer
(a byte-level BPE of ``vocab_size`` fitted on the family's own training text), the data,
the training length and the optimiser; ``sizes`` maps a member name (its approximate
non-embedding parameter count) to its width, and the rule gives the rest of the shape:
``heads = hidden / head_dim``, ``layers = max(min_layers, round(hidden / width_per_layer))``,
``ffn = ffn_ratio * hidden`` rounded up to a multiple of ``ffn_multiple``.

Training length is the D axis: every member is trained once along one data order and
saved at ``checkpoints`` x ``base_tokens`` tokens (1/4, 1/2, 1, 2, 4 by default). The
schedule is warmup-stable-decay: a constant peak LR after warmup, and each checkpoint is a
branch that decays the LR linearly over the last ``cooldown_frac`` of its own tokens, so
the checkpoint at D tokens is a fully annealed model that saw exactly the first D tokens
(Hägele et al. 2024: such a cooldown matches a cosine run of that length), rather than a
mid-schedule snapshot whose LR differs from checkpoint to checkpoint.

Example::

    >>> fam = load_family("zoo-llama")
    >>> fam.preset, fam.checkpoints
    ('llama', (0.25, 0.5, 1.0, 2.0, 4.0))
    >>> fam.member_name("100k", 4.0)
    'zoo-llama-100k-x4'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ptqscale.errors import ConfigError, unknown_name
from ptqscale.zoo.presets import PRESETS, Shape

PACKAGE = Path(__file__).resolve().parents[1]
CORPORA = ("gutenberg-en",)
DTYPES = ("bfloat16", "float16", "float32")


def zoo_conf_dir() -> Path:
    """conf/zoo of the checkout (or of an installed package's own conf copy)."""
    for path in (PACKAGE.parents[1] / "conf" / "zoo", PACKAGE / "conf" / "zoo"):
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no conf/zoo folder next to {PACKAGE}")


def family_names() -> list[str]:
    """The families defined in conf/zoo, sorted."""
    return sorted(p.stem for p in zoo_conf_dir().glob("*.yaml"))


@dataclass(frozen=True)
class FamilyConfig:
    """One family's whole recipe (every value explicit in its YAML, copied into each zoo.json)."""

    family: str
    preset: str  # llama | gpt2 | opt | neox (presets.PRESETS)
    sizes: dict[str, int]  # member name (~non-embedding params) -> hidden width
    # width/depth rule
    head_dim: int
    width_per_layer: int
    min_layers: int
    ffn_ratio: float
    ffn_multiple: int
    # tokenizer and data
    vocab_size: int
    corpus: str  # gutenberg-en: the train split's books, in file order
    train_shards: int  # train-00.. : the first shards of the train split are read
    train_chars: int  # the same leading fraction of each of their books, cut at a line end
    seqlen: int
    batch_seqs: int
    data_seed: int  # the order of the training windows (one permutation per epoch)
    # training length (the D axis) and schedule
    base_tokens: int
    checkpoints: tuple[float, ...]
    warmup_steps: int
    cooldown_frac: float
    min_lr_ratio: float
    # optimiser (AdamW) and init
    lr_base: float  # peak LR at hidden = lr_base_width; peak_lr = lr_base * width / hidden
    lr_base_width: int
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    init_std: float
    residual_init_scaling: bool
    tie_embeddings: bool
    norm_eps: float
    rope_theta: float
    rotary_fraction: float  # neox: share of each head that is rotated (others ignore it)
    seed: int
    train_dtype: str  # autocast dtype on CUDA; the CPU always trains in float32
    save_dtype: str
    eval_tokens: int  # tokens of Gutenberg valid and test scored at every checkpoint
    notes: str = ""
    path: str = field(default="", compare=False)  # the YAML it came from

    def __post_init__(self):
        object.__setattr__(self, "checkpoints", tuple(float(c) for c in self.checkpoints))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "sizes", {str(k): int(v) for k, v in self.sizes.items()})
        where = f"zoo family {self.family!r}"
        if self.preset not in PRESETS:
            raise ConfigError(f"{where}: preset: " + unknown_name("preset", self.preset, PRESETS))
        if self.corpus not in CORPORA:
            raise ConfigError(f"{where}: corpus: " + unknown_name("corpus", self.corpus, CORPORA))
        for key in ("head_dim", "width_per_layer", "min_layers", "ffn_multiple", "train_shards", "train_chars",
                    "seqlen", "batch_seqs", "base_tokens", "eval_tokens", "lr_base_width"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key}={getattr(self, key)!r} must be a positive int")
        if not 256 < self.vocab_size <= 65536:  # uint16 token files; 256 bytes + EOS at least
            raise ConfigError(f"{where}: vocab_size={self.vocab_size} must be in (256, 65536]")
        if not self.sizes:
            raise ConfigError(f"{where}: sizes must name at least one member")
        for name, hidden in self.sizes.items():
            if hidden % self.head_dim:
                raise ConfigError(f"{where}: sizes.{name}: hidden={hidden} is not a multiple "
                                  f"of head_dim={self.head_dim}")
        self._check_schedule(where)

    def _check_schedule(self, where: str):
        checks = {"lr_base": 0 < self.lr_base < 1, "cooldown_frac": 0 < self.cooldown_frac <= 1,
                  "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "eps": self.eps > 0,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip > 0,
                  "init_std": self.init_std > 0, "betas": all(0 <= b < 1 for b in self.betas),
                  "norm_eps": self.norm_eps > 0, "rotary_fraction": 0 < self.rotary_fraction <= 1,
                  "warmup_steps": self.warmup_steps >= 0, "ffn_ratio": self.ffn_ratio > 0,
                  "checkpoints": bool(self.checkpoints) and min(self.checkpoints) > 0}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{where}: {key}={getattr(self, key)!r} is out of range")
        for key in ("train_dtype", "save_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"{where}: {key}: "
                                  + unknown_name("dtype", getattr(self, key), DTYPES))
        for mult in self.checkpoints:
            tokens = mult * self.base_tokens
            if tokens != int(tokens) or int(tokens) % self.batch_tokens:
                raise ConfigError(f"{where}: checkpoint {mult:g} x base_tokens={self.base_tokens}"
                                  f" is not a whole number of batches of {self.batch_tokens} "
                                  "tokens")
            if self.branch_start(mult) < self.warmup_steps:
                raise ConfigError(f"{where}: the cooldown of checkpoint {mult:g}x starts at step "
                                  f"{self.branch_start(mult)}, before warmup_steps="
                                  f"{self.warmup_steps} ends: lower warmup_steps")

    # ---- derived, never set by hand ---------------------------------------------------------
    @property
    def batch_tokens(self) -> int:
        return self.batch_seqs * self.seqlen

    def shape(self, size: str) -> Shape:
        """The width/depth rule applied to one size."""
        if size not in self.sizes:
            raise ConfigError(f"zoo family {self.family!r}: "
                              + unknown_name("size", size, self.sizes))
        hidden = self.sizes[size]
        layers = max(self.min_layers, round(hidden / self.width_per_layer))
        ffn = self.ffn_multiple * math.ceil(self.ffn_ratio * hidden / self.ffn_multiple)
        return Shape(hidden=hidden, layers=layers, heads=hidden // self.head_dim, ffn=ffn)

    def peak_lr(self, size: str) -> float:
        # Adam's update size does not depend on width, so the LR falls as 1/width to keep the
        # change of each hidden activation about constant across sizes (muP's hidden rule).
        return round(self.lr_base * self.lr_base_width / self.sizes[size], 10)

    def steps(self, mult: float) -> int:
        """Optimizer steps (= batches seen) of the checkpoint at ``mult`` x base_tokens."""
        return round(mult * self.base_tokens) // self.batch_tokens

    def cooldown_steps(self, mult: float) -> int:
        return max(1, round(self.cooldown_frac * self.steps(mult)))

    def branch_start(self, mult: float) -> int:
        """The step at which the checkpoint's cooldown branch leaves the constant-LR run."""
        return self.steps(mult) - self.cooldown_steps(mult)

    def member_name(self, size: str, mult: float) -> str:
        return f"{self.family}-{size}-x{mult:g}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        d["betas"], d["checkpoints"] = list(self.betas), list(self.checkpoints)
        return d


def load_family(name_or_path: str | Path) -> FamilyConfig:
    """``conf/zoo/<name>.yaml`` (or a YAML path) as a validated ``FamilyConfig``.

    Unknown or missing keys are fatal, naming the file and the keys.
    """
    import yaml

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = zoo_conf_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError("zoo family: " + unknown_name("family", str(name_or_path),
                                                            family_names()))
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(FamilyConfig)} - {"path"}
    required = {f.name for f in dataclasses.fields(FamilyConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if set(raw) - known or required - set(raw):
        raise ConfigError(f"{path}: unknown keys {sorted(set(raw) - known)}, missing keys "
                          f"{sorted(required - set(raw))}; allowed: {sorted(known)}")
    return FamilyConfig(**raw, path=str(path))
