"""Models larger than the GPU: where a model waits, and the one block walker every stage uses.

A loaded model carries a :class:`Placement` (``load_model`` sets it from ``model.placement``):

- in one piece: every weight on the execution device, forwards as usual;
- streamed: every weight waits on the CPU; a stage brings one decoder block at a time to the
  execution device (:func:`onloaded`) and lets it go afterwards;
- spread: whole decoder blocks on several GPUs (models/spread.py); each block computes where
  it lives (``spread.block_device``), the model's own forward hops from GPU to GPU.

The walk is written once, for every family and stage. :func:`capture_block_inputs` runs the
model up to its first block (a pre-hook stores the block's arguments, including the masks and
position embeddings the model builds, and stops the forward); :func:`run_block` moves all
batches through one block; :func:`walk_logits` chains them, "all windows through block i,
then block i+1", and gets the logits by running the model once more with every block replaced
by a replay of the stored last hidden states, so the final norm and head (whatever a family
calls them) run the model's own code. Every block sees the same arguments and the same batches
as in one piece, so the arithmetic is the same: on CPU the NLL is bitwise equal
(tests/models/test_streaming.py).

Example::

    >>> model, tok = load_model(ModelConfig(..., placement="streamed"))  # doctest: +SKIP
    >>> for i, logits in walk_logits(model, ids.split(8)):                # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptqscale.errors import PTQScaleError

PLACEMENT_ATTR = "ptqscale_placement"
# The working set ``auto`` adds to the weights before it holds a model in one piece:
# activations, logits of a batch, a GPTQ Hessian. A heuristic; placement=one/streamed force it.
WORKING_FRACTION, WORKING_BYTES = 0.25, 2 * 2**30


class GPUMemoryBudgetError(PTQScaleError, RuntimeError):
    """A stage needed more CUDA memory than ``model.max_gpu_memory`` allows."""


@dataclass(frozen=True)
class Placement:
    """Where a model's weights wait (``streamed``: on the CPU) and where its blocks compute.

    A spread model has a ``device_map``, ``(module name, device)`` pairs (models/spread.py):
    ``device`` is then the first GPU (the input embedding's, where inputs and logits are)."""

    streamed: bool
    device: torch.device
    budget: int | None = None  # bytes the process may allocate on ``device`` (on each GPU: spread)
    device_map: tuple[tuple[str, str], ...] | None = None

    @property
    def spread(self) -> bool:
        return self.device_map is not None


def placement_of(model: nn.Module) -> Placement:
    """The model's :class:`Placement`; a model not loaded by ``load_model`` is in one piece."""
    found = getattr(model, PLACEMENT_ATTR, None)
    if found is not None:
        return found
    return Placement(False, next(model.parameters()).device)


def set_placement(model: nn.Module, placement: Placement) -> None:
    object.__setattr__(model, PLACEMENT_ATTR, placement)  # a plain attribute, not a submodule


def choose_streamed(mode: str, weight_bytes: int, device: torch.device,
                    budget: int | None) -> bool:
    """``placement`` -> streamed or not; ``auto`` streams when the weights plus a working margin
    exceed the budget (else the device's free memory). Nothing streams on a CPU device."""
    if mode != "auto" or device.type != "cuda":
        return mode == "streamed" and device.type != "meta"
    available = budget if budget is not None else torch.cuda.mem_get_info(device)[0]
    need = weight_bytes * (1 + WORKING_FRACTION) + WORKING_BYTES
    return need > available


def apply_memory_budget(device: torch.device, budget: int | None) -> None:
    """Cap the CUDA caching allocator of this process on ``device`` at ``budget`` bytes; no
    budget lifts the cap (a worker's earlier job may have set one)."""
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if budget is None else min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)  # wants an index, not "cuda"


