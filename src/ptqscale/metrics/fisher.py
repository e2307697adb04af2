"""Metric ``fisher``: how the quantization error meets the loss's sensitivity, against noise.

Field ``fisher_ratio``: the job's weight error ``e = Q(W) - W``, weighted by the model's
diagonal empirical Fisher ``F``, over the same weighting of isotropic noise with each target
layer's own error power::

    fisher_ratio = sum_i F_i e_i^2 / sum_l (||e_l||^2 / n_l) sum_(i in l) F_i

``F_i = sum_w (dL_w / dW_i)^2`` over the calibration windows ``w`` (``L_w`` a window's mean
NLL), on the full-precision model. 1 means the error's power is spread over the weights as
noise would be; below 1, it avoids the weights the loss is sensitive to. The landscape's
noise response perturbs every weight of a layer alike, so its noise-equivalent guess
``kappa * 10^(-SQNR/10)`` misses exactly this factor. In zoo_cross_x4 the zoo-neox family's
error meets 0.46-0.79 of the noise's curvature, and this ratio, 0.5-0.9, tracks that with
correlation 0.90 (results/zoo_cross_x4/findings.md). ``ptqscale-fit --lofo`` multiplies the
guess by the RTN row's ratio of each cell.

Cost: one forward and backward per calibration window, on the fp model (``prepare``), kept
for the worker's next job of the same model and calibration; the targets' fp weights are
held beside it to take the error after quantization. Null where nothing changed (bf16).
"""

from __future__ import annotations

import torch

from ptqscale.metrics.registry import MetricContext, register_metric

VERSION = 1
_MEMO: dict = {}   # (metric, fp_key, windows hash, targets) -> prepared value


def fisher_diagonal(model, weights: list[torch.Tensor], windows: torch.Tensor
                    ) -> list[torch.Tensor]:
    """``sum_w (dL_w / dW)^2`` per weight, one window at a time (float32, the weights' device).

    ``model`` must be ready for gradients w.r.t. ``weights`` only
    (``hessian.double_backward_ready(model, weights, eager=False)``)."""
    from ptqscale.metrics.landscape import nll_loss

    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    device = weights[0].device
    for k in range(windows.shape[0]):
        grads = torch.autograd.grad(nll_loss(model, windows[k : k + 1].to(device)), weights)
        for f, g in zip(fisher, grads):
            f.add_(g.detach().float().square())
    return fisher


def fisher_ratio(fisher: list[torch.Tensor], errors: list[torch.Tensor]) -> float | None:
    """The ratio above from per-layer ``F`` and ``e`` (None when the error is zero)."""
    weighted = iso = 0.0
    for f, e in zip(fisher, errors):
        e = e.double()
        weighted += float((f.double() * e.square()).sum())
        iso += float(e.square().sum() / e.numel() * f.double().sum())
    return weighted / iso if iso > 0 else None


def prepare_weight_statistic(ctx: MetricContext, metric: str, windows: torch.Tensor,
                             statistic) -> dict:
    """``statistic(model, weights, windows)`` of the fp model's target weights (one tensor per
    target, e.g. :func:`fisher_diagonal`) with the targets' fp weights, to set against the job's
    error after quantization (:func:`weight_errors`). Kept for the worker's next job of the same
    model and windows; the metrics ``fisher`` and ``first_order`` share this."""
    from ptqscale.data.calibration import hash_tokens
    from ptqscale.errors import ConfigError
    from ptqscale.metrics import hessian as hs
    from ptqscale.models import get_anatomy, placement_of

    if placement_of(ctx.model).streamed:
        raise ConfigError(f"metric {metric} needs the model in one piece (its gradients); "
                          "model.placement=streamed is not supported: use one or spread")
    targets = get_anatomy(ctx.model).targets
    names = list(targets)
    key = (metric, ctx.fp_key, hash_tokens(windows), tuple(names))
    if ctx.fp_key and key in _MEMO:
        return _MEMO[key]
    weights = [m.weight for m in targets.values()]
    with hs.double_backward_ready(ctx.model, weights, eager=False):
        stat = statistic(ctx.model, weights, windows)
    value = {"names": names, "statistic": stat,
             "weights": [w.detach().clone() for w in weights],
             "others": _fingerprint(ctx.model, weights)}
    for k in [k for k in _MEMO if k[0] == metric]:   # one model at a time per metric
        del _MEMO[k]
    if ctx.fp_key:
        _MEMO[key] = value
    return value


def weight_errors(ctx: MetricContext, metric: str) -> list[torch.Tensor]:
    """``Q(W) - W`` per target of the quantized model, against the weights ``prepare`` kept."""
    from ptqscale.models import get_anatomy

    prepared = ctx.prepared[metric]
    targets = get_anatomy(ctx.model).targets
    if list(targets) != prepared["names"]:
        raise RuntimeError(f"{metric}: the quantized model's targets are not those prepared "
                           f"({len(targets)} vs {len(prepared['names'])})")
    weights = [m.weight for m in targets.values()]
    if _fingerprint(ctx.model, weights) != prepared["others"]:
        raise RuntimeError(f"metric {metric}: the method changed parameters besides the "
                           "quantized linears' weights (SmoothQuant and AWQ fold their scales "
                           "into the norms): the weights' error is not what the job changed; "
                           "use it with weight-only methods such as rtn or gptq")
    with torch.no_grad():
        return [m.detach().to(w.device, w.dtype) - w for m, w in zip(weights, prepared["weights"])]


def _fingerprint(model, targets: list[torch.Tensor]) -> list[float]:
    """Sum and norm (float64) of every parameter but ``targets``: a method that changes any
    of them (a fold, a tuned norm) changes this."""
    skip = {id(w) for w in targets}
    with torch.no_grad():   # float64 accumulation, no float64 copy of a large embedding
        return [float(v) for p in model.parameters() if id(p) not in skip
                for v in (p.sum(dtype=torch.float64),
                          torch.linalg.vector_norm(p, dtype=torch.float64))]


def prepare_fisher(ctx: MetricContext) -> dict:
    """The Fisher diagonal on the calibration windows and the targets' fp weights."""
    return prepare_weight_statistic(ctx, "fisher", ctx.calibration, fisher_diagonal)


@register_metric("fisher", higher_is_better=False, version=VERSION, headline="fisher_ratio",
                 needs=("calibration", "fp_model", "report"), prepare=prepare_fisher)
def measure_fisher(ctx: MetricContext) -> dict:
    fisher = ctx.prepared["fisher"]["statistic"]
    return {"fisher_ratio": fisher_ratio(fisher, weight_errors(ctx, "fisher"))}
