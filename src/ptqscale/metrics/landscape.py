"""Loss-landscape features around the trained weights (DESIGN "Measured quantities", protocol v1).

The loss everywhere is the mean next-token NLL (nats) of the model over fixed token windows
``batches[n, seqlen]``, with fp32 logits and float64 accumulation. Every feature is measured
with the model temporarily in fp32 (bf16 -> fp32 -> bf16 is exact), so the noise response and
the Hessian see the same function; the quantizable weights are restored bit-exactly after
every perturbation, and that is asserted. A streamed model (``model.placement=streamed``) is
perturbed block by block on the execution device as each block is onloaded (the noise drawn
there, the same numbers and the same expression ``W + a z`` as in one piece); its weights on the
CPU are never written, so no host copy of them is kept.

- Noise response: Gaussian noise of per-layer variance ``||W_l||^2 / (numel_l 10^(s/10))``
  at each SQNR level ``s``; ``dNLL(s) = NLL(noisy) - NLL(clean)``, mean over seeds. Seed k
  draws one noise direction used at every level (common random numbers: the curve is
  smooth in ``s``), and with ``antithetic`` both ``+noise`` and ``-noise`` are scored, which
  cancels the first-order term ``g . noise`` exactly instead of only on average.
- ``kappa``: ``dNLL ~= kappa * 10^(-s/10)`` fitted as ``sum dNLL / sum 10^(-s/10)`` over the
  levels whose mean dNLL is at most ``kappa_max_dnll`` (the small-noise regime).
- ``s_star_db``: the SQNR at which dNLL first reaches ``threshold`` going from high to low
  SQNR, interpolated between the two bracketing levels in ``(s, log dNLL)``.
- Second order (``measure_hessian``): Hutchinson trace, per-layer traces, top eigenvalue,
  and ``kappa_h = 0.5 sum_l (||W_l||^2/numel_l) tr(H_l)``, the same small-noise coefficient
  as ``kappa`` (``E[eps^T H eps] = sum_l sigma_l^2 tr(H_l)``): their ratio is a built-in check.
- Directional profile: dNLL at ``W + t (Q(W) - W)`` for a job's quantizer ``Q``.

Example::

    >>> cfg = LandscapeConfig(enabled=True, max_tokens=4096)
    >>> feats = measure_landscape(model, anat.targets, windows, cfg)   # doctest: +SKIP
    >>> feats["kappa"], feats["kappa_h"], feats["s_star_db"]           # doctest: +SKIP
    >>> noise_equivalent_dnll(feats["kappa"], sqnr_db=24.1)            # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ptqscale import console
from ptqscale.errors import ConfigError

from . import hessian as hs
from .hessian_streamed import check_streamable, names_in_blocks, streamed_hessian

LANDSCAPE_PROTOCOL = 1
HVP_METHODS = ("autograd", "finite_difference")


@dataclass
class LandscapeConfig:
    """Budgets and definitions of the model-level landscape features (Hydra structured config)."""

    enabled: bool = False
    levels_db: list[float] = field(
        default_factory=lambda: [50.0, 40.0, 35.0, 30.0, 25.0, 20.0, 15.0, 10.0]
    )
    seeds: int = 3  # noise draws per level (pairs when antithetic)
    seed: int = 0  # base seed: draw k uses seed + k; Hutchinson probe k uses seed + k too
    antithetic: bool = True  # score +noise and -noise (2 passes per draw)
    max_tokens: int = 16384  # budget: the first max_tokens // seqlen windows are used
    seqlen: int | None = None  # None -> the eval seqlen; when set, windows must have it
    batch_size: int = 1  # windows per no-grad forward (memory, not results)
    # Memory of the second-order features (not results): windows per HVP micro-batch, and
    # whether a micro-batch's gradient graph is kept across Hutchinson probes (faster) or
    # rebuilt per product (about 2/3 of the peak). Peak memory scales with hvp_windows.
    hvp_windows: int = 1
    hvp_retain_graph: bool = True
    threshold: float = 0.1  # dNLL (nats) that defines the basin edge s*
    kappa_max_dnll: float = 0.005  # levels with mean dNLL <= this (nats) are used for kappa
    hessian: bool = True  # also measure trace, kappa_h and top eigenvalue
    hutchinson_probes: int = 64
    power_iters: int = 30  # 0 skips the top eigenvalue
    power_tol: float = 1e-4  # relative change of the Rayleigh quotient that stops early
    hvp: str = "autograd"  # "autograd" (double backward) | "finite_difference"
    fd_eps: float = 1e-4  # finite-difference step as a fraction of the weights' global norm
    directional_ts: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])

    # Memory knobs: the same features (up to float summation order) for any value, so a
    # cached result is shared across them; the features record the values they ran with.
    not_in_key: ClassVar[tuple[str, ...]] = ("hvp_windows", "hvp_retain_graph")

    def __post_init__(self) -> None:
        levels = [float(s) for s in self.levels_db]
        if not levels or not all(math.isfinite(s) for s in levels):
            raise ConfigError(f"landscape.levels_db must be finite dB values, got {self.levels_db}")
        if len(set(levels)) != len(levels):
            raise ConfigError(f"landscape.levels_db has duplicates: {self.levels_db}")
        for key in ("seeds", "max_tokens", "batch_size", "hutchinson_probes"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"landscape.{key} must be >= 1, got {getattr(self, key)}")
        if isinstance(self.hvp_windows, bool) or not isinstance(self.hvp_windows, int) \
                or self.hvp_windows < 1:
            raise ConfigError(f"landscape.hvp_windows (windows per HVP micro-batch) must be an "
                              f"integer >= 1, got {self.hvp_windows!r}")
        if not isinstance(self.hvp_retain_graph, bool):
            raise ConfigError(f"landscape.hvp_retain_graph must be true or false, "
                              f"got {self.hvp_retain_graph!r}")
        if self.power_iters < 0:
            raise ConfigError(f"landscape.power_iters must be >= 0, got {self.power_iters}")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"landscape.seqlen must be None or >= 2, got {self.seqlen}")
        for key in ("threshold", "kappa_max_dnll", "fd_eps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"landscape.{key} must be > 0, got {getattr(self, key)}")
        if not self.power_tol >= 0:
            raise ConfigError(f"landscape.power_tol must be >= 0, got {self.power_tol}")
        if self.hvp not in HVP_METHODS:
            raise ConfigError(f"landscape.hvp must be one of {HVP_METHODS}, got {self.hvp!r}")
        _check_ts(self.directional_ts)


def _check_ts(ts: Sequence[float]) -> None:
    if not ts or not all(0 < float(t) <= 1 for t in ts):
        raise ConfigError(f"directional ts must be a non-empty list in (0, 1], got {list(ts)}")


# ---------------------------------------------------------------- loss and inputs


def nll_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) of ``input_ids[b, t]``, differentiable, fp32 (or fp64) logits."""
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    input_ids = input_ids.to(next(model.parameters()).device)  # token windows may live on the CPU
    out = model(input_ids, **kwargs)
    return nll_from_logits(getattr(out, "logits", out), input_ids)


def nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``input_ids[b, t]`` given the model's ``logits[b, t, v]``."""
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # fp32 at least
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def mean_nll(model: nn.Module, batches: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token NLL over all windows; windows have equal length, so batches weigh by rows.

    A streamed model (``model.placement=streamed``) is walked block by block, all batches
    through one block, then the next; the per-batch losses are the same arithmetic.
    """
    from ptqscale.models.streaming import placement_of, walk_logits

    chunks = list(batches.split(batch_size))
    placement = placement_of(model)
    if placement.streamed:
        losses = (nll_from_logits(logits, chunks[b].to(logits.device))
                  for b, logits in walk_logits(model, chunks, placement))
    else:
        losses = (nll_loss(model, ids) for ids in chunks)
    total = 0.0
    for ids, loss in zip(chunks, losses, strict=True):
        total += float(loss.double()) * ids.shape[0]
    return total / batches.shape[0]


def select_windows(batches: torch.Tensor, cfg: LandscapeConfig) -> torch.Tensor:
    """The first ``max_tokens // seqlen`` windows (all of them when fewer are given)."""
    if batches.ndim != 2 or batches.dtype != torch.long or batches.shape[1] < 2:
        raise ValueError(
            f"batches must be a LongTensor [n, seqlen>=2], got {batches.dtype} {tuple(batches.shape)}"
        )
    seqlen = batches.shape[1]
    if cfg.seqlen is not None and seqlen != cfg.seqlen:
        raise ValueError(f"windows have seqlen {seqlen} but landscape.seqlen is {cfg.seqlen}")
    if cfg.max_tokens < seqlen:
        raise ValueError(f"landscape.max_tokens={cfg.max_tokens} is less than one window ({seqlen})")
    return batches[: cfg.max_tokens // seqlen]


def _check_targets(model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor) -> None:
    if not targets:
        raise ValueError("targets is empty: there are no quantizable weights to probe")
    seen: dict[int, str] = {}
    for name, mod in targets.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"target {name!r} is a {type(mod).__name__}, not an nn.Linear")
        ptr = mod.weight.data_ptr()
        if ptr in seen:  # a tied weight would get its noise twice
            raise ValueError(f"targets {seen[ptr]!r} and {name!r} share one weight tensor")
        seen[ptr] = name
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and int(batches.max()) >= emb.num_embeddings:
        raise ValueError(f"token id {int(batches.max())} >= vocab size {emb.num_embeddings}")
    if _streamed(model):  # only block linears are perturbed block by block
        from ptqscale.models.anatomy import decoder_blocks

        names_in_blocks(decoder_blocks(model)[1], targets)


@contextmanager
def _measuring(model: nn.Module, targets: dict[str, nn.Linear], copy: bool = True
               ) -> Iterator[list[torch.Tensor] | None]:
    """fp32 and eval mode (deterministic forwards), and a reference copy of the targets restored
    and checked on exit; with ``copy`` False (a streamed forward-only feature, which never
    writes the weights) no copy: None."""
    if not copy:
        with hs.fp32(model), hs.eval_mode(model):
            yield None
        return
    # fp32 first so that the reference copy is the fp32 view
    with hs.fp32(model), hs.eval_mode(model), hs.restored_exactly(targets) as reference:
        yield reference


def _streamed(model: nn.Module) -> bool:
    from ptqscale.models.streaming import placement_of

    return placement_of(model).streamed


def _shifted_nlls(model: nn.Module, windows: torch.Tensor, batch_size: int,
                  targets: dict[str, nn.Linear], reference: list[torch.Tensor] | None,
                  shifts: list[Callable[[int, torch.Tensor], torch.Tensor]]) -> list[float]:
    """Mean NLL per shift: each target weight ``j`` at ``shift(j, W_j)``, ``W_j`` its clean
    values (a shift that returns ``W_j`` itself: the clean model).

    In one piece the weights are overwritten, one shift after the other (``reference`` holds
    the clean ones). Streamed (``reference`` None), one walk serves every shift: each block is
    onloaded once, and per shift its targets are shifted there and stand in for the weights
    (nothing is written back); each shift's NLL is the arithmetic of ``mean_nll``.
    """
    if reference is not None:
        out = []
        for shift in shifts:
            with torch.no_grad():
                for j, (m, r) in enumerate(zip(targets.values(), reference)):
                    shifted = shift(j, r)
                    if shifted is not r:  # a clean pass leaves the weights as they are
                        m.weight.copy_(shifted)
            out.append(mean_nll(model, windows, batch_size))
        return out
    from ptqscale.models.anatomy import decoder_blocks
    from ptqscale.models.streaming import walk_variants

    names = names_in_blocks(decoder_blocks(model)[1], targets)  # per block: name -> j

    def transform(shift, b: int, block: nn.Module):
        return [(p, shift(j, p.data)) for rel, j in names[b].items()
                for p in [block.get_parameter(rel)]]

    chunks = list(windows.split(batch_size))
    totals = [0.0] * len(shifts)
    for v, b, logits in walk_variants(model, chunks, [partial(transform, s) for s in shifts]):
        loss = nll_from_logits(logits, chunks[b].to(logits.device))
        totals[v] += float(loss.double()) * chunks[b].shape[0]  # as mean_nll, in batch order
    return [t / windows.shape[0] for t in totals]


def _sq(w: torch.Tensor) -> float:
    return float(w.double().pow(2).sum())


def _key(value: float) -> str:
    return f"{value:g}".replace(".", "p").replace("-", "m")


# ---------------------------------------------------------------- noise response


def noise_equivalent_dnll(kappa: float, sqnr_db: float) -> float:
    """Predicted dNLL of a perturbation with weight SQNR ``sqnr_db``: ``kappa * 10^(-s/10)``.

    >>> noise_equivalent_dnll(2.0, 20.0)
    0.02
    """
    if not (math.isfinite(kappa) and math.isfinite(sqnr_db)):
        raise ValueError(f"kappa and sqnr_db must be finite, got {kappa}, {sqnr_db}")
    return kappa * 10 ** (-sqnr_db / 10)


def measure_noise_response(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """dNLL per SQNR level (mean and standard error over seeds), ``kappa`` and ``s_star_db``.

    A streamed model draws each weight's noise on the execution device once its block is
    there (the per-weight generators of ``hs.gaussian``), so it gets the directions a model
    in one piece there gets, and perturbs it there.
    """
    windows = select_windows(batches, cfg)
    _check_targets(model, targets, windows)
    levels = sorted((float(s) for s in cfg.levels_db), reverse=True)
    signs = (1.0, -1.0) if cfg.antithetic else (1.0,)
    start = time.perf_counter()
    with _measuring(model, targets, copy=not _streamed(model)) as reference:
        power = [0.0] * len(targets)  # ||W_l||^2 / numel_l: the variance at 0 dB
        dnll = torch.zeros(len(levels), cfg.seeds, dtype=torch.float64)
        clean = None
        for k in console.progress(range(cfg.seeds), "noise response", progress, unit="seed"):
            # one for every level; streamed: drawn per block on the device, in every pass
            noise = hs.gaussian(reference, cfg.seed + k) if reference is not None else None
            shifts = [partial(_noisy, noise, cfg.seed + k, power, s, sign)
                      for s in levels for sign in signs]
            if clean is None:  # first: ||W||^2 per target, read before any level needs it
                shifts.insert(0, partial(_power_of, power))
            scores = _shifted_nlls(model, windows, cfg.batch_size, targets, reference, shifts)
            if clean is None:
                clean = scores.pop(0)
            for i in range(len(levels)):  # one walk per seed when streamed
                pair = scores[i * len(signs):(i + 1) * len(signs)]
                dnll[i, k] = sum(pair) / len(pair) - clean
    out = {"nll_clean": clean, "landscape_tokens": windows.numel()}
    out.update(summarize_noise_response(levels, dnll, cfg))
    out["cost_noise_response_s"] = time.perf_counter() - start
    out["cost_noise_response_tokens"] = windows.numel() * (1 + len(levels) * cfg.seeds * len(signs))
    return out


def _power_of(power: list[float], j: int, w: torch.Tensor) -> torch.Tensor:
    power[j] = _sq(w) / w.numel()  # where the weight is: on the device when streamed
    return w


def _noisy(noise: list[torch.Tensor] | None, seed: int, power: list[float], level: float,
           sign: float, j: int, w: torch.Tensor) -> torch.Tensor:
    """``W_j + sign sigma_j z_j`` at SQNR ``level``, one expression for both placements (the
    same bits); ``z_j`` from ``noise``, or drawn where ``w`` is (streamed: on the device)."""
    z = noise[j] if noise is not None else hs.gaussian_block(w, seed, j)
    sigma = math.sqrt(power[j] / 10 ** (level / 10))
    return torch.add(w, z, alpha=sign * sigma)


def summarize_noise_response(
    levels: Sequence[float], dnll: torch.Tensor, cfg: LandscapeConfig
) -> dict:
    """Flat features from ``dnll[level, seed]`` (levels sorted from high to low SQNR)."""
    mean = dnll.mean(dim=1)
    sem = dnll.std(dim=1) / math.sqrt(dnll.shape[1]) if dnll.shape[1] > 1 else 0 * mean
    out: dict = {}
    for s, m, e in zip(levels, mean.tolist(), sem.tolist()):
        out[f"dnll_at_{_key(s)}db"] = m
        out[f"dnll_sem_at_{_key(s)}db"] = e
    out.update(fit_kappa(levels, mean.tolist(), cfg.kappa_max_dnll))
    out.update(basin_edge(levels, mean.tolist(), cfg.threshold))
    return out


def fit_kappa(levels: Sequence[float], dnll: Sequence[float], max_dnll: float) -> dict:
    """``kappa = sum dNLL_i / sum 10^(-s_i/10)`` over levels with ``dNLL_i <= max_dnll``.

    The ratio of sums is least squares through the origin weighted by 1/x, which suits a
    noise whose variance grows with the noise power x = 10^(-s/10). When no level is in the
    small-noise regime, the highest-SQNR level alone is used and ``kappa_linear`` is False.

    >>> round(fit_kappa([40.0, 30.0, 20.0], [0.0002, 0.002, 0.5], max_dnll=0.01)["kappa"], 6)
    2.0
    """
    pairs = [(s, d) for s, d in zip(levels, dnll) if d <= max_dnll]
    linear = bool(pairs)
    if not linear:
        pairs = [max(zip(levels, dnll))]
    kappa = sum(d for _, d in pairs) / sum(10 ** (-s / 10) for s, _ in pairs)
    return {
        "kappa": kappa,
        "kappa_linear": linear,
        "kappa_n_levels": len(pairs),
        "kappa_min_db": min(s for s, _ in pairs),
    }


def basin_edge(levels: Sequence[float], dnll: Sequence[float], threshold: float) -> dict:
    """``s_star_db``: where dNLL first reaches ``threshold`` going down in SQNR.

    Interpolated in ``(s, log dNLL)`` (linear in the small-noise regime) between the
    bracketing levels, linearly when the upper one is not positive. None when the highest
    level is already past the threshold or no level reaches it (``s_star_bracketed`` False).

    >>> basin_edge([30.0, 20.0], [0.01, 1.0], threshold=0.1)["s_star_db"]
    25.0
    """
    pairs = sorted(zip(levels, dnll), reverse=True)
    for i, (s, d) in enumerate(pairs):
        if d < threshold:
            continue
        if i == 0:
            break
        s0, d0 = pairs[i - 1]
        if d0 > 0:
            frac = math.log(threshold / d0) / math.log(d / d0)
        else:
            frac = (threshold - d0) / (d - d0)
        return {"s_star_db": s0 + frac * (s - s0), "s_star_bracketed": True}
    return {"s_star_db": None, "s_star_bracketed": False}


# ---------------------------------------------------------------- second order


def measure_hessian(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """Hutchinson trace (total, per layer), ``kappa_h`` and the top eigenvalue, in fp32.

    Every HVP is a sum over micro-batches of ``cfg.hvp_windows`` windows, each weighted by
    its share of the budget's windows (equal-length windows: the Hessian of the mean NLL over
    all tokens, exactly); only one micro-batch's graph is alive at a time.
    Per-layer entries are under ``"layers"`` (name -> trace and ``||W||^2/numel``); every
    other key is a scalar. Standard errors come from the spread over probes.
    """
    from ptqscale.models.streaming import placement_of

    windows = select_windows(batches, cfg)
    _check_targets(model, targets, windows)
    if placement_of(model).streamed:
        check_streamable(model, targets, cfg.hvp)
    weights = [m.weight for m in targets.values()]
    with _measuring(model, targets) as reference, hs.double_backward_ready(model, weights):
        if placement_of(model).streamed:
            samples, trace_s, eig, iters, converged, eig_s = streamed_hessian(
                model, targets, windows, cfg, progress)
        else:
            start = time.perf_counter()
            samples = hs.hutchinson_samples(
                _batch_hvps(model, windows, weights, reference, cfg, cfg.hvp_retain_graph),
                weights, cfg.hutchinson_probes, cfg.seed, progress)
            trace_s = time.perf_counter() - start

            start = time.perf_counter()
            eig, iters, converged = None, 0, False
            if cfg.power_iters > 0:  # one product per graph: never worth retaining it
                full_hvp = hs.summed_hvp(
                    _batch_hvps(model, windows, weights, reference, cfg, False), weights)
                eig, iters, converged = hs.power_iteration(
                    full_hvp, weights, cfg.power_iters, cfg.power_tol, cfg.seed, progress
                )
            eig_s = time.perf_counter() - start
    scale = torch.tensor([_sq(r) / r.numel() for r in reference], dtype=torch.float64)
    out = {"hvp_method": cfg.hvp, "hutchinson_probes": cfg.hutchinson_probes,
           "hvp_windows": cfg.hvp_windows, "hvp_retain_graph": cfg.hvp_retain_graph}
    out.update(hs.trace_stats(samples, scale))
    out.update(top_eigenvalue=eig, power_iters_run=iters, power_converged=converged)
    n_tok, streamed = windows.numel(), placement_of(model).streamed
    out.update(
        cost_hessian_trace_s=trace_s,
        cost_hessian_trace_tokens=n_tok * _passes_per_trace(cfg, streamed),
        cost_hessian_trace_hvps=cfg.hutchinson_probes,
        cost_top_eigenvalue_s=eig_s,
        cost_top_eigenvalue_tokens=n_tok * (2 if cfg.hvp == "finite_difference" or streamed
                                            else 1) * iters,
        cost_top_eigenvalue_hvps=iters,
    )
    out["layers"] = {
        name: {"hessian_trace": float(t), "weight_sq_per_numel": float(c)}
        for name, t, c in zip(targets, samples.mean(dim=0), scale)
    }
    return out


def _passes_per_trace(cfg: LandscapeConfig, streamed: bool = False) -> int:
    """Forward passes over the budget for the trace: FD takes 2 gradients per probe; autograd
    builds each micro-batch's graph once for all probes, or once per probe when not retained;
    streamed, every probe is a forward sweep plus a recomputing backward sweep (2 passes)."""
    if cfg.hvp == "finite_difference" or streamed:
        return 2 * cfg.hutchinson_probes
    return 1 if cfg.hvp_retain_graph else cfg.hutchinson_probes


def _batch_hvps(model, windows, weights, reference, cfg, retain_graph: bool
                ) -> list[tuple[float, Callable]]:
    """``(fraction of windows, make_hvp)`` per micro-batch of ``cfg.hvp_windows`` windows."""
    out = []
    for ids in windows.split(cfg.hvp_windows):
        loss_fn = partial(nll_loss, model, ids)
        if cfg.hvp == "autograd":
            make = partial(hs.autograd_hvp, loss_fn, weights, retain_graph=retain_graph)
        else:
            make = partial(hs.finite_difference_hvp, loss_fn, weights, reference, cfg.fd_eps)
        # windows have equal length, so the share of windows is the share of tokens
        out.append((ids.shape[0] / windows.shape[0], make))
    return out


# ---------------------------------------------------------------- all model-level features


def measure_landscape(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """Every model-level feature at ``cfg``'s budget: noise response, and (``cfg.hessian``)
    the second-order features with ``kappa_ratio = kappa_h / kappa``.

    All keys are JSON scalars except ``"layers"`` (per-layer Hessian traces).
    """
    from ptqscale.models.streaming import placement_of

    if cfg.hessian and placement_of(model).streamed:  # before the noise response's work
        check_streamable(model, targets, cfg.hvp)
    out: dict = {"landscape_protocol": LANDSCAPE_PROTOCOL}
    out.update(measure_noise_response(model, targets, batches, cfg, progress))
    if cfg.hessian:
        out.update(measure_hessian(model, targets, batches, cfg, progress))
        out["kappa_ratio"] = out["kappa_h"] / out["kappa"] if out["kappa"] != 0 else None
    return out


# ---------------------------------------------------------------- directional profile


def measure_directional_profile(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    batches: torch.Tensor,
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
    ts: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    *,
    batch_size: int = 1,
) -> dict:
    """dNLL at ``W + t (Q(W) - W)`` for each ``t``, with ``Q = quantize_fn`` per target weight.

    Also the weight SQNR of ``Q`` and the least-squares fit ``dNLL(t) ~= a t + b t^2``
    (``directional_linear`` a = g . D, ``directional_quadratic`` b = D^T H D / 2).
    """
    _check_ts(ts)
    _check_targets(model, targets, batches)
    start = time.perf_counter()
    names = list(targets)
    sums: list[tuple[float, float]] = [(0.0, 0.0)] * len(names)  # per target: ||W||^2, ||D||^2
    with _measuring(model, targets, copy=not _streamed(model)) as reference:
        deltas = None  # streamed: D = Q(W) - W made per block on the device, for every pass
        if reference is not None:
            with torch.no_grad():
                deltas = [_delta(name, quantize_fn, r) for name, r in zip(names, reference)]
        shifts = [partial(_toward_q, deltas, quantize_fn, names, float(t), sums if n == 0 else None)
                  for n, t in enumerate(ts)]
        clean, *shifted = _shifted_nlls(model, batches, batch_size, targets, reference,
                                        [_unshifted, *shifts])  # streamed: one walk
        dnll = [nll - clean for nll in shifted]
    signal, err = sum(s for s, _ in sums), sum(e for _, e in sums)
    out = {f"directional_dnll_at_t{_key(float(t))}": d for t, d in zip(ts, dnll)}
    # None when Q(W) == W (no error: infinite SQNR, which JSON cannot hold)
    out["directional_sqnr_db"] = 10 * math.log10(signal / err) if err > 0 else None
    design = torch.tensor([[float(t), float(t) ** 2] for t in ts], dtype=torch.float64)
    coef = torch.linalg.lstsq(design, torch.tensor(dnll, dtype=torch.float64)[:, None]).solution
    out["directional_linear"], out["directional_quadratic"] = coef[:, 0].tolist()
    out["cost_directional_s"] = time.perf_counter() - start
    out["cost_directional_tokens"] = batches.numel() * (1 + len(ts))
    return out


def _unshifted(j: int, w: torch.Tensor) -> torch.Tensor:
    return w


def _toward_q(deltas, quantize_fn, names, t: float, sums: list | None, j: int,
              w: torch.Tensor) -> torch.Tensor:
    """``W_j + t D_j``, one expression for both placements; records ``||W_j||^2, ||D_j||^2``."""
    d = deltas[j] if deltas is not None else _delta(names[j], quantize_fn, w)
    if sums is not None:
        sums[j] = (_sq(w), _sq(d))
    return torch.add(w, d, alpha=t)


def _delta(name: str, quantize_fn, w: torch.Tensor) -> torch.Tensor:
    q = quantize_fn(w.clone())  # a clone: quantize_fn must not be able to touch the weights
    if not isinstance(q, torch.Tensor) or q.shape != w.shape:
        raise ValueError(f"quantize_fn({name}) must return a tensor of shape {tuple(w.shape)}")
    if not torch.isfinite(q).all():
        raise ValueError(f"quantize_fn({name}) returned non-finite values")
    return q.to(w.dtype) - w