@contextmanager
def within_budget(placement: Placement, what: str):
    """Turn an out-of-memory error under a budget into one that names the budget and stage."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if placement.budget is None:
            raise
        raise GPUMemoryBudgetError(
            f"{what} needed more than model.max_gpu_memory={placement.budget / 2**30:.2f} GiB on "
            f"{placement.device}; raise it, use model.placement=streamed, or lower the batch "
            f"size ({str(e).splitlines()[0][:200]})") from e


# ------------------------------------------------------------------ moving weights


def module_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers of ``modules`` (each once: tied weights are one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            seen.setdefault(id(t), t)
    return list(seen.values())


def outside_blocks(model: nn.Module, prefix: str, part: str) -> list[torch.Tensor]:
    """Tensors outside the decoder blocks that the ``stem`` (up to the first block: embeddings,
    rotary tables) or the ``head`` (after the last: final norm, output layer) needs.

    The stem leaves out the output layer, the head the input embedding (unless the two are
    tied): for a 128k vocabulary each is about 1 GB that a streamed model need not onload.
    """
    skip = model.get_output_embeddings() if part == "stem" else model.get_input_embeddings()
    keep = model.get_input_embeddings() if part == "stem" else model.get_output_embeddings()
    inside = {id(t) for t in module_tensors([model.get_submodule(prefix)])}
    if skip is not None:
        shared = {id(t) for t in module_tensors([keep])} if keep is not None else set()
        inside |= {id(t) for t in module_tensors([skip]) if id(t) not in shared}
    return [t for t in module_tensors([model]) if id(t) not in inside]


# Pinned (page-locked) host memory moves to a GPU several times faster than pageable memory
# and lets the copy run asynchronously; a streamed model's weights are pinned when they take
# at most this share of the host's available memory (pinned pages cannot be swapped out).
PIN_HOST_FRACTION = 0.5


def pin_host_weights(model: nn.Module, weight_bytes: int) -> bool:
    """Pin a streamed model's host weights for its CUDA device (no-op where that would take
    more than ``PIN_HOST_FRACTION`` of the available host memory, or where that is unknown).
    Values are unchanged; memory-mapped weights become pinned copies (``env.weights`` then
    says ``copied``): speed where the host has room, the mapping where it has not."""
    from ptqscale.models.mapped import available_host_bytes

    available = available_host_bytes()
    if available is None or weight_bytes > PIN_HOST_FRACTION * available:
        return False
    for t in module_tensors([model]):
        if t.device.type == "cpu" and not t.is_pinned():
            t.data = t.data.pin_memory()
    return True


def _go_home(t: torch.Tensor, home: torch.Tensor) -> None:
    """Write ``t``'s (changed) values back to where ``home`` waits; into ``home`` itself when
    it is pinned host memory (it stays pinned), else as a new tensor there."""
    if home.is_pinned() and home.shape == t.shape and home.dtype == t.dtype:
        home.copy_(t.data)
        t.data = home
    else:
        t.data = t.data.to(home.device)


@contextmanager
def onloaded(tensors: list[torch.Tensor], device: torch.device, write_back: bool = True):
    """Hold ``tensors`` on ``device`` for a ``with`` body (swapping their ``.data``).

    Afterwards each tensor returns to where it was: with ``write_back`` as a copy of what the
    body left (methods change weights), else as its untouched original (forward-only stages:
    no copy back, and memory-mapped weights stay mapped).
    """
    moved = [(t, t.data) for t in tensors if t.device != device]
    try:
        for t, home in moved:  # asynchronous from pinned memory, stream-ordered before use
            t.data = home.to(device, non_blocking=True)
        yield
    finally:
        for t, home in moved:
            if write_back:
                _go_home(t, home)
            else:
                t.data = home


def compute_on(device: torch.device):
    """A CUDA ``device`` made the current one for a ``with`` body (kernels that launch on the
    current device, such as Triton's, then find their tensors: a spread model's block on GPU 1
    while GPU 0 is current); a no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@contextmanager
def onloaded_block(block: nn.Module, device: torch.device):
    """``block`` on ``device`` (the current CUDA device there) for a ``with`` body that may
    change its weights (a method), then back where it was, changes included (also after an
    error); with a spill folder (``mapped.set_spill``) the changed weights then go to disk,
    memory-mapped."""
    from ptqscale.models.mapped import spill_changed

    try:
        with onloaded(module_tensors([block]), device, write_back=True), compute_on(device):
            yield block
    finally:
        spill_changed(block)


# ------------------------------------------------------------------ block inputs and passes


@dataclass
class BlockInputs:
    """Activations entering a block: per batch, the hidden states and the other arguments the
    model passes to every block (masks, position embeddings, ...)."""

    hidden: list[torch.Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def batches(self, device: torch.device):
        for x, a, kw in zip(self.hidden, self.args, self.kwargs, strict=True):
            yield x.to(device), to_device(a, device), to_device(kw, device)


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside tuples/lists/dicts moved to ``device``; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    def __init__(self, args, kwargs):
        super().__init__("block inputs captured")
        self.args, self.kwargs = args, kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block0: nn.Module, calibration: torch.Tensor,
                         batch_size: int, storage: torch.device) -> BlockInputs:
    """Inputs of ``block0`` for every batch of ``calibration`` (LongTensor [n, seqlen]).

    The model runs where its input embedding is (a streamed model: on its execution device,
    the layers before the first block onloaded for the pass); only those layers do work.
    Everything captured is moved to ``storage``.
    """
    from ptqscale.models.anatomy import decoder_blocks

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    placement = placement_of(model)
    stem = outside_blocks(model, decoder_blocks(model)[0], "stem") if placement.streamed else []
    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    inputs = BlockInputs([])
    with onloaded(stem, placement.device, write_back=False):
        device = model.get_input_embeddings().weight.device
        _capture(model, calibration, batch_size, storage, device, inputs, handle)
    return inputs


