"""Load a model once per worker process for all the jobs that share it.

Hydra's basic launcher runs every job of a multirun in one process, one after another (joblib
and submitit workers run several jobs per process too), and every job quantizes its model in
place. :func:`shared_model` keeps the last loaded model, its tokenizer and a host copy of its
weights (a :class:`ModelSnapshot` taken before the first job touches it); :func:`give_back`
then puts back exactly what the job changed, so the next job of that model starts from the
loaded weights without reading a file:

- tensors memory-mapped from the checkpoint (models/mapped.py; a model whose weights wait on
  the CPU in the stored dtype, streamed above all): no copy is kept and nothing unchanged is
  read. A tensor the job rebound (``.data =``, ``Module.to``) gets its mapped view back; pages
  it wrote in place (private copies of file pages, found in ``/proc/self/pagemap``) are
  dropped, so they show the file again;
- other tensors: every parameter and buffer is compared bitwise with its host copy and only
  those that differ are written back (methods write through ``.data``, which bumps no version
  counter, so a counter cannot tell). On an accelerator the comparison would cost the same
  host-to-device traffic as the copy, so there every tensor is written back;
- hooks the job left (activation quantizers, unfoldable ``x / s`` scalings), attributes it
  added to modules, ``requires_grad``, gradients and train/eval flags;
- anything it cannot put back (a module, parameter or buffer replaced, the transformers config
  changed) and any job that failed drop the model: the next job loads it afresh.

Cost: the host copy doubles the host memory of the tensors that are not mapped. ``model.reuse: false`` loads every
job's model afresh instead (and keeps no copy); it changes no number, so it is not in the job
key. At most one model is kept: a job of another model frees it before loading its own.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ptqscale.models import mapped as mm
from ptqscale.models.config import ModelConfig

log = logging.getLogger("ptqscale")
# nn.Module's hook dictionaries: a job's hooks are taken off again by restoring their contents.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_CHILDREN = ("_parameters", "_buffers", "_modules")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Tensor:
    tensor: torch.Tensor        # the model's tensor object (the Parameter or buffer)
    host: torch.Tensor          # its values on the CPU, as loaded
    device: torch.device        # where it was loaded
    requires_grad: bool
    ptr: int = 0                # its data's address then (moved since: rebound)


@dataclass
class _Mapped:
    tensor: torch.Tensor        # the model's tensor object, a view of a checkpoint's mapping
    home: torch.Tensor          # that view, as loaded
    pages: tuple[int, int]      # the pages [first, stop) its bytes lie on
    requires_grad: bool


class ModelSnapshot:
    """What a job may change in a loaded model, recorded so that :meth:`restore` undoes it."""

    def __init__(self, model: nn.Module):
        self.model = model
        unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied once
        self.mapped = _mapped(list(unique.values()))
        self.runs = mm.page_runs(mm.byte_range(m.home) for m in self.mapped)
        tracked = {id(m.tensor) for m in self.mapped}
        self.tensors = [_Tensor(t, t.detach().to("cpu", copy=True), t.device, t.requires_grad,
                                t.data_ptr())
                        for t in unique.values() if id(t) not in tracked]
        self.modules = [(m, {k: v for k, v in vars(m).items() if k not in _HOOK_DICTS},
                         {k: dict(getattr(m, k)) for k in _HOOK_DICTS if hasattr(m, k)},
                         _children(m))
                        for m in model.modules()]
        self.config = _config_text(model)

    def restore(self) -> tuple[int, bool]:
        """Undo a job's changes; returns (tensors written back, clean). Not clean: the job
        changed what cannot be put back (the model must then be dropped)."""
        if _config_text(self.model) != self.config:
            return 0, False
        for module, attrs, hooks, children in self.modules:
            if _children(module) != children:
                return 0, False   # a submodule, parameter or buffer was replaced or added
            for name, saved in hooks.items():
                live = getattr(module, name)
                live.clear()
                live.update(saved)
            for k in set(vars(module)) - set(attrs) - set(_HOOK_DICTS):
                delattr(module, k)
            for k, v in attrs.items():
                if vars(module).get(k) is not v:
                    object.__setattr__(module, k, v)
        mappings = mm.file_mappings()   # a copied tensor now in one was spilled (paths.spill)
        return self._put_back_mapped() + sum(
            _put_back(t, t.tensor.data_ptr() != t.ptr
                      and mm.mapping_of(t.tensor.data, mappings) is not None)
            for t in self.tensors), True

    def _put_back_mapped(self) -> int:
        """Undo the job's writes to mapped tensors without reading them: drop the pages it
        wrote, rebind the tensors it rebound. Returns how many tensors were changed (one that
        shares a written page with a changed one counts too)."""
        if not self.mapped:
            return 0
        written = mm.written_pages(self.runs)
        mm.discard_writes(written)
        count = 0
        for m in self.mapped:
            t = m.tensor
            rebound = t.data_ptr() != m.home.data_ptr() or (t.dtype, t.shape, t.device) != (
                m.home.dtype, m.home.shape, m.home.device)
            if rebound:
                t.data = m.home
            first, stop = m.pages
            hit = np.searchsorted(written, first)
            count += int(rebound or (hit < written.size and written[hit] < stop))
            t.requires_grad_(m.requires_grad)
            if isinstance(t, nn.Parameter):
                t.grad = None
        return count


def _mapped(tensors: list[torch.Tensor]) -> list[_Mapped]:
    """The tensors that are views of a checkpoint's private mapping and none of whose pages
    hold private data yet (such a page, written while loading, must not be dropped later)."""
    if not mm.can_track_writes():
        return []
    mappings = mm.file_mappings()
    views = [t for t in tensors if mm.mapping_of(t.data, mappings) is not None]
    if not views:
        return []
    written = mm.written_pages(mm.page_runs(mm.byte_range(t.data) for t in views))
    found = []
    for t in views:
        first, stop = mm.pages_of(mm.byte_range(t.data))
        hit = np.searchsorted(written, first)
        if hit < written.size and written[hit] < stop:
            continue   # copied like a tensor in process memory
        found.append(_Mapped(t, t.data, (first, stop), t.requires_grad))
    return found


def _put_back(saved: _Tensor, spilled: bool = False) -> bool:
    t, host = saved.tensor, saved.host
    written = False
    if spilled or (t.dtype, t.shape, t.device) != (host.dtype, host.shape, saved.device):
        # spilled: a copy in memory again, so that the spill file's mapping (and disk) goes
        t.data = host.to(saved.device, copy=True)
        written = True
    elif t.device.type != "cpu" or not _bitwise_equal(t.data, host):
        t.data.copy_(host)
        written = True
    t.requires_grad_(saved.requires_grad)
    if isinstance(t, nn.Parameter):
        t.grad = None
    return written


def _children(module: nn.Module) -> dict:
    """The identities of a module's parameters, buffers and submodules (a replaced one differs)."""
    return {k: {name: id(v) for name, v in getattr(module, k).items()} for k in _CHILDREN}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits (``torch.equal`` holds 0.0 == -0.0 and NaN != NaN)."""
    if a.is_floating_point():
        view = _INT_VIEW[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def _config_text(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return json.dumps(config.to_dict(), sort_keys=True, default=str) if config is not None else ""


@dataclass
class _Entry:
    key: str
    model: nn.Module
    tokenizer: Any
    snapshot: ModelSnapshot


_KEPT: dict[str, _Entry] = {}     # this process's model between jobs, at most one
_IN_USE: dict[int, _Entry] = {}   # models a job holds (by id), until give_back


def reuse_key(cfg: ModelConfig, fingerprint: str | None) -> str:
    """Which loads are the same: the whole model config (device and placement too; ``reuse``
    aside) and the fingerprint of the files (runner/identity.py), so changed files reload."""
    plain = {k: v for k, v in asdict(cfg).items() if k != "reuse"}
    return json.dumps([plain, fingerprint], sort_keys=True, default=str)


def shared_model(cfg: ModelConfig, fingerprint: str | None = None):
    """``(model, tokenizer, reused)``: the model this process holds for ``cfg`` and
    ``fingerprint``, else one loaded now, kept for later jobs when ``cfg.reuse`` and the files
    have a fingerprint (without one, changed files could not be told apart).

    Every model taken here must be handed to :func:`give_back` when the job ends.
    """
    # looked up at call time: tests can refuse loads there
    from ptqscale import models

    key = reuse_key(cfg, fingerprint)
    entry = _KEPT.get(key) if cfg.reuse else None
    if entry is not None:
        # a caller restores at give_back; taken out until then, so that a job that dies
        # without giving it back never leaves a changed model here
        del _KEPT[key]
        _IN_USE[id(entry.model)] = entry
        return entry.model, entry.tokenizer, True
    forget()   # another model's memory is freed before this one is loaded
    model, tokenizer = models.load_model(cfg)
    if fingerprint is not None and cfg.reuse:
        _IN_USE[id(model)] = _Entry(key, model, tokenizer, ModelSnapshot(model))
    return model, tokenizer, False


def give_back(model: nn.Module, ok: bool) -> int:
    """End a job's use of ``model``: restored and kept when ``ok`` and restorable, else
    dropped. Returns how many tensors were written back."""
    entry = _IN_USE.pop(id(model), None)
    if entry is None or not ok:
        return 0
    try:
        written, clean = entry.snapshot.restore()
    except Exception:  # noqa: BLE001 - a model that cannot be put back is dropped, not kept
        log.warning("could not restore model %s after its job; it is dropped", entry.key[:80])
        return 0
    if clean:
        _KEPT[entry.key] = entry
    return written


def forget() -> None:
    """Drop the kept model (and free its accelerator memory)."""
    if not _KEPT:
        return
    _KEPT.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
