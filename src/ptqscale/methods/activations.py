"""Activation fake-quantization of the inputs of target linears, and the kernel proportion.

A second format beside the weight format: ``MethodConfig.activations`` (an
:class:`ActQuantConfig`, ``None`` = activations stay in full precision). After any weight
method has run, :func:`install_activation_quant` (called once by ``methods.quantize``) puts a
forward pre-hook on every target linear that replaces its input ``X`` (tokens x channels) by
``Q(X)``; the hooks stay on the model, so that every later forward (the runner's perplexity
measurement included) sees quantized activations.

Scales. With ``t_i = max_j |X_ij|`` (token abs-max, always from the current input) and
``c_j = max_i |X_ij|`` (channel abs-max, calibrated offline or from the current input, see
``channel_stats``), the step of element ``(i, j)`` is ``Delta_ij = clip * S_ij / q_max`` with

- ``per_tensor``:  ``S = max_j c_j``;
- ``per_token``:   ``S_ij = t_i``;
- ``per_channel``: ``S_ij = c_j``;
- ``crossquant``:  ``S_ij = t_i^alpha * c_j^(1 - alpha)`` (Liu et al. 2024, Eq. 5; ``alpha = 1``
  is per-token, ``alpha = 0`` per-channel);

and ``Q(X)_ij = Delta_ij * round(X_ij / Delta_ij)`` on the element grid of ``format``: ``int<b>``
(codes ``+-(2^(b-1) - 1)``, ``q_max = 2^(b-1) - 1``) or a minifloat ``fp<b>_e<E>m<M>``
(``q_max`` = its largest finite value), nearest-even, saturating. Block formats (``int4_g32``,
MX, NVFP4, NF4) bring their own scales: they take ``granularity: native`` (blocks run along the
channels of each token).

The quantization kernel (CrossQuant's term) is the set of activation elements that are nonzero
in full precision and quantize to exactly zero. ``kernel_proportion`` = (number of such
elements) / (number of all input elements), per layer and over all layers (sums of counts),
measured on the calibration tokens with every hook active (each layer sees the quantized
model's activations).

Example::

    >>> cfg = ActQuantConfig(format="int8", granularity="crossquant", alpha=0.15)
    >>> q = ActQuantizer(cfg)
    >>> x = torch.randn(5, 64)
    >>> q.quantize(x).shape
    torch.Size([5, 64])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ptqscale.errors import ConfigError, require
from ptqscale.formats import Format

GRANULARITIES = ("per_tensor", "per_token", "per_channel", "crossquant", "native")
CHANNEL_STATS = ("calibrated", "per_batch")


@dataclass
class ActQuantConfig:
    """How the inputs of the target linears are quantized (every field is in the record).

    Example:
        >>> ActQuantConfig(format="int4", granularity="crossquant").alpha
        0.15
    """

    format: str = "int8"  # element type: int<b> | fp<b>_e<E>m<M>; block formats: native
    granularity: str = "per_token"  # per_tensor | per_token | per_channel | crossquant | native
    alpha: float = 0.15  # crossquant: exponent of the token max (1 = per-token)
    # Channel maxima c_j (per_channel, crossquant) and the tensor max (per_tensor):
    # "calibrated": max over the calibration tokens, fixed afterwards (static);
    # "per_batch": max over the tokens of the current forward call (dynamic).
    channel_stats: str = "calibrated"
    clip: float = 1.0  # Delta = clip * S / q_max; < 1 clips the largest values
    batch_size: int = 8  # calibration sequences per forward pass (statistics, kernel)

    def __post_init__(self) -> None:
        fmt = self._format()
        native = not fmt.element_type
        checks = [
            (self.granularity in GRANULARITIES,
             f"activations.granularity={self.granularity!r}: allowed {', '.join(GRANULARITIES)}"),
            (self.channel_stats in CHANNEL_STATS, f"activations.channel_stats="
             f"{self.channel_stats!r}: allowed {', '.join(CHANNEL_STATS)}"),
            (0.0 <= self.alpha <= 1.0, f"activations.alpha={self.alpha} must be in [0, 1]"),
            (0.0 < self.clip <= 1.0, f"activations.clip={self.clip} must be in (0, 1]"),
            (self.batch_size >= 1, f"activations.batch_size={self.batch_size} must be >= 1"),
            (native == (self.granularity == "native"),
             f"activations.format={self.format!r} with granularity={self.granularity!r}: "
             "block formats (int<b>_g<g>, mx*, nvfp4, nf4) take granularity=native, element "
             "formats (int<b>, fp<b>_e<E>m<M>) take per_tensor, per_token, per_channel or "
             "crossquant"),
        ]
        require(checks)

    def _format(self) -> Format:
        from ptqscale.methods.base import parse_format  # base imports this module

        fmt = parse_format(self.format, "activations.format")
        if fmt.family == "baseline":
            raise ConfigError(f"activations.format={self.format!r}: a 16-bit baseline; set "
                              "activations to null to keep activations in full precision")
        if fmt.block_size is None and not fmt.element_type:  # int8_t, int8_asym, ...
            raise ConfigError(f"activations.format={self.format!r}: write the element type "
                              f"{fmt.element_name} (symmetric); the scale placement is "
                              "activations.granularity")
        return fmt

    @property
    def uses_channel_max(self) -> bool:
        return self.granularity in ("per_tensor", "per_channel", "crossquant")

    @property
    def calibrates(self) -> bool:
        return self.uses_channel_max and self.channel_stats == "calibrated"


class ActQuantizer:
    """The fake quantizer of one linear's input, its calibrated channel maxima and counters.

    ``mode``: ``observe`` (record channel maxima, input unchanged), ``quantize``, or ``count``
    (quantize and count the kernel).
    """

    def __init__(self, cfg: ActQuantConfig):
        self.cfg = cfg
        self.fmt = cfg._format()
        self.qmax = None if cfg.granularity == "native" else float(self.fmt.element_max)
        self.channel_max: torch.Tensor | None = None
        self.mode = "quantize"
        self.kernel = self.zeros = self.total = 0

    def observe(self, x: torch.Tensor) -> None:
        cmax = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        self.channel_max = cmax if self.channel_max is None else self.channel_max.maximum(cmax)

    def scale(self, X: torch.Tensor) -> torch.Tensor:
        """``S`` (broadcastable to ``X``, fp32 tokens x channels) before ``clip / q_max``."""
        g, alpha = self.cfg.granularity, self.cfg.alpha
        t = X.abs().amax(-1, keepdim=True)  # token maxima t_i
        if self.cfg.channel_stats == "calibrated" and self.cfg.uses_channel_max:
            if self.channel_max is None:
                raise RuntimeError("activation quantizer used before its calibration")
            c = self.channel_max.to(X.device)
        else:
            c = X.abs().amax(0)  # channel maxima c_j of this batch
        if g == "per_token":
            return t
        if g == "per_channel":
            return c.unsqueeze(0)
        if g == "per_tensor":
            return c.max().reshape(1, 1)
        return t.pow(alpha) * c.unsqueeze(0).pow(1.0 - alpha)  # CrossQuant, Eq. 5

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``Q(x)``, same shape and dtype; fp32 internally."""
        X = x.reshape(-1, x.shape[-1]).float()
        if self.qmax is None:
            Q = self.fmt.fake_quantize(X)  # the format's own blocks along the channels
        else:
            delta = self.scale(X) * self.cfg.clip / self.qmax
            delta = torch.where(delta > 0, delta, torch.ones_like(delta))  # all-zero rows
            Q = self.fmt.round_elements(X / delta) * delta
        return Q.reshape(x.shape).to(x.dtype)

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if self.mode == "observe":
            self.observe(x)
            return None
        q = self.quantize(x)
        if self.mode == "count":
            nonzero = x != 0
            self.kernel += int((nonzero & (q == 0)).sum())
            self.zeros += int((~nonzero).sum())
            self.total += x.numel()
        return (q, *args[1:])

    def stats(self) -> dict[str, Any]:
        prop = self.kernel / self.total if self.total else None
        return {"kernel_proportion": prop, "kernel_elements": self.kernel,
                "act_zero_elements": self.zeros, "act_elements": self.total}