def _capture(model, calibration, batch_size, storage, device, inputs, handle) -> None:
    try:
        for ids in calibration.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured as cap:
                hidden, args, kwargs = _split_hidden(cap.args, cap.kwargs)
                inputs.hidden.append(hidden.to(storage))
                inputs.args.append(to_device(args, storage))
                inputs.kwargs.append(to_device(kwargs, storage))
            else:
                raise RuntimeError("the model's forward never called its first block")
    finally:
        handle.remove()


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (), kwargs
    raise RuntimeError("cannot find the hidden states among the first block's arguments")


def block_output(block: nn.Module, x, args, kwargs) -> torch.Tensor:
    """The hidden states a block returns (families return a tensor or a tuple led by it)."""
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device,
              storage: torch.device) -> BlockInputs:
    """The block's outputs for every batch: the next block's inputs (same extra arguments)."""
    hidden = [block_output(block, x, a, kw).to(storage) for x, a, kw in inputs.batches(device)]
    return BlockInputs(hidden, inputs.args, inputs.kwargs)


# ------------------------------------------------------------------ the streamed forward


class _Replay(nn.Module):
    """Stands in for a decoder block in the head pass: the first returns the stored final
    hidden states of the current batch, the others pass them on; in the block's output type."""

    def __init__(self, block: nn.Module, source: list | None, as_tuple: bool,
                 device: torch.device):
        super().__init__()
        self.source, self.as_tuple, self.device, self.batch = source, as_tuple, device, 0
        # plain attributes a family's forward may read off its blocks (attention_type, ...)
        for key, value in vars(block).items():
            if not key.startswith("_") and isinstance(value, str | int | float | bool):
                setattr(self, key, value)

    def forward(self, hidden_states, *args, **kwargs):
        if self.source is not None:  # onto the execution device: the stem may run elsewhere
            hidden_states = self.source[self.batch].to(self.device)
        return (hidden_states,) if self.as_tuple else hidden_states


@contextmanager
def _replaying(holder: nn.ModuleList, final: list[torch.Tensor], as_tuple: bool,
               device: torch.device):
    originals = list(holder)
    replays = [_Replay(block, final if i == 0 else None, as_tuple, device)
               for i, block in enumerate(originals)]
    try:
        for i, r in enumerate(replays):
            holder[i] = r
        yield replays[0]
    finally:
        for i, block in enumerate(originals):
            holder[i] = block


def hidden_storage(placement: Placement, n_tokens: int, hidden_size: int,
                   dtype: torch.dtype) -> torch.device:
    """Where a walk keeps the hidden states of all windows: on the execution device when two
    copies (a block's inputs and outputs) fit in a third of what is free there, else the CPU."""
    device = placement.device
    if device.type != "cuda":
        return device
    free = torch.cuda.mem_get_info(device)[0]
    if placement.budget is not None:
        free = min(free, placement.budget - torch.cuda.memory_allocated(device))
    need = 2 * n_tokens * hidden_size * torch.finfo(dtype).bits // 8
    return device if need <= free / 3 else torch.device("cpu")


