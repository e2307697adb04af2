"""Calibration plumbing written once for every family: block inputs, Hessians, block passes.

A calibration-based method walks the decoder blocks in order with the calibration activations
of the current block's input held in memory (one tensor per batch of sequences):

1. :func:`capture_block_inputs` runs the model up to the first block (a pre-hook stores the
   block's positional and keyword arguments, including position embeddings and attention
   masks that the model builds, then stops the forward with a sentinel exception); it, the
   block passes and the onloading of a block live in ``ptqscale.models.streaming``, the one
   walker that perplexity and the methods share, for models in one piece or streamed;
2. :func:`input_groups` finds which linears of a block read the same input tensor (q/k/v;
   gate/up; ...) in one forward of the first batch: such linears share one Hessian;
3. :func:`collect_hessians` runs the block over all batches with pre-hooks accumulating
   ``H = 2/n X X^T`` (fp32, n = tokens) at the first linear of each requested group, and stops
   each forward right after the last needed input when the block's output is not wanted;
4. :func:`run_block` produces the next block's inputs.

Example::

    >>> inputs = capture_block_inputs(model, anat.blocks[0], ids, batch_size=8,
    ...                               storage=torch.device("cpu"))     # doctest: +SKIP
    >>> groups = input_groups(anat.blocks[0], anat.block_order, inputs)  # doctest: +SKIP
    >>> groups[0]                                                   # doctest: +SKIP
    ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ptqscale import console
from ptqscale.models.spread import block_device  # noqa: F401 (re-exported too)
from ptqscale.models.streaming import (  # noqa: F401 (the block plumbing, re-exported)
    BlockInputs,
    block_output,
    capture_block_inputs,
    onloaded_block,
    run_block,
    to_device,
)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (what it needed has been seen)."""


@torch.no_grad()
def input_groups(block: nn.Module, order: list[str], inputs: BlockInputs) -> list[list[str]]:
    """Linears of ``block`` (names relative to it, in execution order) grouped by shared input.

    Consecutive linears that receive the very same input tensor (q, k, v after the input norm;
    gate and up after the post-attention norm) form one group. References to the inputs are
    held during the pass so that no freed tensor's memory can be reused and mistaken for one.
    """
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        return lambda module, args: seen.append((name, args[0]))

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in order]
    try:
        x, a, kw = next(inputs.batches(next(block.parameters()).device))
        block_output(block, x, a, kw)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in seen:
        if any(name in g for g in groups):
            continue  # a linear called twice (shared weights): its first call counts
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    missing = [n for n in order if not any(n in g for g in groups)]
    return groups + [[n] for n in missing]


class HessianAccumulator:
    """Running ``sum x x^T`` in fp32 over the rows of every input seen; ``H = 2/n sum``."""

    def __init__(self, n_in: int, device: torch.device):
        self.sum = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1])
        if X.is_cuda and X.dtype in (torch.bfloat16, torch.float16):
            # Products of 16-bit floats are exact in fp32 and cuBLAS sums them in fp32: the
            # fp32 GEMM's result up to summation order, on tensor cores (~10x faster).
            self.sum += torch.mm(X.T, X, out_dtype=torch.float32)
        else:
            X = X.to(torch.float32)  # fp32: bf16 sums lose digits
            self.sum.addmm_(X.T, X)
        self.tokens += X.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration input reached this layer")
        return self.sum * (2.0 / self.tokens)


@torch.no_grad()
def collect_hessians(block: nn.Module, groups: list[list[str]], inputs: BlockInputs,
                     device: torch.device, storage: torch.device | None = None):
    """``{first name of group: (H, tokens)}`` for each group, from one pass over the batches.

    With ``storage`` the block's outputs are kept too (returned as :class:`BlockInputs`);
    without, each forward stops at the last group's input. Returns ``(hessians, outputs)``.
    """
    acc = {g[0]: HessianAccumulator(block.get_submodule(g[0]).in_features, device)
           for g in groups}
    stop_at = groups[-1][0] if storage is None else None

    def hook(name):
        def fn(module, args):
            acc[name].add(args[0])
            if name == stop_at:
                raise _Stop
        return fn

    handles = [block.get_submodule(g[0]).register_forward_pre_hook(hook(g[0])) for g in groups]
    outputs = []
    try:
        for x, a, kw in inputs.batches(device):
            try:
                out = block_output(block, x, a, kw)
            except _Stop:
                continue
            if storage is not None:
                outputs.append(out.to(storage))
    finally:
        for h in handles:
            h.remove()
    hessians = {name: (a.hessian(), a.tokens) for name, a in acc.items()}
    return hessians, (BlockInputs(outputs, inputs.args, inputs.kwargs) if outputs else None)


