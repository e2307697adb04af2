"""Hessian-vector products of a streamed model: one decoder block on the device at a time.

A model in one piece gets ``H v`` by double backward through the whole graph
(``hessian.autograd_hvp``). A streamed model cannot hold that graph, so one product is two
sweeps over the blocks (forward-over-reverse, Pearlmutter's R-operator written per block):

1. **forward, with tangents**: ``x_{i+1} = f_i(x_i, W_i)`` and its directional derivative
   along the probe, ``dx_{i+1} = J_x f_i dx_i + J_W f_i v_i`` (a JVP by double backward of
   the block, ``_block_jvp``; ``dx_0 = 0``: the embedding is not probed). Only ``x_i`` and
   ``dx_i`` of every block are kept (the checkpoints), not the graph.
2. **head**: the loss from ``x_L`` (the model's own final norm and head, by replay), its
   gradient ``a_L = dL/dx_L`` and that gradient's tangent ``da_L = (d^2 L/dx_L^2) dx_L``.
3. **backward, block by block from the last**, each block's forward recomputed from its
   checkpoint with ``create_graph``: ``(a_i, g_i) = J^T a_{i+1}`` (``J`` w.r.t. ``(x_i, W_i)``),
   then one more backward of ``s = a_i . dx_i + g_i . v_i + f_i . da_{i+1}`` gives the
   tangents ``(da_i, (H v)_i)``: the Hessian of ``a_{i+1} . f_i`` along ``(dx_i, v_i)`` plus
   ``J^T da_{i+1}``, i.e. the derivative of the gradient along the probe, exactly.

Every quantity is exact (no step size): it differs from the one-piece double backward only
in the order of floating-point operations (docs/landscape.md gives the measured difference).
All windows pass through block i before block i+1 (micro-batches of ``hvp_windows``, each
weighted by its share of the windows, as in one piece). GPU memory: one block's fp32
weights, its probe, and its gradient or product (3 block-sized vectors), and the graph of
one block for one micro-batch; the checkpoints
(``x_i``, ``dx_i`` of every block and window) wait on the device when they fit in a third of
its free memory, else on the CPU (``streaming.hidden_storage``).

Example::

    >>> sweep = StreamedHVP(model, targets, windows, hvp_windows=1)    # doctest: +SKIP
    >>> samples = sweep.hutchinson_samples(probes=16, seed=0)         # [16, n_targets]
    >>> eig, iters, ok = hs.power_iteration(sweep, sweep.weights, 30, 1e-4, 0,
    ...                                     draw_device=sweep.device) # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ptqscale import console
from ptqscale.errors import ConfigError
from ptqscale.models.streaming import (
    BlockInputs,
    _head_tensors,
    _replaying,
    block_output,
    capture_block_inputs,
    hidden_storage,
    module_tensors,
    onloaded,
    placement_of,
    within_budget,
)

from . import hessian as hs

# probe(i) -> the probe's part for block i's targets (on the execution device);
# reduce(i, v, hv, fraction) consumes micro-batch b's block-i part of H_b v, to be summed
# as sum_b fraction_b H_b v by the consumer (no block-sized accumulator on the device), in
# the order and with the operations of hessian.summed_hvp / hutchinson_samples: bitwise
ProbeFn = Callable[[int], list[torch.Tensor]]
HEAD_CHUNK_FLOATS = 2**24  # logits per span of the streamed head (64 MB in fp32)
ReduceFn = Callable[[int, list[torch.Tensor], list[torch.Tensor], float], None]


class StreamedHVP:
    """``v -> H v`` of the mean NLL of ``windows`` w.r.t. the targets' weights, streamed.

    Call it with a full vector (one tensor per target, anywhere) for ``H v`` on the CPU
    (the power iteration), or use :meth:`hutchinson_samples`, which never holds a full
    vector: each block's probe is drawn on the device and reduced to its dot product there.
    The model must be in the state of ``hessian.double_backward_ready`` (fp32, eager
    attention, gradients only on the targets).
    """

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                 hvp_windows: int):
        from ptqscale.models.anatomy import decoder_blocks

        self.model, self.placement = model, placement_of(model)
        self.device = self.placement.device
        self.prefix, self.holder = decoder_blocks(model)
        self.weights = [m.weight for m in targets.values()]
        self.homes = [w.device for w in self.weights]  # where H v goes (the CPU, streamed)
        self.names = names_in_blocks(self.holder, targets)
        self.batches = list(windows.split(hvp_windows))
        # windows have equal length: the share of windows is the share of tokens
        self.fractions = [b.shape[0] / windows.shape[0] for b in self.batches]

    # ------------------------------------------------------------ public uses

    def __call__(self, v: hs.Vector) -> hs.Vector:
        out: list[torch.Tensor | None] = [None] * len(self.weights)

        def probe(i: int) -> list[torch.Tensor]:
            return [v[j].to(self.device) for j in self.names[i].values()]

        def add(i: int, _v, hv, fraction: float) -> None:
            for j, h in zip(self.names[i].values(), hv):
                h = h.to(self.homes[j])  # as summed_hvp: the first product is the accumulator
                out[j] = h.mul_(fraction) if out[j] is None else out[j].add_(h, alpha=fraction)

        self.sweep(probe, add)
        return out

    def hutchinson_samples(self, probes: int, seed: int, progress: bool = False) -> torch.Tensor:
        """``[probes, n_targets]`` samples ``v_l^T (H v)_l``, as ``hessian.hutchinson_samples``
        (probe k from ``seed + k``, each block drawn with its global target index)."""
        samples = torch.zeros(probes, len(self.weights), dtype=torch.float64)
        with console.bar(probes, "hessian trace (streamed)", progress, unit="hvp") as bar:
            for k in range(probes):
                def probe(i: int, k=k) -> list[torch.Tensor]:
                    index = self.names[i]  # weights are on the device while their block is
                    return hs.rademacher([self.weights[j] for j in index.values()], seed + k,
                                         list(index.values()))

                def dots(i: int, v, hv, fraction: float, k=k) -> None:
                    samples[k, list(self.names[i].values())] += fraction * hs.blockwise_dot(v, hv)

                self.sweep(probe, dots)
                bar.update()
        return samples

    # ------------------------------------------------------------ the two sweeps

    def sweep(self, probe: ProbeFn, reduce: ReduceFn) -> None:
        """One Hessian-vector product: forward with tangents, head, backward block by block."""
        with within_budget(self.placement, "the streamed Hessian-vector product"):
            xs, dxs, as_tuple = self._forward(probe)
            adj, dadj = self._head(xs.pop(), dxs.pop(), as_tuple)
            for i in reversed(range(len(self.holder))):
                adj, dadj = self._backward(i, xs.pop(), dxs.pop(), adj, dadj, probe, reduce)

    def _forward(self, probe: ProbeFn):
        size = self.batches[0].shape[0]
        n_tokens = sum(b.numel() for b in self.batches) * (len(self.holder) + 2)
        self.storage = hidden_storage(self.placement, n_tokens, self.model.config.hidden_size,
                                      torch.float32)
        x0 = capture_block_inputs(self.model, self.holder[0], torch.cat(self.batches), size,
                                  self.storage)
        self.args, self.kwargs = x0.args, x0.kwargs
        xs, dxs, as_tuple = [x0.hidden], [[None] * len(self.batches)], False
        for i, block in enumerate(self.holder):
            with onloaded(module_tensors([block]), self.device, write_back=False):
                params = dict(block.named_parameters())
                w, v, ys, dys = [params[n] for n in self.names[i]], probe(i), [], []
                for b, (x, a, kw) in enumerate(self._inputs(xs[-1])):
                    dx = None if dxs[-1][b] is None else dxs[-1][b].to(self.device)
                    y, dy, as_tuple = _block_jvp(block, w, x, dx, a, kw, v)
                    ys.append(y.to(self.storage))
                    dys.append(dy.to(self.storage))
            xs.append(ys)
            dxs.append(dys)
        return xs, dxs, as_tuple

    def _inputs(self, hidden: list[torch.Tensor]):
        return BlockInputs(hidden, self.args, self.kwargs).batches(self.device)

    def _head(self, x_last: list[torch.Tensor], dx_last: list[torch.Tensor], as_tuple: bool):
        """``a_L`` (the gradient of the micro-batch's loss w.r.t. the last hidden states) and
        its tangent ``da_L``, per micro-batch, from the model's own head (by replay).

        The final norm and the head act on each position alone, so ``a`` and ``da`` of a
        span of positions depend on that span only: the head runs over spans of at most
        ``HEAD_CHUNK_FLOATS`` logits (the double backward of a 2048 x 128k head would hold
        several GB of logit-sized tensors). Each span's loss is its summed NLL over the
        micro-batch's token count, whose gradients are those of the mean (tests: bitwise).
        """
        source = [None]
        adj, dadj = [], []
        tensors = _head_tensors(self.model, self.prefix, self.holder[0], self.batches[0])
        with onloaded(tensors, self.device, write_back=False), \
                _replaying(self.holder, source, as_tuple, self.device) as first:
            embed = self.model.get_input_embeddings().weight.device
            for ids, x, dx in zip(self.batches, x_last, dx_last):
                parts = [self._head_span(ids, x, dx, span, source, first, embed)
                         for span in head_spans(ids.shape, self.model.config.vocab_size)]
                adj.append(torch.cat([a for a, _ in parts], dim=1).to(self.storage))
                dadj.append(torch.cat([da for _, da in parts], dim=1).to(self.storage))
        return adj, dadj

    def _head_span(self, ids, x, dx, span: slice, source: list, first, embed):
        rows, length = ids.shape
        xs = x[:, span].to(self.device).requires_grad_(True)
        source[0], first.batch = xs, 0
        logits = self.model(input_ids=ids[:, span].to(embed), use_cache=False).logits
        target = ids[:, span.start + 1:span.stop + 1].to(logits.device)  # t predicts t + 1
        pred = logits[:, :target.shape[1]]
        pred = pred if pred.dtype == torch.float64 else pred.float()  # fp32 at least
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                               reduction="sum") / (rows * (length - 1))
        (a,) = torch.autograd.grad(loss, xs, create_graph=True)
        (da,) = torch.autograd.grad(a, xs, dx[:, span].to(self.device), allow_unused=True)
        return a.detach(), (torch.zeros_like(xs) if da is None else da)

    def _backward(self, i: int, xs, dxs, adj, dadj, probe: ProbeFn, reduce: ReduceFn):
        block = self.holder[i]
        first = i == 0  # the embedding is not probed: no gradient w.r.t. block 0's input
        new_adj, new_dadj = [], []
        with onloaded(module_tensors([block]), self.device, write_back=False):
            params = dict(block.named_parameters())
            w = [params[n] for n in self.names[i]]
            v = probe(i)
            for b, (x, a, kw) in enumerate(self._inputs(xs)):
                x = x.requires_grad_(not first)
                with torch.enable_grad():
                    y = block_output(block, x, a, kw)
                    wrt = w if first else [x, *w]
                    grads = list(torch.autograd.grad(y, wrt, adj[b].to(self.device),
                                                     create_graph=True))
                    gx = None if first else grads.pop(0)
                    s = (y * dadj[b].to(self.device)).sum()
                    s = s + sum((g * t).sum() for g, t in zip(grads, v))
                    # the graph of s keeps v and activations, not these block-sized gradients
                    del grads
                    if not first:
                        s = s + (gx * dxs[b].to(self.device)).sum()
                    tangents = torch.autograd.grad(s, wrt, allow_unused=True)
                tangents = [torch.zeros_like(t) if d is None else d
                            for t, d in zip(wrt, tangents)]
                reduce(i, v, tangents[-len(w):], self.fractions[b])  # (H_b v)_i
                if not first:
                    new_adj.append(gx.detach().to(self.storage))
                    new_dadj.append(tangents[0].to(self.storage))
                del y, gx, s, tangents
        return new_adj, new_dadj



def streamed_hessian(model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                     cfg, progress: bool = False):
    """``measure_hessian``'s numbers for a streamed model (``cfg``: a ``LandscapeConfig``):
    ``(trace samples, seconds, top eigenvalue, iterations, converged, seconds)``, with the
    probes and the start vector drawn on the execution device, as a model in one piece there
    would draw them."""
    hvp = StreamedHVP(model, targets, windows, cfg.hvp_windows)
    start = time.perf_counter()
    samples = hvp.hutchinson_samples(cfg.hutchinson_probes, cfg.seed, progress)
    trace_s, start = time.perf_counter() - start, time.perf_counter()
    eig, iters, converged = None, 0, False
    if cfg.power_iters > 0:
        eig, iters, converged = hs.power_iteration(
            hvp, hvp.weights, cfg.power_iters, cfg.power_tol, cfg.seed, progress, hvp.device)
    return samples, trace_s, eig, iters, converged, time.perf_counter() - start


def head_spans(shape: torch.Size, vocab: int) -> list[slice]:
    """Spans of positions whose logits (rows x span x vocab) stay within HEAD_CHUNK_FLOATS."""
    rows, length = shape
    step = max(1, HEAD_CHUNK_FLOATS // (rows * vocab))
    return [slice(s, min(s + step, length)) for s in range(0, length, step)]


def names_in_blocks(holder: nn.ModuleList, targets: dict[str, nn.Linear]) -> list[dict[str, int]]:
    """Per decoder block: its target weights' names inside the block -> their target index.
    A target outside the blocks (an output layer) cannot stream: a clear error, before work."""
    where = {id(m): (i, rel) for i, block in enumerate(holder) for rel, m in block.named_modules()}
    names: list[dict[str, int]] = [{} for _ in holder]
    for j, (name, m) in enumerate(targets.items()):
        if id(m) not in where:
            raise ValueError(f"streamed landscape: target {name!r} is outside the decoder "
                             f"blocks; only block linears stream (use model.placement=one)")
        i, rel = where[id(m)]
        names[i][f"{rel}.weight"] = j
    return names


def check_streamable(model: nn.Module, targets: dict[str, nn.Linear], hvp: str) -> None:
    """Refuse, before any work, what the streamed Hessian cannot do."""
    from ptqscale.models.anatomy import decoder_blocks

    if hvp != "autograd":
        raise ConfigError(f"landscape.hvp={hvp!r} does not stream; a streamed model "
                          f"(model.placement=streamed) takes landscape.hvp=autograd")
    names_in_blocks(decoder_blocks(model)[1], targets)


def _block_jvp(block: nn.Module, w: list[torch.Tensor], x, dx, args, kwargs, v):
    """``(y, dy, as_tuple)``: the block's output and its derivative along ``(dx, v)``, where
    ``v`` perturbs the parameters ``w`` (``dx=None``: the input is not perturbed).

    The JVP as the derivative of a VJP w.r.t. its cotangent ``u`` (``J^T u`` is linear in
    ``u``, so ``d/du [(J^T u) . t] = J t``): two backwards of one block's graph, freed on
    return. Forward mode (``torch.func.jvp``) would be cheaper, but custom autograd
    Functions without a forward derivative (Bloom's GeLU) refuse it; this needs only the
    double backward that the HVP needs anyway.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(dx is not None)
        out = block(x, *args, **kwargs)
        as_tuple = isinstance(out, tuple | list)
        y = out[0] if as_tuple else out
        u = torch.zeros_like(y, requires_grad=True)
        wrt, t = ([x, *w], [dx, *v]) if dx is not None else (w, v)
        grads = list(torch.autograd.grad(y, wrt, u, create_graph=True, allow_unused=True))
        s = sum((g * d).sum() for g, d in zip(grads, t) if g is not None)
        del grads  # block-sized; the graph of s does not need them
        (dy,) = torch.autograd.grad(s, u)
    return y.detach(), dy, as_tuple
