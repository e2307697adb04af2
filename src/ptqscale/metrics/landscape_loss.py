"""The landscape's loss and its plumbing: the mean next-token NLL over token windows, the
window budget, target checks, the fp32 measuring context, and NLLs of shifted weights for
both placements (in one piece and streamed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import hessian as hs
from .hessian_streamed import names_in_blocks
from .landscape_config import LandscapeConfig


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
