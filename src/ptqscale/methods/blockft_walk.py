"""The window walk of block-wise fine-tuning: which blocks learn, against which target.

A *window* is ``(trainable blocks, target block, advance)``. The trainable blocks' learned
quantizers (:class:`~ptqscale.methods.blockft_quant.LearnedWeight`) are optimised so that the
chain ``trainable blocks -> (fixed blocks) -> target block``, fed with the QUANTIZED model's
activations at the window's first block (the outputs of the already-quantized earlier blocks,
as GPTQ's default), reproduces the FULL-PRECISION model's output of the target block computed
from full-precision inputs. Then the first ``advance`` blocks are final: their quantized
weights are written into the model and both activation streams move past them.

- single:      ``([i], i, 1)`` for every block ``i``;
- joint k, s:  ``([i .. i+k-1], i+k-1, s)`` for ``i = 0, s, 2s, ...`` until the window reaches
  the last block (truncated there); with ``s < k`` a block is tuned again, from where it was,
  in the next window;
- downstream m: ``([i], min(i+m, n-1), 1)``: blocks ``i+1 .. i+m`` are held fixed at their
  current weights, which are the full-precision ones (they are quantized later). This is our
  reading of Shabanovi et al. 2024's "error measured at the outputs of later blocks"; near the
  end of the model the error is measured at the last block's output.

Until a block is final the module keeps its full-precision weights (the full-precision
stream and the fixed blocks read them); the quantized weights enter forwards through
``torch.func.functional_call``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ptqscale import console
from ptqscale.methods.blockft_quant import LearnedWeight, gptq_with_params
from ptqscale.methods.capture import BlockInputs, collect_hessians, input_groups


@dataclass(frozen=True)
class Window:
    trainable: tuple[int, ...]
    target: int
    advance: int

    @property
    def first(self) -> int:
        return self.trainable[0]

    @property
    def last_needed(self) -> int:
        """The last block any forward of this window runs."""
        return max(self.target, self.first + self.advance - 1)


def plan_windows(n: int, variant: str, window: int, stride: int, downstream: int) -> list[Window]:
    """The windows of a model with ``n`` blocks (every block is final after the last one).

    Example:
        >>> [(w.trainable, w.target, w.advance) for w in plan_windows(4, "joint", 3, 2, 0)]
        [((0, 1, 2), 2, 2), ((2, 3), 3, 2)]
    """
    if variant == "single":
        return [Window((i,), i, 1) for i in range(n)]
    if variant == "downstream":
        return [Window((i,), min(i + downstream, n - 1), 1) for i in range(n)]
    out = []
    for start in range(0, n, stride):
        end = min(start + window, n)
        out.append(Window(tuple(range(start, end)), end - 1, stride if end < n else n - start))
        if end == n:
            break
    return out


def forward_block(block: nn.Module, weights: dict | None, x, args, kwargs) -> torch.Tensor:
    """The block's hidden-state output, with ``weights`` replacing some of its parameters."""
    if weights:
        out = torch.func.functional_call(block, weights, (x, *args), kwargs)
    else:
        out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


