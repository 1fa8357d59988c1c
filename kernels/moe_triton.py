"""Triton grouped GEMM for the routed-expert FFN (ditopt::moe_ffn on CUDA).

Rows arrive sorted by expert (`counts[e]` rows of expert e, in order). The host cuts each
expert's rows into BM-row tiles and lists, per tile, its expert and row range; one program per
(tile, BN columns) multiplies its rows by that expert's [K, N] weight, adding the expert's bias.
No padding between experts, and no program for an expert without tokens. Checked against the
torch loop under the Triton interpreter (TRITON_INTERPRET=1) on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "grouped_matmul_triton", "grouped_matmul_reference", "tile_schedule"]

BM, BN, BK = 32, 32, 32


if HAS_TRITON:

    @triton.jit
    def _grouped_mm(X, W, B, Y, TILE_E, TILE_LO, TILE_HI, N, K,
                    sxm, sxk, swe, swk, swn, sbe, sym, syn,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        t = tl.program_id(0)
        pn = tl.program_id(1)
        e = tl.load(TILE_E + t)
        lo = tl.load(TILE_LO + t)
        hi = tl.load(TILE_HI + t)
        rm = lo + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mmask = rm < hi
        nmask = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            kmask = kk < K
            x = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk, mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(W + e * swe + kk[:, None] * swk + rn[None, :] * swn, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(B + e * sbe + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def tile_schedule(counts: Tensor, bm: int = BM) -> tuple[Tensor, Tensor, Tensor]:
    """Per BM-row tile of the expert-sorted rows: (expert, first row, end row)."""
    es, los, his = [], [], []
    start = 0
    for e, n in enumerate(counts.tolist()):
        for lo in range(start, start + n, bm):
            es.append(e)
            los.append(lo)
            his.append(min(lo + bm, start + n))
        start += n
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=counts.device)  # noqa: E731
    return as_t(es), as_t(los), as_t(his)


def grouped_matmul_triton(rows: Tensor, weight: Tensor, counts: Tensor, bias: Tensor | None) -> Tensor:
    """rows [M, K] sorted by expert, weight [E, K, N], counts [E], bias [E, N] or None -> [M, N]."""
    if not HAS_TRITON:
        raise RuntimeError("grouped_matmul_triton needs triton (pip install triton)")
    m, k = rows.shape
    n = weight.shape[2]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    te, tlo, thi = tile_schedule(counts)
    if te.numel() == 0:
        return out
    b = bias if bias is not None else out  # unused pointer when HAS_BIAS is false
    grid = (te.numel(), triton.cdiv(n, BN))
    _grouped_mm[grid](rows, weight, b, out, te, tlo, thi, n, k,
                      rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
                      b.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
                      HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK)
    return out


def grouped_matmul_reference(rows: Tensor, weight: Tensor, counts: Tensor, bias: Tensor | None) -> Tensor:
    """The same product with one torch GEMM per expert."""
    out = rows.new_empty(rows.shape[0], weight.shape[2])
    start = 0
    for e, n in enumerate(counts.tolist()):
        out[start:start + n] = rows[start:start + n] @ weight[e] + (bias[e] if bias is not None else 0)
        start += n
    return out
