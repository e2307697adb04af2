"""GPTQ's column loop (Alg. 1, inside one lazy block) as a single Triton kernel launch.

The torch loop (``gptq._columnwise_sweep``) launches about a dozen small kernels per column,
so on a GPU it is bound by launch latency (72% of a 1.1B model's GPTQ time, see
bench/results/bench_gptq.md). Rows are independent given ``Hinv``, so here each program holds
``BLOCK_R`` rows of the block in registers and walks its columns: round column i with its
group's frozen parameters (the format kernels' exact element rule, ``formats.kernels``),
scale the error by ``Hinv[i, i]`` and apply the OBS update to the columns after i. Same
algorithm, same operation order; only fused multiply-adds may round differently (tests compare
with the torch loop). Scale groups that are fitted lazily (not static) are fitted between
launches, on the up-to-date columns, exactly where the torch loop fits them.

Every rule the format kernels cover runs here: rounding needs only a group's frozen
parameters, which the kernel reads from two (rows, groups) tables (scale; zero point, or
NVFP4's tensor scale) and, for NF4, the level table. Per-tensor rules (``fp8_e4m3``,
``int8_t``) are one group fitted once, as in the torch loop.
"""

from __future__ import annotations

import torch

from ptqscale.formats import kernels as fk

BLOCK_R = 16


def supports(W: torch.Tensor, fmt, blocksize: int) -> bool:
    """Whether the kernel can run this sweep (CUDA, a covered format, a small lazy block)."""
    return (W.is_cuda and fk.available() and fk.kernel_spec(fmt) is not None
            and 1 <= blocksize <= 256)


def columnwise_sweep(W: torch.Tensor, Hinv: torch.Tensor, groups, blocksize: int):
    """``gptq._columnwise_sweep`` with the per-column work fused; returns ``(Q, loss)``."""
    from ptqscale.methods.gptq import current_values

    rows, columns = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    S = torch.ones(rows, groups.n_groups, dtype=torch.float32, device=W.device)
    Z = torch.zeros_like(S)
    filled: set[int] = set()
    gidx = torch.tensor(groups.group_at, dtype=torch.int32, device=W.device)
    spec = fk.kernel_spec(groups.fmt)
    consts = {k: spec[k] for k in ("KIND", "LO", "HI", "FRAC", "MBITS", "EMIN")}
    table = fk.nf4_table(W.device) if spec["KIND"] == fk.NF4 else S  # (others never read it)
    bs = fk.triton.next_power_of_2(blocksize)
    grid = (fk.triton.cdiv(rows, BLOCK_R),)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        pos = i1
        while pos < i2:  # segments end where a group must be fitted on up-to-date columns
            groups.params(pos, current_values(W, W1, Err1, Hinv, i1, pos - i1, groups.fit_rule))
            _fill(S, Z, groups, filled)
            end = pos + 1
            while end < i2 and groups.group_at[end] in groups.fitted:
                end += 1
            _block_kernel[grid](W1, Q1, Err1, Hinv1, S, Z, table, gidx[i1:i2], rows, i2 - i1,
                                groups.n_groups, pos - i1, end - i1,
                                BS=bs, BLOCK_R=BLOCK_R, **consts, num_warps=4)
            pos = end
        Q[:, i1:i2] = Q1
        loss += Err1.double().square().sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns
    return Q, float(loss)


def _fill(S: torch.Tensor, Z: torch.Tensor, groups, filled: set[int]) -> None:
    """Copy newly fitted group parameters into the kernel's (rows, groups) tables: the scale,
    and the zero point or (NVFP4) the tensor scale, where ``kernels_jit._round`` reads them."""
    for k, p in groups.fitted.items():
        if k not in filled:
            S[:, k] = p.scale.reshape(-1).to(torch.float32).expand(S.shape[0])
            second = p.zero if p.zero is not None else p.tensor_scale
            if second is not None:
                Z[:, k] = second.reshape(-1).to(torch.float32).expand(S.shape[0])
            filled.add(k)


if fk.triton is not None:
    tl = fk.jit.tl

    @fk.triton.jit
    def _block_kernel(W_ptr, Q_ptr, E_ptr, H_ptr, S_ptr, Z_ptr, T_ptr, G_ptr, rows, width,
                      n_groups, a, b, BS: tl.constexpr, BLOCK_R: tl.constexpr,
                      KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                      FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BS)
        rmask = r < rows
        offs = r[:, None] * width + c[None, :]
        tile_mask = rmask[:, None] & (c[None, :] < width)
        Wt = tl.load(W_ptr + offs, mask=tile_mask, other=0.0)
        for i in range(a, b):
            w = tl.sum(tl.where(c[None, :] == i, Wt, 0.0), axis=1)  # column i of the tile
            g = tl.load(G_ptr + i)
            s = tl.load(S_ptr + r * n_groups + g, mask=rmask, other=1.0)
            z = tl.load(Z_ptr + r * n_groups + g, mask=rmask, other=0.0)
            q = fk.jit._round(w, s, z, T_ptr, KIND, LO, HI, FRAC, MBITS, EMIN)
            err = tl.math.div_rn(w - q, tl.load(H_ptr + i * width + i))  # Eq. 3, Cholesky form
            h = tl.load(H_ptr + i * width + c, mask=(c >= i) & (c < width), other=0.0)
            Wt = Wt - err[:, None] * h[None, :]  # OBS update of columns i.. of the block
            tl.store(Q_ptr + r * width + i, q, mask=rmask)
            tl.store(E_ptr + r * width + i, err, mask=rmask)
        tl.store(W_ptr + offs, Wt, mask=tile_mask)
