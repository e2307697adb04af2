"""Block-wise reconstruction fine-tuning (weight-only), three variants of Shabanovi et al. 2024.

The usual block-wise fine-tuning learns the quantization parameters of one decoder block at a
time so that its outputs match full precision on calibration data. Shabanovi et al. ("Interactions
Across Blocks in PTQ of LLMs", 2024) relax the independence of blocks in two ways; all three
variants are one method, ``blockft`` (``conf/method/blockft.yaml``), whose ``variant`` is a field:

- ``variant=single``: one block, error at its own output (the baseline);
- ``variant=joint, window=k``: ``k`` consecutive blocks optimised jointly against the
  full-precision output of the last one, windows ``stride`` blocks apart (default ``k``);
- ``variant=downstream, downstream=m``: one block optimised with the error measured at the
  output of the block ``m`` further down, the blocks in between held fixed at full precision
  (our reading).

The validated config's ``name`` is the variant's label, ``blockft_single``,
``blockft_joint<k>`` or ``blockft_down<m>``: records, job names and the analysis tell the
variants apart by it, and it is the name the study's first records were written under (one
registered method per variant then), so their job keys are those of the same settings today.

What is learned (``blockft_quant.py``): a per-weight rounding offset and, where the format
stores its scale as a free float, a per-group scale multiplier, with straight-through gradients
through the format's own rounding; initialised from RTN or from GPTQ (``init``). The walk over
windows and the two activation streams are in ``blockft_walk.py``; the calibration plumbing is
``capture.py``'s.

Example::

    >>> cfg = BlockFTConfig(variant="joint", window=2)
    >>> cfg.name, cfg.stride
    ('blockft_joint2', 2)
    >>> report = quantize(model, cfg, QuantContext(calibration=ids))   # doctest: +SKIP
    >>> report.extra["blockft"]["windows"][0]["loss_after"]            # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqscale.errors import ConfigError
from ptqscale.formats import get_format
from ptqscale.methods.base import (
    METHOD_DEVICE,
    MethodConfig,
    QuantContext,
    QuantReport,
    TargetsConfig,
    calibration_ids,
    hash_ids,
    layer_stats,
    parse_format,
    register_method,
    select_targets,
)

VARIANTS = ("single", "joint", "downstream")
# The labels a validated config carries as its name (see the module docstring).
LABELS = r"blockft_(single|joint\d+|down\d+)"


def variant_label(variant: str, window: int, downstream: int) -> str:
    """The name of a variant: ``blockft_single``, ``blockft_joint<window>``,
    ``blockft_down<downstream>``.

    Example:
        >>> variant_label("joint", 2, 0), variant_label("downstream", 1, 2)
        ('blockft_joint2', 'blockft_down2')
    """
    suffix = {"single": "single", "joint": f"joint{window}", "downstream": f"down{downstream}"}
    return f"blockft_{suffix[variant]}"


@dataclass
class BlockFTConfig(MethodConfig):
    """Block-wise fine-tuning of the learned rounding offsets (and scales) into ``format``.

    Example:
        >>> BlockFTConfig(format="int3_g32").name, BlockFTConfig().iters
        ('blockft_single', 200)
    """

    needs_calibration: ClassVar[bool] = True
    not_in_key: ClassVar[tuple[str, ...]] = ("device", "offload")

    # "blockft" (or the variant's own label, as in the first records); after validation the
    # variant's label: blockft_single | blockft_joint<window> | blockft_down<downstream>
    name: str = "blockft"
    format: str = "int3_g32"
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    allow_padding: bool = True
    variant: str = "single"  # single | joint | downstream
    window: int = 1  # blocks optimised together (joint: >= 2; else 1)
    # blocks between window starts (joint; 1 <= stride <= window); None: = window, so that
    # windows do not overlap (the study's setting; resolved here, so records hold the number)
    stride: int | None = None
    downstream: int = 0  # blocks from the tuned one to the one whose output is matched (>= 1)
    init: str = "rtn"  # rtn | gptq: the starting point (and anchor) of the learned rounding
    learn_scale: bool = True  # learn per-group scale multipliers (INT, FP, NF4 formats only)
    offset_bound: float = 1.0  # |rounding offset| <= this many mean grid steps
    optimizer: str = "adam"
    lr: float = 5e-3  # Adam learning rate of the offsets (units of grid steps)
    scale_lr: float = 1e-3  # Adam learning rate of the log scale multipliers
    iters: int = 200  # optimizer steps per window
    batch_size: int = 4  # calibration sequences per step (and per forward pass)
    nsamples: int | None = None  # calibration sequences used (None: all that calib gives)
    keep_best: bool = True  # undo a window's tuning if it raised its calibration error
    percdamp: float = 0.01  # GPTQ init: lambda = percdamp * mean(diag H)
    gptq_blocksize: int = 128  # GPTQ init: columns per lazy batch update
    seed: int = 0  # order of the calibration batches
    device: str = "auto"  # where blocks compute: auto (cuda if available) | cpu | cuda[:N]
    offload: str = "auto"  # activations on the CPU: auto (when short of GPU memory) | yes | no

    def __post_init__(self) -> None:
        parse_format(self.format)
        self._check_variant()
        if self.stride is None:
            self.stride = self.window
        for ok, message in self._checks():
            if not ok:
                raise ConfigError(message)
        self.name = variant_label(self.variant, self.window, self.downstream)

    def _check_variant(self) -> None:
        """variant, window and downstream agree; a given label names them (ConfigError)."""
        v, k, m = self.variant, self.window, self.downstream
        if v not in VARIANTS:
            raise ConfigError(f"method.variant={v!r}: allowed {', '.join(VARIANTS)}")
        need = {"single": (k == 1 and m == 0, "method.window=1 and method.downstream=0"),
                "joint": (k >= 2 and m == 0, "method.window>=2 and method.downstream=0"),
                "downstream": (k == 1 and m >= 1, "method.window=1 and method.downstream>=1")}
        ok, what = need[v]
        if not ok:
            raise ConfigError(f"method.variant={v} needs {what}, got window={k}, downstream={m}")
        label = variant_label(v, k, m)
        if self.name not in ("blockft", label):
            raise ConfigError(f"method.name={self.name!r}: use blockft (variant={v}, window={k}, "
                              f"downstream={m} is {label})")

    def _checks(self):
        return [
            (1 <= self.stride <= self.window,
             f"method.window={self.window}, stride={self.stride}: need 1 <= stride <= window "
             "(a larger stride would leave blocks unquantized)"),
            (self.init in ("rtn", "gptq"), f"method.init={self.init!r}: allowed rtn, gptq"),
            (self.optimizer == "adam", f"method.optimizer={self.optimizer!r}: allowed adam"),
            (self.lr > 0 and self.scale_lr > 0, "method.lr and method.scale_lr must be > 0"),
            (self.iters >= 0, f"method.iters={self.iters} must be >= 0"),
            (self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1"),
            (self.nsamples is None or self.nsamples >= 1,
             f"method.nsamples={self.nsamples} must be >= 1 or null (all)"),
            (self.offset_bound > 0, f"method.offset_bound={self.offset_bound} must be > 0"),
            (self.percdamp > 0 and self.gptq_blocksize >= 1,
             "method.percdamp must be > 0 and method.gptq_blocksize >= 1"),
            (bool(METHOD_DEVICE.match(self.device)),
             f"method.device={self.device!r}: allowed auto, cpu, cuda, cuda:N"),
            (self.offload in ("auto", "yes", "no"),
             f"method.offload={self.offload!r}: allowed auto, yes, no"),
            (not (self.targets.head or self.targets.embeddings),
             "block fine-tuning quantizes the decoder blocks' linears only; set "
             "targets.head=false and targets.embeddings=false"),
        ]

    def settings(self) -> dict[str, Any]:
        keys = ("variant", "window", "stride", "downstream", "init", "learn_scale",
                "offset_bound", "optimizer", "lr", "scale_lr", "iters", "batch_size", "nsamples",
                "keep_best", "percdamp", "gptq_blocksize", "seed", "device", "offload")
        return {k: getattr(self, k) for k in keys}


def _quantize_blockft(model: nn.Module, cfg: BlockFTConfig, ctx: QuantContext) -> QuantReport:
    """Quantize the target linears of ``model`` in place, window by window."""
    from ptqscale.methods.blockft_walk import BlockFT, plan_windows
    from ptqscale.methods.capture import capture_block_inputs
    from ptqscale.models import get_anatomy, resolve_device

    fmt = get_format(cfg.format)
    ids = calibration_ids(ctx, cfg.name)
    if cfg.nsamples is not None:
        if cfg.nsamples > ids.shape[0]:
            raise ConfigError(f"method.nsamples={cfg.nsamples} but the calibration has only "
                              f"{ids.shape[0]} sequences (calib.nsamples)")
        ids = ids[: cfg.nsamples]
    from ptqscale.models import placement_of

    if placement_of(model).spread:  # its windows move several blocks to one device
        raise ConfigError(f"method {cfg.name} does not run on a spread model "
                          "(model.placement=spread); use model.placement=one or streamed")
    device = resolve_device(cfg.device, "method.device")
    anat = get_anatomy(model)
    selected = select_targets(model, anat, cfg.targets)
    storage, why = _storage(model, cfg, ids, device)
    prefixes = [f"{anat.block_prefix}.{i}." for i in range(len(anat.blocks))]
    targets = [{rel: p + rel for rel in anat.block_order if p + rel in selected}
               for p in prefixes]
    report = QuantReport(method=cfg.name, format=fmt.name)
    walk = BlockFT(anat.blocks, targets, anat.block_order, cfg, fmt, device, storage)
    walk.finalize = lambda b, learned: report.layers.extend(
        _finalize(anat.blocks[b], b, targets[b], learned, fmt))
    windows = plan_windows(len(anat.blocks), cfg.variant, cfg.window, cfg.stride, cfg.downstream)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval().requires_grad_(False)  # only the learned quantizers get gradients
    try:
        inputs = capture_block_inputs(model, anat.blocks[0], ids, cfg.batch_size, storage)
        walk.run(inputs, windows, ctx.progress)
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    report.extra = _summary(cfg, device, storage, why, ids, ctx, walk, report.layers)
    return report


quantize_blockft = register_method("blockft", BlockFTConfig, aliases=LABELS)(_quantize_blockft)


@torch.no_grad()
def _finalize(block: nn.Module, b: int, names: dict[str, str], learned: dict, fmt) -> list[dict]:
    """Write the block's final quantized weights into it; per-layer records."""
    entries = []
    for rel, lw in learned.items():
        Q = lw.quantized()
        entry = layer_stats(names[rel], lw.weight, Q, fmt.padding_needed(lw.shape[1]))
        ratio = 1.0
        if lw.learn_scale:
            ratio = float((lw.scaled_params(lw.multiplier()).scale / lw.params.scale).mean())
        entry.update(block=b, scale_learned=lw.learn_scale, scale_ratio_mean=ratio,
                     changed_vs_init=float((Q != lw.initial().to(Q.dtype)).float().mean()))
        block.get_submodule(rel).weight.data.copy_(Q)
        entries.append(entry)
    return entries


