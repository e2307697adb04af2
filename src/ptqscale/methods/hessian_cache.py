"""A disk cache of GPTQ Hessians, shared by the jobs of a sweep.

With full-precision calibration inputs (``fp_inputs: true``) the Hessian ``H = 2/n X X^T`` of a
layer depends on the model, the calibration tokens and how they were pushed through the model
(dtype, device type, batch size), never on the number format: a sweep over formats computes it
once per (model, calibration) and every later job reads it. With quantized inputs (the GPTQ
default) ``X`` depends on the earlier blocks' quantization, i.e. on the format, so no cache.

Layout: ``<cache_dir>/gptq-hessians/<key>/<layer name>.safetensors`` holding ``H`` (fp32) and
the token count; ``key.json`` beside them records what the key was made of. ``key`` is the
sha256 of: a cache version, the model's fingerprint (:func:`model_fingerprint`), the
calibration hash, and the settings above. Writes are atomic (a temp file of its own + rename),
so jobs that race on one layer only ever read a whole file. A file that cannot be read anyway
(a disk fault, a hand edit) is moved aside with one log line and recomputed.

Example::

    >>> cache = HessianCache.open("results/_cache/methods", {"model": "ab12", "calib": "cd34"})
    >>> cache.load("model.layers.0.self_attn.q_proj") is None   # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from torch import nn

from ptqscale.files import quarantine

CACHE_VERSION = 1
_SAMPLES_PER_TENSOR = 4096


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config and, per state-dict tensor, name, shape, dtype, float64
    sum and 4096 evenly spaced values: any change of the weights changes it (in practice),
    without hashing every byte of a large model."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path",)}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if flat.numel() == 0 or not flat.is_floating_point():
            h.update(flat.cpu().numpy().tobytes() if flat.numel() else b"")
            continue
        idx = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
        h.update(flat[idx].double().cpu().numpy().tobytes())
        h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()


class HessianCache:
    """Per-layer Hessians under one key; ``load``/``save`` by full layer name."""

    def __init__(self, folder: str, material: dict):
        self.folder = folder
        self.material = material

    @classmethod
    def open(cls, root: str, material: dict) -> HessianCache:
        material = {"cache_version": CACHE_VERSION, **material}
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
        folder = os.path.join(root, "gptq-hessians", key)
        os.makedirs(folder, exist_ok=True)
        meta = os.path.join(folder, "key.json")
        if not os.path.exists(meta):
            _atomic_write(meta, lambda path: _write_json(path, material))
        return cls(folder, material)

    @property
    def key(self) -> str:
        return os.path.basename(self.folder)

    def groups(self) -> list[list[str]] | None:
        """The block's input groups (names relative to a block), once a job has stored them."""
        path = os.path.join(self.folder, "groups.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                groups = json.load(f)
            if isinstance(groups, list) and all(isinstance(g, list) for g in groups):
                return groups
            reason = "not a list of lists"
        except ValueError as e:
            reason = f"invalid JSON: {e}"
        quarantine(path, reason, "Hessian cache file", "it will be recomputed")
        return None

    def save_groups(self, groups: list[list[str]]) -> None:
        _atomic_write(os.path.join(self.folder, "groups.json"),
                      lambda path: _write_json(path, groups))

    def _path(self, layer: str) -> str:
        return os.path.join(self.folder, f"{layer}.safetensors")

    def has(self, layer: str) -> bool:
        return os.path.exists(self._path(layer))

    def load(self, layer: str, device: torch.device | str = "cpu"):
        """``(H, tokens)`` or None when the layer is not cached."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.has(layer):
            return None
        try:
            data = load_file(self._path(layer), device=str(device))
            return data["H"], int(data["tokens"].item())
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            quarantine(self._path(layer), f"{type(e).__name__}: {e}", "Hessian cache file",
                       "it will be recomputed")
            return None

    def save(self, layer: str, H: torch.Tensor, tokens: int) -> None:
        from safetensors.torch import save_file

        tensors = {"H": H.detach().to(torch.float32).contiguous().cpu(),
                   "tokens": torch.tensor(tokens, dtype=torch.int64)}
        _atomic_write(self._path(layer), lambda path: save_file(tensors, path))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=isinstance(obj, dict))


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
