"""The method registry, the shared config fields, target selection and the report."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqscale.errors import ConfigError, ImplausibleResultError, unknown_name
from ptqscale.formats import Format, get_format
from ptqscale.methods.activations import ActQuantConfig, quantize_activations
from ptqscale.methods.cost import measure_cost


@dataclass
class TargetsConfig:
    """Which linear layers a method quantizes.

    The decoder blocks' linear layers are the targets; ``include``/``exclude`` are
    fnmatch patterns on full module names (exclude wins). The embeddings and the LM
    head are left alone unless asked for explicitly.
    """

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    head: bool = False
    embeddings: bool = False


@dataclass
class MethodConfig:
    """Fields every method shares. ``format`` is a name for ``ptqscale.formats.get_format``."""

    # Whether the method reads calibration data (the runner then samples ``calib``).
    needs_calibration: ClassVar[bool] = False
    # Fields that change speed or placement but not the result; left out of the job key.
    not_in_key: ClassVar[tuple[str, ...]] = ()

    name: str = "none"
    format: str = "bf16"
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    # A dimension that the format's block/group does not divide is zero-padded to the next
    # multiple (the record says so); with allow_padding=False such a config is refused.
    allow_padding: bool = True
    # Fake-quantization of the targets' inputs after the weights (None: full precision);
    # see methods/activations.py. It reads calibration data.
    activations: ActQuantConfig | None = None

    @property
    def uses_calibration(self) -> bool:
        """Whether this config reads calibration data (the method's or its activations')."""
        return self.needs_calibration or self.activations is not None


@dataclass
class QuantContext:
    """What a method may need beyond the model: calibration tokens, a cache, a device."""

    calibration: torch.Tensor | None = None   # LongTensor [nsamples, seqlen]
    calibration_hash: str | None = None
    cache_dir: str | None = None
    device: torch.device | None = None
    progress: bool = False


@dataclass
class QuantReport:
    """What quantization did: per-layer statistics and the global weight SQNR."""

    method: str
    format: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_sqnr_db(self) -> float | None:
        """Global SQNR: 10*log10(sum ||W||^2 / sum ||W - Q(W)||^2) over all quantized layers."""
        signal = sum(layer["signal"] for layer in self.layers)
        noise = sum(layer["noise"] for layer in self.layers)
        if not self.layers or not 0 < noise < math.inf:
            return None  # nothing quantized, exact, or non-finite weights: JSON has no inf
        return 10 * math.log10(signal / noise)

    @property
    def quantized_numel(self) -> int:
        return sum(layer["numel"] for layer in self.layers)

    def weight_outliers(self) -> dict[str, float]:
        """Over the quantized layers: numel-weighted mean excess kurtosis of the weights and
        the largest max|W| / rms(W) (empty where the layers do not carry them)."""
        kurt = [(la["kurtosis"], la["numel"]) for la in self.layers
                if la.get("kurtosis") is not None]
        ratios = [la["absmax_rms"] for la in self.layers if la.get("absmax_rms") is not None]
        out = {}
        if kurt:
            out["weight_kurtosis"] = sum(k * n for k, n in kurt) / sum(n for _, n in kurt)
        if ratios:
            out["weight_absmax_rms"] = max(ratios)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The record's ``quantization`` block (the format is named once, in ``format.name``)."""
        return {"method": self.method, "seconds": self.seconds,
                "weight_sqnr_db": self.weight_sqnr_db, "quantized_numel": self.quantized_numel,
                **self.weight_outliers(), **self.extra}


# Where a method computes: ``device`` fields of method configs must match this.
METHOD_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_format(name: str, key: str = "method.format") -> Format:
    """The format of a config value; a bad name is a ConfigError naming ``key``."""
    try:
        return get_format(name)
    except ValueError as err:
        raise ConfigError(f"{key}={name!r}: {err}") from None


def calibration_ids(ctx: QuantContext, method: str) -> torch.Tensor:
    """The calibration tokens ``[nsamples, seqlen]`` of ``ctx``, checked for a method."""
    ids = ctx.calibration
    if ids is None:
        raise ConfigError(f"{method} needs calibration tokens: QuantContext.calibration = "
                          "LongTensor [nsamples, seqlen] (the runner samples them from the calib "
                          "group)")
    if ids.ndim != 2 or ids.dtype != torch.long or ids.numel() == 0:
        raise ConfigError(f"calibration must be a non-empty LongTensor [nsamples, seqlen], got "
                          f"{ids.dtype} {tuple(ids.shape)}")
    return ids


def hash_ids(ids: torch.Tensor) -> str:
    """sha256 of a token tensor (shape and little-endian int64 values)."""
    import hashlib

    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).contiguous().cpu().numpy().astype("<i8").tobytes())
    return h.hexdigest()

QuantizeFn = Callable[[nn.Module, MethodConfig, QuantContext], QuantReport]
METHODS: dict[str, tuple[type[MethodConfig], QuantizeFn]] = {}
# Registered method -> a regular expression of the other names its configs carry
# (blockft's variant labels, e.g. blockft_joint2): get_method finds the method by them too.
ALIASES: dict[str, re.Pattern] = {}