def _storage(model, cfg: BlockFTConfig, ids, device) -> tuple[torch.device, str]:
    """Where activations wait: the compute device, or the CPU when asked or when the four
    streams (quantized inputs, fp inputs, fp targets, next fp inputs) would not fit in half of
    the free GPU memory."""
    cpu = torch.device("cpu")
    if cfg.offload == "yes" or device.type != "cuda":
        return cpu, "offload=yes" if cfg.offload == "yes" else "not on cuda"
    if cfg.offload == "no":
        return device, "offload=no"
    hidden = model.config.hidden_size
    elem = next(model.parameters()).element_size()
    need = 4 * ids.numel() * hidden * elem
    free, _total = torch.cuda.mem_get_info(device)
    if need > free / 2:
        return cpu, f"auto: activations {need / 2**30:.2f} GiB > half of free {free / 2**30:.2f} GiB"
    return device, f"auto: activations {need / 2**30:.2f} GiB fit"


def _summary(cfg, device, storage, why, ids, ctx, walk, layers) -> dict:
    """The job-level record (``quantize`` adds seconds and peak memory as ``cost``)."""
    import math


    windows = walk.windows
    return {
        "blockft": {**cfg.settings(), "device": str(device), "storage": str(storage),
                    "storage_reason": why, "windows": windows},
        "calibration": {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                        "hash": ctx.calibration_hash or hash_ids(ids)},
        "windows_kept_before": sum(w["kept"] == "before" for w in windows),
        "loss_before_sum": math.fsum(w["loss_before"] for w in windows),
        "loss_after_sum": math.fsum(w["loss_after"] for w in windows),
        "scale_learned": any(layer["scale_learned"] for layer in layers),
    }