class BlockFT:
    """The walk over windows; ``run()`` quantizes the model in place and returns the records.

    ``targets[i]`` maps names relative to block ``i`` to full names of the selected linears.
    """

    def __init__(self, blocks, targets: list[dict[str, str]], block_order, cfg, fmt, device,
                 storage):
        self.blocks, self.targets, self.block_order = blocks, targets, block_order
        self.cfg, self.fmt, self.device, self.storage = cfg, fmt, device, storage
        self.state: dict[int, dict[str, LearnedWeight]] = {}
        self.layers: list[dict] = []
        self.windows: list[dict] = []
        self.finalize = None  # set by the caller: (block index, {rel: LearnedWeight}) -> None

    def run(self, inputs: BlockInputs, windows: list[Window], progress: bool = False) -> None:
        x_q = x_fp = inputs
        for w in console.progress(windows, self.cfg.name, progress, unit="window"):
            home = [next(self.blocks[b].parameters()).device for b in range(w.first,
                                                                            w.last_needed + 1)]
            for b in range(w.first, w.last_needed + 1):
                self.blocks[b].to(self.device)
            try:
                x_q, x_fp = self._window(w, x_q, x_fp)
            finally:
                for b, h in zip(range(w.first, w.last_needed + 1), home, strict=True):
                    self.blocks[b].to(h)

    def _window(self, w: Window, x_q: BlockInputs, x_fp: BlockInputs):
        t0 = time.perf_counter()
        last = w.first + w.advance - 1
        more = last < len(self.blocks) - 1
        target, x_fp_next = self._fp_pass(w, x_fp, keep=last if more else None)
        self._init(w, x_q)
        record = self._train(w, x_q, target)
        x_q_next = self._q_pass(range(w.first, last + 1), x_q) if more else None
        for b in range(w.first, last + 1):
            self.finalize(b, self.state.pop(b, {}))
        record["seconds"] = time.perf_counter() - t0
        self.windows.append(record)
        return x_q_next, x_fp_next

    # ---- the two activation streams ------------------------------------------------------
    @torch.no_grad()
    def _fp_pass(self, w: Window, x_fp: BlockInputs, keep: int | None):
        """Full-precision outputs of the target block and (``keep``) of block ``keep``."""
        targets, kept = [], []
        for x, a, kw in x_fp.batches(self.device):
            for b in range(w.first, max(w.target, keep or 0) + 1):
                x = forward_block(self.blocks[b], None, x, a, kw)
                if b == w.target:
                    targets.append(x.to(self.storage))
                if b == keep:
                    kept.append(x.to(self.storage))
        make = lambda hidden: BlockInputs(hidden, x_fp.args, x_fp.kwargs)  # noqa: E731
        target = make(targets)
        if keep is None:
            return target, None
        return target, (target if keep == w.target else make(kept))

    def weights(self, b: int) -> dict[str, torch.Tensor] | None:
        """Quantized weights of block ``b`` from its learned quantizers (None: none yet)."""
        if b not in self.state:
            return None
        return {f"{rel}.weight": lw().to(lw.weight.dtype) for rel, lw in self.state[b].items()}

    @torch.no_grad()
    def _q_pass(self, blocks, x_q: BlockInputs) -> BlockInputs:
        hidden = []
        for x, a, kw in x_q.batches(self.device):
            for b in blocks:
                x = forward_block(self.blocks[b], self.weights(b), x, a, kw)
            hidden.append(x.to(self.storage))
        return BlockInputs(hidden, x_q.args, x_q.kwargs)

    # ---- initialisation --------------------------------------------------------------------
    def _init(self, w: Window, x_q: BlockInputs) -> None:
        """Learned quantizers for the window's new blocks, from RTN or from GPTQ."""
        x = x_q
        for k, b in enumerate(w.trainable):
            if b not in self.state:
                self.state[b] = (self._init_gptq(b, x) if self.cfg.init == "gptq"
                                 else self._init_rtn(b))
            if self.cfg.init == "gptq" and k + 1 < len(w.trainable):
                x = self._q_pass([b], x)  # GPTQ of the next block sees this one quantized

    def _init_rtn(self, b: int) -> dict[str, LearnedWeight]:
        block = self.blocks[b]
        return {rel: LearnedWeight.from_rtn(block.get_submodule(rel).weight.data, self.fmt,
                                            self.cfg.learn_scale, self.cfg.offset_bound)
                for rel in self.targets[b]}

    @torch.no_grad()
    def _init_gptq(self, b: int, inputs: BlockInputs) -> dict[str, LearnedWeight]:
        """GPTQ with its reference defaults (true-sequential, quantized inputs, no act-order),
        keeping each scale group's parameters; the module gets its fp weights back."""
        block, wanted = self.blocks[b], self.targets[b]
        learned, saved = {}, {}
        try:
            for group in input_groups(block, self.block_order, inputs):
                names = [r for r in group if r in wanted]
                if not names:
                    continue
                hessians, _ = collect_hessians(block, [group], inputs, self.device)
                H, _tokens = hessians[group[0]]
                if H is None:
                    raise RuntimeError(
                        f"blockft: no calibration token reached {group[0]} of block {b} (an "
                        "MoE expert the router never chose); use more calibration samples, or "
                        "gptq/rtn, which round such experts to nearest")
                for rel in names:
                    weight = block.get_submodule(rel).weight
                    saved[rel] = weight.data.clone()
                    Q, fits, _info = gptq_with_params(saved[rel], H, self.fmt, self.cfg.percdamp,
                                                      self.cfg.gptq_blocksize)
                    learned[rel] = LearnedWeight.from_fitted(
                        saved[rel], Q, self.fmt, fits, self.cfg.learn_scale, self.cfg.offset_bound)
                    weight.data.copy_(Q)  # the next group's Hessian sees this one quantized
        finally:
            for rel, W in saved.items():
                block.get_submodule(rel).weight.data.copy_(W)
        return learned

    # ---- training --------------------------------------------------------------------------
    def _chain(self, w: Window, x, a, kw) -> torch.Tensor:
        for b in range(w.first, w.target + 1):
            x = forward_block(self.blocks[b], self.weights(b) if b in w.trainable else None,
                              x, a, kw)
        return x

    @torch.no_grad()
    def _loss(self, w: Window, x_q: BlockInputs, target: BlockInputs) -> tuple[float, float]:
        """Squared error of the chain's output over all calibration batches: (mean, relative)."""
        err = energy = count = 0.0
        for (x, a, kw), y in zip(x_q.batches(self.device), target.hidden, strict=True):
            y = y.to(self.device, torch.float32)
            err += float((self._chain(w, x, a, kw).float() - y).square().sum())
            energy += float(y.square().sum())
            count += y.numel()
        return err / count, (err / energy if energy > 0 else 0.0)

    def _train(self, w: Window, x_q: BlockInputs, target: BlockInputs) -> dict:
        cfg = self.cfg
        learned = [lw for b in w.trainable for lw in self.state[b].values()]
        record = {"blocks": list(w.trainable), "target": w.target, "linears": len(learned)}
        record["loss_before"], record["rel_before"] = self._loss(w, x_q, target)
        if not learned or cfg.iters == 0:
            record.update(loss_after=record["loss_before"], rel_after=record["rel_before"],
                          kept="before")
            return record
        before = [(lw.V.detach().clone(), lw.gamma.detach().clone()) for lw in learned]
        groups = [{"params": [lw.V for lw in learned], "lr": cfg.lr}]
        if any(lw.learn_scale for lw in learned):
            groups.append({"params": [lw.gamma for lw in learned if lw.learn_scale],
                           "lr": cfg.scale_lr})
        opt = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + w.first)
        nb = len(x_q.hidden)
        order: list[int] = []
        with torch.enable_grad():
            for _ in range(cfg.iters):
                if not order:
                    order = torch.randperm(nb, generator=gen).tolist()
                i = order.pop()
                x, a, kw = next(BlockInputs([x_q.hidden[i]], [x_q.args[i]],
                                            [x_q.kwargs[i]]).batches(self.device))
                y = target.hidden[i].to(self.device, torch.float32)
                loss = (self._chain(w, x, a, kw).float() - y).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        record["loss_after"], record["rel_after"] = self._loss(w, x_q, target)
        record["loss_tuned"], record["kept"] = record["loss_after"], "after"
        if cfg.keep_best and record["loss_after"] > record["loss_before"]:
            record["loss_after"], record["rel_after"] = record["loss_before"], record["rel_before"]
            with torch.no_grad():  # fine-tuning made the calibration error worse: undo it
                for lw, (V, gamma) in zip(learned, before, strict=True):
                    lw.V.copy_(V)
                    lw.gamma.copy_(gamma)
            record["kept"] = "before"
        return record