@dataclass
class WalkPlan:
    """How :func:`walk_blocks` moves data: where blocks compute, where activations wait."""

    # where each block runs (it returns to where it was afterwards); a spread model's blocks
    # run on their own GPUs instead, their outputs waiting there too unless storage is the CPU
    device: torch.device
    storage: torch.device  # where the calibration activations wait between blocks
    batch_size: int  # sequences per forward pass
    fp_inputs: bool  # Hessians from the full-precision model's activations
    true_sequential: bool  # (quantized inputs only) re-collect after each input group
    progress: bool = False  # a bar over the blocks (ptqscale.console)
    desc: str = "blocks"  # the bar's label


def walk_blocks(model: nn.Module, anat: Any, selected: dict[str, nn.Module],
                calibration: torch.Tensor, plan: WalkPlan, quantize_group, cache=None) -> None:
    """Call ``quantize_group(names, H, tokens, cache_status)`` for every input group of every
    block, in block and execution order, with the Hessian of the group's inputs.

    ``names`` are full module names (the group's linears that are in ``selected``). The inputs
    come from the already-quantized earlier blocks, or (``plan.fp_inputs``) from the
    full-precision model, whose Hessians ``cache`` (a ``HessianCache`` or None) may hold.
    """
    n = len(anat.blocks)
    groups = cache.groups() if cache is not None else None
    missing = [_missing(anat, i, groups, selected, cache) for i in range(n)]
    last_needed = max((i for i in range(n) if missing[i]), default=-1)
    inputs = None
    if last_needed >= 0:
        inputs = capture_block_inputs(model, anat.blocks[0], calibration, plan.batch_size,
                                      plan.storage)
    for i, block in enumerate(console.progress(anat.blocks, plan.desc, plan.progress,
                                               unit="block")):
        at = block_device(model, block, plan.device)  # spread: the GPU the block lives on
        here = plan if at == plan.device else replace(
            plan, device=at, storage=at if plan.storage.type != "cpu" else plan.storage)
        with onloaded_block(block, here.device):
            if groups is None:
                groups = input_groups(block, anat.block_order, inputs)
                if cache is not None:
                    cache.save_groups(groups)
            prefix = f"{anat.block_prefix}.{i}."
            wanted = [[prefix + r for r in g if prefix + r in selected] for g in groups]
            wanted = [g for g in wanted if g]
            need_out = i < (last_needed if plan.fp_inputs else n - 1)
            inputs = _block(block, wanted, inputs, here, need_out, quantize_group, cache, prefix)


def _missing(anat, i: int, groups, selected, cache) -> bool:
    """Whether block ``i`` needs a forward pass for its Hessians (always, without a cache)."""
    if cache is None or groups is None:
        return True
    prefix = f"{anat.block_prefix}.{i}."
    firsts = [next((prefix + r for r in g if prefix + r in selected), None) for g in groups]
    return any(not cache.has(name) for name in firsts if name is not None)


def _block(block, wanted, inputs, plan: WalkPlan, need_out: bool, quantize_group, cache,
           prefix: str):
    rel = [[name[len(prefix):] for name in g] for g in wanted]
    if plan.fp_inputs:
        return _block_fp(block, wanted, rel, inputs, plan, need_out, quantize_group, cache)
    passes = [[g] for g in range(len(rel))] if plan.true_sequential else [list(range(len(rel)))]
    for p in passes:  # each pass sees the quantized weights of the groups before it
        if not p:
            continue
        hessians, _ = collect_hessians(block, [rel[k] for k in p], inputs, plan.device)
        for k in p:
            quantize_group(wanted[k], *hessians[rel[k][0]], "off")
    return run_block(block, inputs, plan.device, plan.storage) if need_out else None


def _block_fp(block, wanted, rel, inputs, plan, need_out, quantize_group, cache):
    """Full-precision inputs: every Hessian from one pass before any weight of the block changes."""
    status = "off" if cache is None else "miss"
    found = {}
    if cache is not None:
        for g, r in zip(wanted, rel, strict=True):
            hit = cache.load(g[0], plan.device)
            if hit is not None:
                found[r[0]] = (*hit, "hit")
    todo = [r for r in rel if r[0] not in found]
    outputs = None
    if todo:
        hessians, outputs = collect_hessians(block, todo, inputs, plan.device,
                                             plan.storage if need_out else None)
        for r, g in zip(rel, wanted, strict=True):
            if r[0] in hessians:
                found[r[0]] = (*hessians[r[0]], status)
                if cache is not None:
                    cache.save(g[0], *hessians[r[0]])
    elif need_out:
        outputs = run_block(block, inputs, plan.device, plan.storage)
    for g, r in zip(wanted, rel, strict=True):
        quantize_group(g, *found[r[0]])
    return outputs
