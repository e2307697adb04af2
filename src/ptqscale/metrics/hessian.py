"""Second-order probes of a loss w.r.t. a list of weight tensors (protocol v1).

Paper-shaped cores, free of any model plumbing:

- Hessian-vector products ``v -> H v``: exact by double backward (Pearlmutter's trick,
  ``autograd_hvp``) or by a central difference of gradients (``finite_difference_hvp``),
  the documented fallback for kernels without double backward.
- Hutchinson's estimator ``tr(H) = E[v^T H v]`` with Rademacher probes
  (Hutchinson 1990; Yao et al. 2020, PyHessian), kept per weight block so that
  ``tr(H_l) = E[v_l^T (H v)_l]`` comes out of the same probes.
- Power iteration with the Rayleigh quotient for the eigenvalue of largest magnitude.
- ``double_backward_ready``: the context every HVP runs in (fp32, eager attention,
  eval mode, gradients only for the probed weights), restored on exit.

Each HVP is over one micro-batch; the loss of several micro-batches is their token-weighted
mean, so callers sum ``fraction_b * H_b v`` (``hutchinson_samples`` and ``summed_hvp`` take
the per-micro-batch HVP factories for that reason). Only one micro-batch's graph is alive at
a time, so peak memory follows the micro-batch, not the token budget.

Example::

    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> hvp = autograd_hvp(lambda: (w ** 3).sum(), [w])
    >>> hvp([torch.tensor([1.0, 0.0])])[0]          # diag(6 w) @ e_0
    tensor([6., 0.])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn

from ptqscale import console
from ptqscale.precision import true_float32

Vector = list[torch.Tensor]  # one tensor per probed weight, same shapes
HVP = Callable[[Vector], Vector]
LossFn = Callable[[], torch.Tensor]


def autograd_hvp(loss_fn: LossFn, weights: Sequence[torch.Tensor], *, retain_graph: bool = True
                 ) -> HVP:
    """``v -> H v`` of ``loss_fn()`` w.r.t. ``weights`` by double backward.

    ``retain_graph=True``: the gradient graph is built once here and kept, so many probes
    against the same batch cost one forward/backward plus one double backward each.
    ``retain_graph=False``: every call builds the graph, runs the double backward and lets it
    free the graph's buffers as it goes. Same numbers, about 2/3 of the peak memory (the
    retained graph cannot be freed during the double backward), one more forward/backward
    per call.
    """
    if not retain_graph:
        return partial(_one_pass_hvp, loss_fn, list(weights))
    grads = torch.autograd.grad(loss_fn(), list(weights), create_graph=True)

    def hvp(v: Vector) -> Vector:
        hv = torch.autograd.grad(
            grads, list(weights), grad_outputs=v, retain_graph=True, allow_unused=True
        )
        return _zeros_for_unused(weights, hv)

    return hvp


def _one_pass_hvp(loss_fn: LossFn, weights: list[torch.Tensor], v: Vector) -> Vector:
    grads = torch.autograd.grad(loss_fn(), weights, create_graph=True)
    return _zeros_for_unused(weights, torch.autograd.grad(grads, weights, v, allow_unused=True))


def _zeros_for_unused(weights: Sequence[torch.Tensor], hv) -> Vector:
    # a block the gradient does not depend on (loss linear in it) has H v = 0 there
    return [torch.zeros_like(w) if h is None else h.detach() for w, h in zip(weights, hv)]


def finite_difference_hvp(
    loss_fn: LossFn, weights: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], eps: float,
    *, one_sided: bool = False,
) -> HVP:
    """``v -> (g(W + h v) - g(W - h v)) / 2h``, the central-difference HVP.

    The step ``h = eps * ||W|| / ||v||`` makes the perturbation a fixed fraction ``eps`` of
    the weights' global norm, so one ``eps`` suits every model size. ``reference`` holds the
    unperturbed weights; they are copied back exactly after each gradient. Gradients run in
    full float32 whatever the caller set (:func:`ptqscale.precision.true_float32`).

    ``one_sided=True``: ``(g(W + h v) - g(W)) / h``, with ``g(W)`` computed once here and
    shared by every product, so a product costs one gradient instead of two. Its error is
    ``(h / 2) T[v, v]`` (``T`` the third derivative), first order in ``h``; but ``v^T T[v, v]``
    is odd in ``v``, so over Rademacher probes it averages to zero and a Hutchinson trace stays
    unbiased to second order. Not for the eigenvalue, whose iteration does not average it out.
    """
    w_norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in reference))

    def grad_at(v: Vector | None, h: float) -> Vector:
        with torch.no_grad():
            for i, (w, r) in enumerate(zip(weights, reference)):
                w.copy_(r)
                if v is not None:
                    w.add_(v[i], alpha=h)
        try:  # TF32 products would swamp the difference (ptqscale.precision says how much)
            with true_float32():
                return list(torch.autograd.grad(loss_fn(), list(weights)))
        finally:
            with torch.no_grad():
                for w, r in zip(weights, reference):
                    w.copy_(r)

    base = grad_at(None, 0.0) if one_sided else None

    def hvp(v: Vector) -> Vector:
        v_norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in v))
        h = eps * w_norm / v_norm
        if base is not None:
            return [g.sub_(b).div_(h) for g, b in zip(grad_at(v, h), base)]
        g_plus, g_minus = grad_at(v, h), grad_at(v, -h)
        return [a.sub_(b).div_(2 * h) for a, b in zip(g_plus, g_minus)]

    return hvp


def rademacher(weights: Sequence[torch.Tensor], seed: int,
               indices: Sequence[int] | None = None) -> Vector:
    """A probe of +-1 entries shaped like ``weights``; the same seed gives the same probe.

    Each block draws from its own generator on its own device (seeded by ``seed`` and the
    block index), so a probe can be regenerated for every batch instead of being stored.
    ``indices`` gives the blocks' positions in the full weight list when ``weights`` is a
    part of it (a streamed model draws the probe of one decoder block at a time).
    """
    probe = []
    for i, w in zip(_indices(weights, indices), weights, strict=True):
        gen = torch.Generator(device=w.device).manual_seed(_block_seed(seed, i))
        bits = torch.randint(0, 2, w.shape, generator=gen, device=w.device, dtype=torch.int8)
        probe.append(bits.to(_vector_dtype(w)).mul_(2).sub_(1))
    return probe


def gaussian(weights: Sequence[torch.Tensor], seed: int,
             device: torch.device | None = None) -> Vector:
    """Standard-normal noise shaped like ``weights`` (per-block generators, as ``rademacher``).

    ``device``: draw there (one block at a time) and move each block to its weight's device;
    a streamed model draws on its execution device, so it gets the numbers a model in one
    piece there would get. Default: each weight's own device.
    """
    return [gaussian_block(w, seed, i, device) for i, w in enumerate(weights)]


def gaussian_block(w: torch.Tensor, seed: int, index: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """Block ``index`` of :func:`gaussian` (``w``: that weight), drawn alone: a streamed model
    draws each weight's noise on the device right after its decoder block is onloaded."""
    at = w.device if device is None else torch.device(device)
    gen = torch.Generator(device=at).manual_seed(_block_seed(seed, index))
    z = torch.randn(w.shape, generator=gen, device=at, dtype=torch.float32)
    return z.to(_vector_dtype(w)).to(w.device)


