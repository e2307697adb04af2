"""ModelConfig and the cheap filesystem checks that run before any weight is read.

A model path is one of three kinds, decided here once:

- ``gguf``: a path ending in ``.gguf`` (a local GGUF file, loaded through transformers' GGUF support);
- ``local``: an existing folder, or anything that looks like a filesystem path (absolute, ``./``,
  ``../``, ``~``); it must hold safetensors weights (pickle only with ``allow_pickle``);
- ``hub``: anything else of the form ``name`` or ``org/name`` (a Hugging Face hub id).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache

from ptqscale.errors import ConfigError
from ptqscale.models.errors import ModelNotFoundError, UnsafeCheckpointError, unknown_name

DTYPES = ("float32", "bfloat16", "float16")
# ``auto``: the dtype the checkpoint states (``checkpoint_dtype``); keys use the resolved one.
DTYPE_CHOICES = (*DTYPES, "auto")
PLACEMENTS = ("one", "streamed", "spread", "auto")
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|MiB)\s*$")
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
        >>> cfg.dtype, cfg.device, cfg.allow_pickle, cfg.placement
        ('float32', 'auto', False, 'one')

    ``placement`` and ``max_gpu_memory`` change where the weights wait and how much GPU memory
    a job may take, never a number (tests/models/test_streaming.py), so they are not part of
    the job key: ``one`` holds the model on ``device``; ``streamed`` keeps the weights on the
    CPU and brings one decoder block at a time to ``device`` (models/streaming.py); ``auto``
    streams when the weights plus a working margin do not fit the budget (``max_gpu_memory``,
    else the device's free memory); ``spread`` puts whole decoder blocks on several GPUs (the
    first ``gpus`` visible ones, null = all; models/spread.py). ``max_gpu_memory`` (e.g.
    ``"20GiB"``, ``"512MiB"``) caps the process's CUDA allocator on ``device`` (on every GPU
    of a spread model): going over fails with an error naming it.
    ``reuse`` (default true) keeps the model loaded for the next jobs of this process that
    load the same files the same way (models/reuse.py); false reloads it for every job.
    """

    name: str
    path: str
    family: str = ""
    size: str = ""
    revision: str | None = None
    # float32 | bfloat16 | float16 | auto (the checkpoint's); log-softmax is always fp32
    dtype: str = "float32"
    device: str = "auto"  # auto -> cuda if available else cpu
    allow_pickle: bool = False  # pickle checkpoints run code when unpickled: opt-in only
    trust_remote_code: bool = False
    tokenizer: str | None = None  # separate tokenizer path / hub id / .gguf (default: the model's)
    max_seqlen: int | None = None  # usable context; must not exceed the checkpoint's own
    placement: str = "one"  # one | streamed | spread | auto (speed and memory: not keyed)
    max_gpu_memory: str | None = None  # e.g. "20GiB": a CUDA memory cap the job enforces
    # placement=spread only: how many of the visible GPUs to spread over (null = all of them);
    # speed and memory only: not in the job key
    gpus: int | None = None
    # keep the loaded model (+ a host copy of its weights) for this process's later jobs of
    # it (models/reuse.py); costs host memory, changes no number: not in the job key
    reuse: bool = True
    # true: a tiny random model of this member's architecture instead of its checkpoint
    # (models/standins.py); a plumbing check: keyed and recorded as a stand-in
    stand_in: bool = False

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name must be a non-empty string")
        if not self.path:
            raise ConfigError(f"model.path must be a non-empty string (model {self.name!r})")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError("model.dtype: " + unknown_name("dtype", self.dtype, DTYPE_CHOICES))
        if self.placement not in PLACEMENTS:
            raise ConfigError("model.placement: "
                              + unknown_name("placement", self.placement, PLACEMENTS))
        if self.gpus is not None and (isinstance(self.gpus, bool) or not isinstance(self.gpus, int)
                                      or self.gpus < 1 or self.placement != "spread"):
            raise ConfigError(f"model.gpus={self.gpus!r}: a number of GPUs >= 1 used only with "
                              f"model.placement=spread (here {self.placement!r}); or null")
        if self.placement == "spread" and self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"model.device={self.device!r} with model.placement=spread: "
                              "spread picks its GPUs with model.gpus; set model.device=auto "
                              "(or cpu: the one-device map)")
        if self.placement == "spread" and self.device == "cpu" and self.gpus not in (None, 1):
            raise ConfigError(f"model.gpus={self.gpus} with model.device=cpu: a spread over the "
                              "CPU is one device; set model.gpus=null or model.device=auto")
        if self.max_gpu_memory is not None:
            parse_bytes(self.max_gpu_memory, "model.max_gpu_memory")
        if not _DEVICE.match(self.device):
            raise ConfigError(
                f"model.device={self.device!r} is not one of auto, cpu, mps, cuda, cuda:N"
            )
        if self.stand_in:
            from ptqscale.models.standins import architecture_of

            architecture_of(self)  # a family without a stand-in fails here, naming it
            if self.dtype == "auto":
                raise ConfigError(f"model.stand_in=true with model.dtype=auto (model "
                                  f"{self.name!r}): a stand-in has no checkpoint to take a "
                                  f"dtype from; set model.dtype to one of {list(DTYPES)}")
        if self.max_seqlen is not None and self.max_seqlen < 2:
            raise ConfigError(f"model.max_seqlen={self.max_seqlen} must be >= 2 (or null)")


def parse_bytes(text: str, key: str) -> int:
    """``"20GiB"`` -> 21474836480 (GiB or MiB, a positive number); a clear error naming ``key``.

    Example::

        >>> parse_bytes("1.5GiB", "model.max_gpu_memory")
        1610612736
    """
    match = _BYTES.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}={text!r}: expected a positive size in GiB or MiB "
                          "such as '20GiB' or '512MiB' (or null for no cap)")
    unit = 2**30 if match.group(2) == "GiB" else 2**20
    return int(float(match.group(1)) * unit)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``kind`` is gguf | local | hub; ``weights`` lists local files."""

    kind: str
    path: str
    weights: tuple[str, ...] = ()


def resolved_dtype(cfg: ModelConfig) -> str:
    """``cfg.dtype``, with ``auto`` replaced by :func:`checkpoint_dtype` (what keys and loading use)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return checkpoint_dtype(cfg.path, cfg.revision, cfg.trust_remote_code)


@lru_cache(maxsize=256)
def checkpoint_dtype(path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """The dtype a checkpoint states in its config (``dtype`` / ``torch_dtype``); reads no weights.

    GGUF files are dequantized to float32 by transformers, so they resolve to float32; so does a
    config that states no dtype (transformers' own default then). A dtype outside ``DTYPES``
    is an error: set ``model.dtype`` explicitly.
    """
    local = os.path.expanduser(path)
    if local.endswith(".gguf"):
        return "float32"
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ModelNotFoundError(f"model.dtype=auto: no config.json in {path} to read the "
                                     "checkpoint's dtype from; set model.dtype explicitly")
        with open(os.path.join(local, "config.json")) as f:
            stated = json.load(f)
        value = stated.get("dtype") or stated.get("torch_dtype")
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, revision=revision,
                                            trust_remote_code=trust_remote_code)
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    value = str(value).removeprefix("torch.") if value is not None else "float32"
    if value not in DTYPES:
        raise ConfigError(f"model.dtype=auto: the checkpoint {path} states dtype {value!r}; "
                          f"set model.dtype to one of {list(DTYPES)}")
    return value


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
