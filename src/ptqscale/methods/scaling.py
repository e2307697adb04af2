"""Per-input-channel scaling of a group of linears that share an input, folded away.

SmoothQuant and AWQ both replace ``Y = X W^T`` by ``Y = (X diag(s)^-1) (W diag(s))^T``: the
linears of a group (q/k/v; gate/up; ...) get their columns multiplied by ``s`` and the group's
input is divided by ``s``. The division is folded into the op that produces the input when
one can take it exactly, so that the full-precision function is unchanged at no runtime cost:

- a module whose output IS the group's input (identity of the tensor: the norm before q/k/v
  or gate/up) and whose ``weight`` (and ``bias``) scale its output channels, as RMSNorm and
  LayerNorm do: ``weight /= s``;
- a linear earlier in the block whose output channels become the group's input channels
  through channel-wise ops only (``up_proj`` before ``down_proj`` in a gated MLP, ``v_proj``
  before ``o_proj`` without grouped-query attention): its rows (and bias) ``/= s``.

The family-agnostic test (no module names): a candidate qualifies when, with its output
channels multiplied by a random positive ``r``, the block's forward gives the group the input
``X * r`` (to float tolerance); the candidate is restored exactly afterwards. A norm that
scales by ``1 + weight`` (Gemma) fails the test and is not used. Without a fold target, the
division can stay on the model as an explicit forward pre-hook (``x / s``) on each linear of
the group (:func:`scale_group_`, ``target=None``); the methods say which they do.

Example::

    >>> target = find_fold_target(block, ["mlp.gate_proj", "mlp.up_proj"], batch)  # doctest: +SKIP
    >>> target.name, target.kind                                          # doctest: +SKIP
    ('post_attention_layernorm', 'norm')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# A fold is accepted when ||X' / r - X|| <= TOL * ||X|| (relative, per dtype of the block).
_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
_TOL_LOW = 2e-2  # bf16 / fp16


@dataclass
class FoldTarget:
    """Where a group's ``1/s`` goes: the module ``name`` (relative to the block) and its kind."""

    name: str
    kind: str  # "norm" (output IS the input) | "linear" (output channels feed the input)


def _channel_params(module: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(parameter, axis) pairs that scale the module's output channels."""
    params = []
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        params.append((weight, 0))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        params.append((bias, 0))
    return params


@torch.no_grad()
def _divide_outputs_(module: nn.Module, s: torch.Tensor) -> None:
    """Output channel ``j`` of ``module`` divided by ``s[j]`` (weight rows / elements, bias)."""
    for p, _ in _channel_params(module):
        view = (-1,) + (1,) * (p.ndim - 1)
        p.data.div_(s.to(p.device, p.dtype).view(view))


def _group_input(block: nn.Module, first: str, batch) -> torch.Tensor:
    """The input of linear ``first`` (relative name) in one forward of ``block`` on ``batch``."""
    seen = []

    def hook(module, args):
        seen.append(args[0])
        raise _Seen

    handle = block.get_submodule(first).register_forward_pre_hook(hook)
    x, a, kw = batch
    try:
        block(x, *a, **kw)
    except _Seen:
        pass
    finally:
        handle.remove()
    if not seen:
        raise NotReached(f"the block's forward never reached {first}")
    return seen[0].detach().clone()


class NotReached(RuntimeError):
    """The probe batch never reached the group (an MoE expert no token was routed to)."""


class _Seen(Exception):
    """Stops a forward once the wanted input has been seen."""


def _candidates(block: nn.Module, group: list[str], order: list[str], batch) -> list[FoldTarget]:
    """Modules whose output tensor is the group's input, then earlier linears of the right width."""
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.append((n, out)))
               for n, m in block.named_modules() if n and _channel_params(m)]
    try:
        x_in = _group_input(block, group[0], batch)
    finally:
        for h in handles:
            h.remove()
    found = [FoldTarget(n, "norm") for n, out in outputs
             if isinstance(out, torch.Tensor) and out.shape == x_in.shape
             and not isinstance(block.get_submodule(n), nn.Linear) and torch.equal(out, x_in)]
    width = block.get_submodule(group[0]).in_features
    before = order[:order.index(group[0])] if group[0] in order else []
    found += [FoldTarget(n, "linear") for n in reversed(before)
              if n not in group and block.get_submodule(n).out_features == width]
    return found


@torch.no_grad()
def find_fold_target(block: nn.Module, group: list[str], order: list[str], batch
                     ) -> FoldTarget | None:
    """The op that can absorb the group's ``1/s`` exactly (verified numerically), or None.

    ``batch`` is ``(hidden, args, kwargs)`` of the block on its device (any hidden states
    do: the test is structural). Raises :class:`NotReached` when ``batch`` never reaches the
    group (an MoE expert it routes no token to).
    """
    dtype = next(block.parameters()).dtype
    # compared in the model's precision (at least fp32): a float64 model's 1e-9 tolerance
    # would refuse every fold if the check itself ran in fp32
    work = torch.float64 if dtype == torch.float64 else torch.float32
    x_ref = _group_input(block, group[0], batch).to(work)
    gen = torch.Generator().manual_seed(0)
    r = torch.empty(x_ref.shape[-1], dtype=work).uniform_(0.5, 2.0, generator=gen)
    tol = _TOL.get(dtype, _TOL_LOW)
    for cand in _candidates(block, group, order, batch):
        module = block.get_submodule(cand.name)
        saved = [p.data.clone() for p, _ in _channel_params(module)]
        _divide_outputs_(module, 1.0 / r)
        try:
            x_new = _group_input(block, group[0], batch).to(work)
        except NotReached:  # the change re-routed the tokens: not a channel-wise fold
            continue
        finally:
            for (p, _), old in zip(_channel_params(module), saved, strict=True):
                p.data.copy_(old)
        expected = x_ref * r.to(x_ref.device)
        if x_new.shape == expected.shape and \
                float((x_new - expected).norm()) <= tol * float(expected.norm()):
            return cand
    return None


@torch.no_grad()
def scale_group_(block: nn.Module, group: list[str], s: torch.Tensor,
                 target: FoldTarget | None) -> None:
    """Columns of the group's linears ``*= s``; ``1/s`` into ``target`` or an explicit hook."""
    for name in group:
        w = block.get_submodule(name).weight
        w.data.mul_(s.to(w.device, w.dtype).unsqueeze(0))
    if target is not None:
        _divide_outputs_(block.get_submodule(target.name), s)
        return
    inv = (1.0 / s).detach().clone()
    for name in group:
        block.get_submodule(name).register_forward_pre_hook(_InputScale(inv))


class _InputScale:
    """Forward pre-hook ``x -> x / s`` (kept on the model: an unfoldable scaling)."""

    def __init__(self, inv: torch.Tensor):
        self.inv = inv

    def __call__(self, module, args):
        x = args[0]
        return (x * self.inv.to(x.device, x.dtype), *args[1:])