def _indices(weights: Sequence[torch.Tensor], indices: Sequence[int] | None) -> Sequence[int]:
    return range(len(weights)) if indices is None else indices


def _vector_dtype(w: torch.Tensor) -> torch.dtype:
    # fp32 draws (the same values for every model), held in fp64 for an fp64 model
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _block_seed(seed: int, block: int) -> int:
    # distinct, reproducible streams per (seed, block); 2**61 - 1 is prime, within int64
    return (seed * 1_000_003 + block) % (2**61 - 1)


def blockwise_dot(a: Vector, b: Vector) -> torch.Tensor:
    """``[a_l . b_l for each block l]`` as one float64 tensor on the CPU."""
    return torch.stack([(x.double() * y.double()).sum().cpu() for x, y in zip(a, b)])


def hutchinson_samples(
    batch_hvps: Sequence[tuple[float, Callable[[], HVP]]],
    weights: Sequence[torch.Tensor],
    probes: int,
    seed: int,
    progress: bool = False,
) -> torch.Tensor:
    """Per-probe, per-block samples ``v_l^T (H v)_l`` of the full loss, shape ``[probes, L]``.

    ``batch_hvps`` lists ``(fraction, make_hvp)`` per batch (fractions sum to 1): the full
    Hessian is ``sum_b fraction_b H_b``. Probe k is regenerated for every batch from
    ``seed + k``, so each batch's gradient graph is built once and serves all probes.
    The column means estimate ``tr(H_l)``; a row sum is one sample of ``tr(H)``.
    """
    samples = torch.zeros(probes, len(weights), dtype=torch.float64)
    with console.bar(len(batch_hvps) * probes, "hessian trace", progress, unit="hvp") as bar:
        for fraction, make_hvp in batch_hvps:
            hvp = make_hvp()
            for k in range(probes):
                v = rademacher(weights, seed + k)
                samples[k] += fraction * blockwise_dot(v, hvp(v))
                bar.update()
            del hvp  # frees this batch's retained graph before the next one is built
    return samples


def summed_hvp(batch_hvps: Sequence[tuple[float, Callable[[], HVP]]], weights) -> HVP:
    """The HVP of the full loss, ``sum_b fraction_b H_b v`` (each batch's graph rebuilt per call).

    Pass single-use factories (``autograd_hvp(..., retain_graph=False)``): each graph serves
    one product here, and a retained one would only raise the peak.
    """

    def hvp(v: Vector) -> Vector:
        total: Vector | None = None
        for fraction, make_hvp in batch_hvps:
            hv = make_hvp()(v)
            if total is None:  # the first product becomes the accumulator: one vector less
                total = [h.mul_(fraction) for h in hv]
            else:
                for acc, h in zip(total, hv):
                    acc.add_(h, alpha=fraction)
            del hv
        return total

    return hvp


