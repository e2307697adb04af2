"""``model.placement=spread``: one model over several GPUs, whole decoder blocks per GPU.

The assignment is ours (:func:`assign_blocks`, a pure function): contiguous runs of whole
decoder blocks, balanced so that the fullest GPU holds as few weight bytes as possible, the
layers before the first block (embeddings, rotary tables) on the first GPU and those after the
last (final norm, output layer) on the last one (on the first when the output layer shares the
input embedding: a tied tensor lives in one place). accelerate's ``dispatch_model`` then
installs the hooks that move the hidden states from GPU to GPU in the model's own forward.
Not accelerate's ``infer_auto_device_map``: it fills GPU 0 first (balancing needs a second
call, ``get_balanced_memory``), and it needs a module-class name per family where the block
list is already known here (``models.anatomy.decoder_blocks``).

Nothing changes a number: every block computes with its own weights on its own GPU, in the
order of the model in one piece. Methods walk the blocks where they live
(:func:`block_device`); perplexity and the landscape run the dispatched model.

``model.device=cpu`` with ``spread`` is the one-device map (everything on the CPU, the hooks
installed all the same): the same code path, for CPU tests and machines without a GPU.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ptqscale.errors import ConfigError
from ptqscale.models.config import ModelConfig, parse_bytes


class SpreadError(ConfigError):
    """The model's blocks do not fit the GPUs' budgets."""


def spread_devices(cfg: ModelConfig) -> list[torch.device]:
    """The devices ``cfg`` spreads over on this machine; a clear error where they do not exist
    (no GPU, fewer than ``model.gpus``). ``load_model`` and a job about to run (the runner's
    validation with ``bind``) ask before any weight is read; a plan made elsewhere does not."""
    if cfg.device == "cpu":
        return [torch.device("cpu")]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ConfigError("model.placement=spread needs at least one CUDA GPU and none is "
                          "visible here; use model.placement=one or streamed (or "
                          "model.device=cpu for the one-device map)")
    want = visible if cfg.gpus is None else cfg.gpus
    if want > visible:
        raise ConfigError(f"model.gpus={cfg.gpus} but only {visible} GPU(s) are visible here")
    return [torch.device("cuda", i) for i in range(want)]


def assign_blocks(block_bytes: list[int], capacities: list[float], stem_bytes: int = 0,
                  head_bytes: int = 0, head_on_first: bool = False) -> list[int]:
    """The device index of each block: contiguous runs, in order, such that the largest load
    of a device (its blocks, plus the stem on the first and the head on the last device, or on
    the first with ``head_on_first``) is as small as possible and no device holds more than
    its capacity. Raises :class:`SpreadError` when the blocks cannot fit.

    Example::

        >>> assign_blocks([4, 4, 4, 4], [100, 100])
        [0, 0, 1, 1]
        >>> assign_blocks([4, 4, 4, 4], [100, 100], stem_bytes=8)
        [0, 1, 1, 1]
    """
    n = len(capacities)
    fixed = [0] * n
    fixed[0] += stem_bytes
    fixed[0 if head_on_first else n - 1] += head_bytes
    total = sum(block_bytes) + stem_bytes + head_bytes
    caps = [int(min(c, total)) for c in capacities]  # whole bytes; a CPU's inf is "all of it"

    def fill(limit: int) -> list[int] | None:
        # greedy: each device takes blocks while they fit under min(limit, its capacity);
        # for an ordered, contiguous split this finds one whenever one exists
        out, d, load = [], 0, fixed[0]
        for b in block_bytes:
            while load + b > min(limit, caps[d]):
                d += 1
                if d == n:
                    return None
                load = fixed[d]
            out.append(d)
            load += b
        return out if all(f <= c for f, c in zip(fixed, caps, strict=True)) else None

    if not block_bytes or fill(max(caps)) is None:
        gib = 2**30
        raise SpreadError(
            f"{len(block_bytes)} decoder blocks of {sum(block_bytes) / gib:.2f} GiB (+ "
            f"{(stem_bytes + head_bytes) / gib:.2f} GiB outside them) do not fit {n} GPU(s) "
            f"with room for {', '.join(f'{c / gib:.2f}' for c in caps)} GiB of weights; "
            "raise model.max_gpu_memory or model.gpus, or use model.placement=streamed")
    lo, hi = max(*fixed, *block_bytes) - 1, max(caps)  # infeasible < smallest feasible <= hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return fill(hi)


def block_device(model: nn.Module, block: nn.Module, device: torch.device) -> torch.device:
    """Where ``block`` computes: its own GPU when ``model`` is spread (moving it would break the
    device map), else ``device`` (a method's or the placement's execution device)."""
    from ptqscale.models.streaming import placement_of

    if placement_of(model).spread:
        return next(block.parameters()).device
    return device


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def capacity(device: torch.device, budget: int | None) -> float:
    """Weight bytes a device takes: the budget (else its free memory) less the working margin
    that ``placement=auto`` keeps too (activations, logits, a Hessian); unbounded on a CPU."""
    from ptqscale.models.streaming import WORKING_BYTES, WORKING_FRACTION

    if device.type != "cuda":
        return float("inf")
    available = budget if budget is not None else torch.cuda.mem_get_info(device)[0]
    return max(0.0, (available - WORKING_BYTES) / (1 + WORKING_FRACTION))


def device_map_for(model: nn.Module, devices: list[torch.device],
                   capacities: list[float]) -> dict[str, str]:
    """``{module name: device}`` covering every tensor of ``model``: each decoder block and each
    module outside the blocks that owns tensors (the stem on the first device, the head on the
    last, or on the first when tied to the input embedding)."""
    from ptqscale.models.anatomy import decoder_blocks
    from ptqscale.models.streaming import module_tensors, module_tensors_direct, stem_and_head

    prefix, holder = decoder_blocks(model)
    stem, head = stem_and_head(model, prefix, holder[0], torch.zeros(1, 2, dtype=torch.long))
    embedding = model.get_input_embeddings().weight
    tied = any(t is embedding for t in module_tensors_direct(head))
    in_stem = {id(t) for t in module_tensors_direct(stem)}  # a tied tensor counts once
    blocks = assign_blocks([tensor_bytes(module_tensors([b])) for b in holder], capacities,
                           tensor_bytes(module_tensors_direct(stem)),
                           tensor_bytes(t for t in module_tensors_direct(head)
                                        if id(t) not in in_stem), head_on_first=tied)
    names = {id(m): name for name, m in model.named_modules()}
    last = devices[0] if tied else devices[-1]
    where = {names[id(m)]: str(devices[0]) for m in stem if module_tensors_direct([m])}
    where |= {f"{prefix}.{i}": str(devices[d]) for i, d in enumerate(blocks)}
    where |= {names[id(m)]: str(last) for m in head if module_tensors_direct([m])}
    if "" in where:
        raise SpreadError("the model owns tensors outside its submodules; it cannot be spread")
    return where


def spread_model(model: nn.Module, cfg: ModelConfig):
    """Spread a model loaded on the CPU over ``spread_devices(cfg)``; returns its Placement.

    The budget (``model.max_gpu_memory``) caps each GPU; each module moves to its device, then
    accelerate's hooks (forced also for one device) move activations between them.
    """
    from accelerate import dispatch_model

    from ptqscale.models.streaming import Placement, apply_memory_budget, within_budget

    devices = spread_devices(cfg)
    budget = None
    if cfg.max_gpu_memory is not None and devices[0].type == "cuda":
        budget = parse_bytes(cfg.max_gpu_memory, "model.max_gpu_memory")
    for d in devices:
        apply_memory_budget(d, budget)
    where = device_map_for(model, devices, [capacity(d, budget) for d in devices])
    placement = Placement(False, devices[0], budget, tuple(where.items()))
    with within_budget(placement, f"spreading model {cfg.name!r}"):
        for name, device in where.items():
            model.get_submodule(name).to(device)
        with _quiet_accelerate():  # on a CPU map it says weights went to "meta": they did not
            dispatch_model(model, device_map=where, main_device=str(devices[0]),
                           force_hooks=True)
    return placement


def unspread(model: nn.Module) -> None:
    """Undo :func:`spread_model`: the hooks off, every weight on the CPU, the GPUs' caps
    lifted; the model is then in one piece on the CPU (a benchmark's next placement)."""
    from accelerate.hooks import remove_hook_from_module

    from ptqscale.models.streaming import (
        Placement,
        apply_memory_budget,
        placement_of,
        set_placement,
    )

    devices = {torch.device(d) for _, d in placement_of(model).device_map or ()}
    remove_hook_from_module(model, recurse=True)
    model.to("cpu")
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    for d in devices:
        apply_memory_budget(d, None)
    set_placement(model, Placement(False, torch.device("cpu")))


@contextmanager
def _quiet_accelerate():
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def describe(device_map: tuple[tuple[str, str], ...]) -> str:
    """A device map in a line for the record: ``cuda:0=model.embed_tokens,model.layers.0-15;
    cuda:1=...`` (consecutive blocks as a range)."""
    by_device: dict[str, list[str]] = {}
    for name, device in device_map:
        by_device.setdefault(device, []).append(name)
    return ";".join(f"{d}={','.join(_ranges(names))}" for d, names in by_device.items())


def _ranges(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        head, _, tail = name.rpartition(".")
        if out and tail.isdigit() and "-" not in tail:
            prev_head, _, prev_tail = out[-1].rpartition(".")
            first, _, last = prev_tail.partition("-")
            if prev_head == head and (last or first).isdigit() and int(last or first) + 1 == int(tail):
                out[-1] = f"{head}.{first}-{tail}"
                continue
        out.append(name)
    return out
