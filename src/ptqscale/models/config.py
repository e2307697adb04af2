"""ModelConfig and the cheap filesystem checks that run before any weight is read.

A model path is one of three kinds, decided here once:

- ``gguf``: a path ending in ``.gguf`` (a local GGUF file, loaded through transformers' GGUF support);
- ``local``: an existing folder, or anything that looks like a filesystem path (absolute, ``./``,
  ``../``, ``~``); it must hold safetensors weights (pickle only with ``allow_pickle``);
- ``hub``: anything else of the form ``name`` or ``org/name`` (a Hugging Face hub id).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ptqscale.errors import ConfigError
from ptqscale.models.errors import ModelNotFoundError, UnsafeCheckpointError, unknown_name

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Weight files transformers can read; pickle ones execute code on load, hence opt-in only.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class ModelConfig:
    """Which causal LM to load, and how.

    Example::

        >>> cfg = ModelConfig(name="stories260k", path="../shared/data/models/stories260K/"
        ...                   "stories260K.gguf", max_seqlen=512)
        >>> cfg.dtype, cfg.device, cfg.allow_pickle
        ('float32', 'auto', False)
    """

    name: str
    path: str
    family: str = ""
    size: str = ""
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights; log-softmax is always fp32)
    device: str = "auto"  # auto -> cuda if available else cpu
    allow_pickle: bool = False  # pickle checkpoints run code when unpickled: opt-in only
    trust_remote_code: bool = False
    tokenizer: str | None = None  # separate tokenizer path / hub id / .gguf (default: the model's)
    max_seqlen: int | None = None  # usable context; must not exceed the checkpoint's own

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name must be a non-empty string")
        if not self.path:
            raise ConfigError(f"model.path must be a non-empty string (model {self.name!r})")
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype: " + unknown_name("dtype", self.dtype, DTYPES))
        if not _DEVICE.match(self.device):
            raise ConfigError(
                f"model.device={self.device!r} is not one of auto, cpu, mps, cuda, cuda:N"
            )
        if self.max_seqlen is not None and self.max_seqlen < 2:
            raise ConfigError(f"model.max_seqlen={self.max_seqlen} must be >= 2 (or null)")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``kind`` is gguf | local | hub; ``weights`` lists local files."""

    kind: str
    path: str
    weights: tuple[str, ...] = ()


def looks_like_path(path: str) -> bool:
    """True for strings that are meant as filesystem paths rather than hub ids."""
    return (
        os.path.isabs(path)
        or path.startswith(("./", "../", "~", ".\\"))
        or os.path.exists(os.path.expanduser(path))
        or not _HUB_ID.match(path)
    )


def validate_model_config(cfg: ModelConfig) -> ModelSource:
    """Check the model entry against the filesystem without reading weights.

    Raises :class:`ModelNotFoundError` for a missing path, a folder without weights or without a
    tokenizer, :class:`UnsafeCheckpointError` for a pickle-only folder without ``allow_pickle``,
    and ConfigError for a CUDA device on a machine without CUDA.
    """
    _check_device(cfg.device)
    if cfg.tokenizer and looks_like_path(cfg.tokenizer):
        if not os.path.exists(os.path.expanduser(cfg.tokenizer)):
            raise ModelNotFoundError(f"model.tokenizer path does not exist: {cfg.tokenizer}")
    path = os.path.expanduser(cfg.path)
    if path.endswith(".gguf"):
        return ModelSource("gguf", _check_gguf(path), (path,))
    if not looks_like_path(cfg.path):
        return ModelSource("hub", cfg.path)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model.path does not exist: {cfg.path} (model {cfg.name!r})")
    if not os.path.isdir(path):
        raise ModelNotFoundError(
            f"model.path {cfg.path} is a file; give a Hugging Face folder or a .gguf file"
        )
    weights = _local_weights(path, cfg.allow_pickle, cfg.name)
    if cfg.tokenizer is None and not any(
        os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES
    ):
        raise ModelNotFoundError(
            f"no tokenizer in {cfg.path} (looked for {list(_TOKENIZER_FILES)}); "
            "set model.tokenizer to a tokenizer path or hub id"
        )
    return ModelSource("local", path, weights)


def _check_device(device: str) -> None:
    from ptqscale.models.loading import resolve_device

    resolve_device(device)  # raises where the device does not exist


def _check_gguf(path: str) -> str:
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file does not exist: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{path} does not start with the GGUF magic bytes")
    return path


def _local_weights(path: str, allow_pickle: bool, name: str) -> tuple[str, ...]:
    files = sorted(os.listdir(path))
    safe = [f for f in files if f.endswith(".safetensors")]
    pickle = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if safe:
        return tuple(os.path.join(path, f) for f in safe)
    if pickle and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} has only pickle weights {pickle} (model {name!r}); pickle files can run "
            "code when loaded. Convert to safetensors, or set model.allow_pickle=true"
        )
    if pickle:
        return tuple(os.path.join(path, f) for f in pickle)
    raise ModelNotFoundError(
        f"no weights in {path} (model {name!r}): expected *.safetensors "
        f"(or pickle {list(_PICKLE_SUFFIXES)} with model.allow_pickle=true)"
    )
