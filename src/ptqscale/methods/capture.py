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

import re
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

    Linears that receive the very same input tensor (q, k, v after the input norm; gate and up
    after the post-attention norm; an expert's gate and up; in a parallel block (falcon-7b,
    phi) q/k/v and the MLP's first linear, which read one norm) form one group: one Hessian,
    and one scale for AWQ/SmoothQuant, whose fold into that norm reaches them all. References to the inputs are
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
    group_inputs: list[torch.Tensor] = []
    for name, x in seen:
        if any(name in g for g in groups):
            continue  # a linear called twice (shared weights): its first call counts
        k = next((i for i, t in enumerate(group_inputs) if t is x), None)
        if k is None:
            groups.append([name])
            group_inputs.append(x)
        else:  # also when not consecutive: a parallel block's one norm feeds q/k/v and the MLP
            groups[k].append(name)
    groups += _unseen_groups([n for n in order if not any(n in g for g in groups)], groups)
    return sorted(groups, key=lambda g: order.index(g[0]))  # execution order, unseen included


def _unseen_groups(missing: list[str], groups: list[list[str]]) -> list[list[str]]:
    """Groups of linears the first batch never reached (MoE experts no token was routed to):
    an expert ``experts.5.*`` is grouped as a seen sibling ``experts.<k>.*`` is; else alone."""
    index = re.compile(r"\.(\d+)\.")
    patterns = {index.sub(".#.", g[0]): [index.sub(".#.", n) for n in g] for g in groups}
    out: list[list[str]] = []
    for name in missing:
        if any(name in g for g in out):
            continue
        found = index.search(name)
        pattern = patterns.get(index.sub(".#.", name)) if found else None
        group = [p.replace(".#.", f".{found.group(1)}.") for p in pattern] if pattern else [name]
        out.append(group if all(n in missing for n in group) else [name])
    return out


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

    def hessian(self) -> torch.Tensor | None:
        """``2/n sum x x^T``; None when no token reached the layer (an MoE expert the router
        never chose): the caller decides what to do without a Hessian (GPTQ: RTN)."""
        if self.tokens == 0:
            return None
        return self.sum * (2.0 / self.tokens)


@torch.no_grad()
def collect_hessians(block: nn.Module, groups: list[list[str]], inputs: BlockInputs,
                     device: torch.device, storage: torch.device | None = None):
    """``{first name of group: (H, tokens)}`` for each group, from one pass over the batches
    (``(None, 0)`` for a group no token reached: an MoE expert the router never chose).

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
    ``H`` is None (``tokens`` 0) for a group no calibration token reached (an MoE expert the
    router never chose): ``quantize_group`` must then do without, e.g. :func:`rtn_fallback`.
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
    passes = _passes(rel) if plan.true_sequential else [list(range(len(rel)))]
    for p in passes:  # each pass sees the quantized weights of the groups before it
        if not p:
            continue
        hessians, _ = collect_hessians(block, [rel[k] for k in p], inputs, plan.device)
        _to_storage(hessians, plan.storage)
        for k in p:
            quantize_group(wanted[k], *hessians.pop(rel[k][0]), "off")
    return run_block(block, inputs, plan.device, plan.storage) if need_out else None


def _passes(rel: list[list[str]]) -> list[list[int]]:
    """True-sequential passes: one per input group, except that the same group of sibling
    experts (``experts.<k>.gate_proj``/``up_proj`` of every k; then every ``down_proj``)
    shares one pass, as AutoGPTQ's Mixtral steps do. Experts read the router's split of one
    tensor, never each other's outputs, so each still sees exactly what it would alone, and
    an MoE block costs four passes instead of two per expert."""
    index = re.compile(r"\.\d+\.")
    passes: list[list[int]] = []
    where: dict[str, int] = {}
    for k, group in enumerate(rel):
        key = index.sub(".#.", group[0])
        if key != group[0] and key in where:
            passes[where[key]].append(k)
        else:
            where[key] = len(passes)
            passes.append([k])
    return passes


def _block_fp(block, wanted, rel, inputs, plan, need_out, quantize_group, cache):
    """Full-precision inputs: every Hessian from one pass before any weight of the block changes."""
    status = "off" if cache is None else "miss"
    found = {}
    if cache is not None:
        for g, r in zip(wanted, rel, strict=True):
            hit = cache.load(g[0], plan.storage)
            if hit is not None:
                found[r[0]] = (*hit, "hit")
    todo = [r for r in rel if r[0] not in found]
    outputs = None
    if todo:
        hessians, outputs = collect_hessians(block, todo, inputs, plan.device,
                                             plan.storage if need_out else None)
        _to_storage(hessians, plan.storage)
        for r, g in zip(rel, wanted, strict=True):
            if r[0] in hessians:
                found[r[0]] = (*hessians[r[0]], status)
                if cache is not None and hessians[r[0]][0] is not None:
                    cache.save(g[0], *hessians[r[0]])
    elif need_out:
        outputs = run_block(block, inputs, plan.device, plan.storage)
    for g, r in zip(wanted, rel, strict=True):
        quantize_group(g, *found.pop(r[0]))  # popped: each H freed once its group is done
    return outputs


def _to_storage(hessians: dict, storage: torch.device) -> None:
    """Hessians wait where the activations wait (offloaded: the CPU, so that a large one,
    0.8 GB for a 14336-wide input, is not held on the GPU beside GPTQ's own working copy)."""
    for name, (H, tokens) in hessians.items():
        hessians[name] = (None if H is None else H.to(storage), tokens)


NO_TOKENS = ("no calibration token reached this layer (an MoE expert the router never chose "
             "for them): rounded to nearest instead")


def rtn_fallback(modules: list[tuple[str, nn.Module]], fmt) -> list[dict]:
    """Round ``modules`` to nearest in place, as GPTQ implementations do for an expert without
    calibration tokens; their layer entries say so (``fallback``, ``fallback_reason``)."""
    from ptqscale.methods.rtn import round_weight_

    entries = [round_weight_(name, module, fmt) for name, module in modules]
    for entry in entries:
        entry.update(fallback="rtn", fallback_reason=NO_TOKENS)
    return entries


def routed_tokens(anat: Any, layers: list[dict]) -> dict[str, Any] | None:
    """MoE summary of a report: calibration tokens per expert (its first matrix's Hessian
    tokens) and the experts that fell back to RTN; None for a dense model."""
    if not anat.experts:
        return None
    tokens = {}
    for layer in layers:
        expert = layer["name"].rsplit(".", 1)[0]
        if expert in anat.experts and expert not in tokens:
            tokens[expert] = int(layer.get("hessian_tokens", 0))
    fallback = sorted({layer["name"].rsplit(".", 1)[0] for layer in layers
                       if layer.get("fallback") == "rtn"})
    return {"experts": len(anat.experts), "tokens": tokens, "rtn_fallback": fallback,
            "router": "full precision (not a target)"}