def register_method(name: str, config_cls: type[MethodConfig], aliases: str | None = None
                    ) -> Callable[[QuantizeFn], QuantizeFn]:
    """Register ``fn`` as the implementation of method ``name`` (a duplicate name raises).

    ``aliases``: a regular expression of the names a validated config of this method may
    carry besides ``name`` (not listed as methods; see ``blockft``).
    """

    def deco(fn: QuantizeFn) -> QuantizeFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = (config_cls, fn)
        if aliases is not None:
            ALIASES[name] = re.compile(aliases)
        return fn

    return deco


def get_method(name: str) -> tuple[type[MethodConfig], QuantizeFn]:
    """The (config class, function) of a method, by its name or an alias; an unknown name
    lists what exists."""
    if name not in METHODS:
        name = next((m for m, alias in ALIASES.items() if alias.fullmatch(name)), name)
    if name not in METHODS:
        raise ConfigError("method.name: " + unknown_name("method", name, METHODS))
    return METHODS[name]


def quantize(model: nn.Module, cfg: MethodConfig, ctx: QuantContext | None = None) -> QuantReport:
    """Quantize ``model`` in place with the method that ``cfg``'s ``name`` names."""
    _, fn = get_method(cfg.name)
    ctx = ctx or QuantContext()
    with measure_cost() as cost:
        report = fn(model, cfg, ctx)
        if cfg.activations is not None:
            quantize_activations(model, cfg, ctx, report)
    report.seconds = cost["seconds"]
    report.extra["cost"] = cost
    return report


def select_targets(model: nn.Module, anatomy: Any, targets: TargetsConfig) -> dict[str, nn.Linear]:
    """The linear layers to quantize, in block and execution order.

    ``anatomy`` is ``ptqscale.models.get_anatomy(model)``: its block targets, plus the
    head and the embeddings when the config asks for them.
    """
    chosen: dict[str, nn.Module] = dict(anatomy.targets)
    if targets.head and anatomy.head:
        chosen[anatomy.head] = model.get_submodule(anatomy.head)
    if targets.embeddings:
        for name in anatomy.embeddings:
            chosen[name] = model.get_submodule(name)

    def keep(name: str) -> bool:
        inc = any(fnmatch.fnmatchcase(name, p) for p in targets.include)
        return inc and not any(fnmatch.fnmatchcase(name, p) for p in targets.exclude)

    return {name: mod for name, mod in chosen.items() if keep(name)}


def layer_stats(name: str, weight: torch.Tensor, quantized: torch.Tensor, padded: int) -> dict[str, Any]:
    """Per-layer record entry: sizes, signal and noise energy (fp64 sums), SQNR in dB, and
    the full-precision weights' outlier statistics: excess kurtosis and max|W| / rms(W)
    (features that may carry a method's gain across families, issue 22).

    Every method passes each layer through here before writing it, so this is where a
    non-finite value that quantizing created (``weight`` finite there) fails the job, with
    the layer and the place, before the next layer is calibrated on its output.
    """
    w = weight.detach().double()
    signal = float(w.square().sum())
    noise = float((w - quantized.detach().double()).square().sum())
    if not math.isfinite(noise):
        check_no_new_non_finite(name, weight, quantized)
    # None also for an inf / NaN noise (non-finite weights), which the runner then reports
    sqnr = 10 * math.log10(signal / noise) if 0 < noise < math.inf else None
    centred = w - w.mean()
    var = float(centred.square().mean())
    kurtosis = float(centred.pow(4).mean()) / var**2 - 3.0 if 0 < var < math.inf else None
    rms = math.sqrt(signal / w.numel()) if w.numel() else 0.0
    absmax_rms = float(w.abs().max()) / rms if 0 < rms < math.inf else None
    return {"name": name, "shape": list(weight.shape), "numel": weight.numel(),
            "signal": signal, "noise": noise, "sqnr_db": sqnr, "padded": padded,
            "kurtosis": _finite_or_none(kurtosis), "absmax_rms": _finite_or_none(absmax_rms)}


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def check_no_new_non_finite(name: str, weight: torch.Tensor, quantized: torch.Tensor) -> None:
    """Raise ImplausibleResultError where ``quantized`` is NaN / inf and ``weight`` is finite.

    Formats keep a non-finite weight in place (docs/formats.md), so such a value was created by
    the format (an fp16 overflow) or the method (an update gone inf), never inherited.
    """
    new = torch.isfinite(weight.detach()) & ~torch.isfinite(quantized.detach())
    if bool(new.any()):
        where = new.nonzero()
        first = tuple(where[0].tolist())
        raise ImplausibleResultError(
            f"{name}: the quantized weight holds {where.shape[0]} non-finite value(s) (NaN/inf) "
            f"where the full-precision weight was finite (of {weight.numel()}), first at "
            f"{first}: {float(weight[first])!r} -> {float(quantized[first])!r}")