@torch.no_grad()
def run_calibration(model: nn.Module, calibration: torch.Tensor, batch_size: int) -> None:
    """Forward every batch of ``calibration`` through ``model`` (outputs discarded)."""
    device = model.get_input_embeddings().weight.device
    for ids in calibration.split(batch_size):
        model(input_ids=ids.to(device), use_cache=False)


def install_activation_quant(model: nn.Module, modules: dict[str, nn.Module],
                             cfg: ActQuantConfig, calibration: torch.Tensor | None
                             ) -> dict[str, Any]:
    """Hook an :class:`ActQuantizer` onto each of ``modules`` (left installed); return the
    record's ``activations`` summary with per-layer kernel statistics.

    Calibrated channel maxima come from one pass over ``calibration`` with full-precision
    activations (the weights as the method left them); the kernel from a second pass with
    every quantizer active.
    """
    if calibration is None:
        raise ConfigError("activation quantization needs calibration tokens (channel maxima "
                          "and the kernel proportion): QuantContext.calibration; through the "
                          "runner use a method that reads calibration data")
    quantizers = {name: ActQuantizer(cfg) for name in modules}
    for name, module in modules.items():
        module._ptqscale_act_hook = module.register_forward_pre_hook(quantizers[name])
    was_training = model.training
    model.eval()
    try:
        if cfg.calibrates:
            _set_mode(quantizers, "observe")
            run_calibration(model, calibration, cfg.batch_size)
        _set_mode(quantizers, "count")
        run_calibration(model, calibration, cfg.batch_size)
    finally:
        _set_mode(quantizers, "quantize")
        model.train(was_training)
    return summarize(cfg, quantizers, calibration)