# What a block computes with instead of some of its tensors: ``(tensor, values)`` pairs.
BlockTransform = Callable[[int, nn.Module], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@contextmanager
def _standing_in(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Each ``tensor`` holds ``values`` (its ``.data`` swapped, never written) for a body."""
    held = [t.data for t, _ in pairs]
    try:
        for t, values in pairs:
            t.data = values
        yield
    finally:
        for (t, _), data in zip(pairs, held, strict=True):
            t.data = data


def walk_logits(model: nn.Module, batches: list[torch.Tensor],
                placement: Placement | None = None,
                transform: BlockTransform | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(batch index, logits)`` for each batch of token ids (LongTensor [b, seqlen]), with the
    model walked block by block: all batches through block i, then block i+1.

    The weights stay where they wait; each block, and the layers outside the blocks for the
    first and last step, visit ``placement.device`` in turn. ``transform``: as in
    :func:`walk_variants`.
    """
    for _, i, logits in walk_variants(model, batches, [transform], placement):
        yield i, logits


@torch.no_grad()
def walk_variants(model: nn.Module, batches: list[torch.Tensor],
                  transforms: list[BlockTransform | None], placement: Placement | None = None
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(variant, batch index, logits)``: :func:`walk_logits` for several variants of the
    model at once, each block onloaded once for all of them (a small forward is bound by
    moving the weights, not by computing: the noise response's levels share one walk).

    ``transforms[v](i, block)``, called once block ``i`` is on the device, returns
    ``(tensor, values)`` pairs: variant ``v`` computes with ``values`` in place of those
    tensors (perturbed weights, made on the device); None: the block as it is. The tensors are
    never written, so the weights waiting on the CPU stay as they were. Each variant's
    batches see the arithmetic of a walk of their own.
    """
    from ptqscale.models.anatomy import decoder_blocks

    placement = placement or placement_of(model)
    device = placement.device
    prefix, holder = decoder_blocks(model)
    dtype = next(holder.parameters()).dtype
    n_tokens = sum(b.numel() for b in batches) * len(transforms)
    storage = hidden_storage(placement, n_tokens, model.config.hidden_size, dtype)
    with within_budget(placement, "the streamed forward"):
        # one capture pass (the stem onloaded once) cuts the very batches given
        size = batches[0].shape[0]
        if any(b.shape[0] != size for b in batches[:-1]) or batches[-1].shape[0] > size:
            raise ValueError("walk_logits: batches must all have the first one's size "
                             "(the last may be smaller)")
        captured = capture_block_inputs(model, holder[0], torch.cat(batches), size, storage)
        hidden = [captured.hidden] * len(transforms)  # the stem is the same for every variant
        as_tuple = False
        for b, block in enumerate(holder):
            with onloaded(module_tensors([block]), device, write_back=False):
                for v, transform in enumerate(transforms):
                    inputs = BlockInputs(hidden[v], captured.args, captured.kwargs)
                    hidden[v] = []
                    with _standing_in(list(transform(b, block)) if transform else []):
                        for x, a, kw in inputs.batches(device):
                            out = block(x, *a, **kw)
                            as_tuple = isinstance(out, tuple | list)
                            hidden[v].append((out[0] if as_tuple else out).to(storage))
        if placement.budget is not None and storage.type == "cuda":
            # under a budget the head pass needs the room (logits over the vocabulary)
            hidden = [[h.cpu() for h in hv] for hv in hidden]
        with onloaded(_head_tensors(model, prefix, holder[0], batches[0]), device,
                      write_back=False):
            embed_device = model.get_input_embeddings().weight.device
            for v, final in enumerate(hidden):
                with _replaying(holder, final, as_tuple, device) as first:
                    for i, ids in enumerate(batches):
                        first.batch = i
                        yield v, i, model(input_ids=ids.to(embed_device), use_cache=False).logits


def _head_tensors(model: nn.Module, prefix: str, block0: nn.Module,
                  ids: torch.Tensor) -> list[torch.Tensor]:
    """What the head pass onloads: the tensors of the modules outside the blocks that do not
    run before the first block (final norm, output layer). The layers before the first block
    then run where they wait (their output is replaced by the replay), unless the output layer
    shares the input embedding: then all."""
    stem, head = stem_and_head(model, prefix, block0, ids)
    tensors = module_tensors_direct(head)
    embedding = model.get_input_embeddings().weight
    if any(t is embedding for t in tensors):  # tied: the stem must run on the device too
        return module_tensors_direct(stem + head)
    return tensors


def stem_and_head(model: nn.Module, prefix: str, block0: nn.Module,
                  ids: torch.Tensor) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules outside the decoder blocks split into those that run before the first block
    (embeddings, rotary tables) and the others (final norm, output layer), found with hooks on
    a 2-token forward of ``ids`` that stops at the first block."""
    blocks = model.get_submodule(prefix)
    inside = {id(m) for m in blocks.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, a, o: ran.add(id(m))) for m in outside]
    try:
        capture_block_inputs(model, block0, ids[:1, :2], 1, torch.device("cpu"))
    finally:
        for h in hooks:
            h.remove()
    return ([m for m in outside if id(m) in ran], [m for m in outside if id(m) not in ran])


def module_tensors_direct(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Parameters and buffers that ``modules`` own themselves (not their children's), once."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            seen.setdefault(id(t), t)
    return list(seen.values())