def trace_stats(samples: torch.Tensor, scale: torch.Tensor) -> dict:
    """Means and standard errors over probes of ``tr(H)`` and ``kappa_h``.

    ``samples[k, l]`` is probe k's ``v_l^T (H v)_l``; ``scale[l] = ||W_l||^2 / numel_l``, so
    ``kappa_h = 0.5 sum_l scale_l tr(H_l)``.
    """
    trace = samples.sum(dim=1)
    kappa_h = 0.5 * (samples * scale).sum(dim=1)
    n = samples.shape[0]

    def sem(x: torch.Tensor) -> float:
        return float(x.std() / math.sqrt(n)) if n > 1 else 0.0

    return {
        "hessian_trace": float(trace.mean()),
        "hessian_trace_sem": sem(trace),
        "kappa_h": float(kappa_h.mean()),
        "kappa_h_sem": sem(kappa_h),
    }


def power_iteration(
    full_hvp: HVP, weights: Sequence[torch.Tensor], iters: int, tol: float, seed: int,
    progress: bool = False, draw_device: torch.device | None = None,
) -> tuple[float, int, bool]:
    """Eigenvalue of largest magnitude of H: ``(eigenvalue, iterations run, converged)``.

    Starts from seeded Gaussian noise; the estimate is the Rayleigh quotient ``v^T H v``
    of the unit iterate, which for symmetric H converges at twice the rate of the iterate.
    Stops early when it changes by less than ``tol`` relative (``tol=0`` runs all ``iters``).
    ``draw_device``: where the start vector is drawn (``gaussian``'s ``device``).
    """
    v = _normalize(gaussian(weights, seed, draw_device))
    if iters < 1:
        raise ValueError(f"power iteration needs iters >= 1, got {iters}")
    eig, converged = float("nan"), False
    for it in console.progress(range(1, iters + 1), "top eigenvalue", progress, unit="hvp"):
        hv = full_hvp(v)
        new = float(blockwise_dot(v, hv).sum())
        converged = it > 1 and abs(new - eig) <= tol * abs(new)
        eig = new
        if converged:
            break
        v = _normalize(hv)
    return eig, it, converged


def _normalize(v: Vector) -> Vector:
    # in place (the same numbers as x / norm): v is a fresh draw or product the iteration owns,
    # and a third model-sized vector would not fit beside v and H v for a streamed 8B model
    norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in v))
    if norm == 0.0:
        raise FloatingPointError("power iteration hit H v = 0 (the Hessian vanishes on this vector)")
    for x in v:
        x.div_(norm)
    return v


@contextmanager
def restored_exactly(targets: dict[str, nn.Linear]) -> Iterator[list[torch.Tensor]]:
    """Yield a copy of the targets' weights; copy it back on exit and assert bit-exactness."""
    weights = [m.weight for m in targets.values()]
    reference = [w.detach().clone() for w in weights]
    try:
        yield reference
    finally:
        with torch.no_grad():
            for w, r in zip(weights, reference):
                w.copy_(r)
        for (name, m), r in zip(targets.items(), reference):
            if not torch.equal(m.weight, r):
                raise RuntimeError(f"weight of {name!r} was not restored exactly")


@contextmanager
def double_backward_ready(model: nn.Module, weights: Sequence[torch.Tensor], *, eager: bool = True
                          ) -> Iterator[None]:
    """Run ``model`` so that HVPs w.r.t. ``weights`` are exact fp32 double backwards.

    Inside: every floating parameter and buffer in fp32 (bf16/fp16 -> fp32 is exact, and so
    is the way back), attention switched to ``"eager"`` (flash/SDPA kernels have no double
    backward), eval mode (no dropout), and ``requires_grad`` only on ``weights``. All of it
    is restored on exit, also after an error. ``eager=False`` keeps the model's own attention:
    for HVPs made of first-order gradients (finite differences), which every kernel supports,
    and the fused ones without the eager attention maps of every layer.
    """
    attention = eager_attention(model) if eager else nullcontext()
    with fp32(model), attention, eval_mode(model), _grad_only(model, weights):
        yield


@contextmanager
def fp32(model: nn.Module) -> Iterator[None]:
    """Upcast floating parameters and buffers to fp32, and back to their own dtypes on exit.

    fp64 stays fp64: casting it down and back would change the weights.
    """
    tensors = [t for t in [*model.parameters(), *model.buffers()]
               if t.is_floating_point() and t.dtype != torch.float64]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(torch.float32)  # .data keeps the Parameter objects the caller holds
    try:
        yield
    finally:
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a transformers model to eager attention (no-op for models without a config)."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is None or old in (None, "eager"):
        yield
        return
    _set_attn(model, "eager")
    try:
        yield
    finally:
        _set_attn(model, old)


def _set_attn(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.56 dispatches to submodels
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch {type(model).__name__} to {name!r} attention")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _grad_only(model: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[None]:
    # Gradients of the other parameters would only cost memory in the double backward.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