def remove_activation_quant(modules: dict[str, nn.Module]) -> None:
    """Take the hooks of :func:`install_activation_quant` off again."""
    for module in modules.values():
        handle = getattr(module, "_ptqscale_act_hook", None)
        if handle is not None:
            handle.remove()
            del module._ptqscale_act_hook


def _set_mode(quantizers: dict[str, ActQuantizer], mode: str) -> None:
    for q in quantizers.values():
        q.mode = mode


def summarize(cfg: ActQuantConfig, quantizers: dict[str, ActQuantizer],
              calibration: torch.Tensor) -> dict[str, Any]:
    """Per-layer kernel statistics and their totals (overall proportion = sum / sum)."""
    layers = {name: q.stats() for name, q in quantizers.items()}
    kernel = sum(s["kernel_elements"] for s in layers.values())
    total = sum(s["act_elements"] for s in layers.values())
    return {"config": asdict(cfg), "kernel_proportion": kernel / total if total else None,
            "kernel_elements": kernel, "act_elements": total,
            "calibration_tokens": int(calibration.numel()), "layers": layers}


def merge_layer_stats(report_layers: list[dict], act_layers: dict[str, dict]) -> list[str]:
    """Add each layer's kernel statistics to its weight entry; the names without one."""
    by_name = {entry["name"]: entry for entry in report_layers}
    missing = []
    for name, stats in act_layers.items():
        if name in by_name:
            by_name[name].update(stats)
        else:
            missing.append(name)
    return missing



def quantize_activations(model: nn.Module, method_cfg: Any, ctx: Any, report: Any) -> None:
    """The one place activation quantization joins a method: hooks on the method's targets,
    kernel statistics into ``report.layers`` (by name) and ``report.extra["activations"]``."""
    from ptqscale.methods.base import select_targets
    from ptqscale.models import get_anatomy

    if not report.layers:
        raise ConfigError(f"method {method_cfg.name!r} quantized no layer; activation "
                          "quantization needs a weight method (rtn with format bf16 keeps "
                          "16-bit weights)")
    modules = select_targets(model, get_anatomy(model), method_cfg.targets)
    summary = install_activation_quant(model, modules, method_cfg.activations, ctx.calibration)
    merge_layer_stats(report.layers, summary.pop("layers"))
    report.extra["activations"] = summary


@torch.no_grad()
def channel_absmax(model: nn.Module, modules: dict[str, nn.Module], calibration: torch.Tensor,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """``max_i |X_ij|`` (fp32, per input channel) of each module's input over ``calibration``."""
    observers = {name: ActQuantizer(ActQuantConfig()) for name in modules}
    handles = []
    for name, module in modules.items():
        observers[name].mode = "observe"
        handles.append(module.register_forward_pre_hook(observers[name]))
    try:
        run_calibration(model, calibration, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {name: obs.channel_max for name, obs in observers.items()}
