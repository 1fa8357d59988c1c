"""Triton kernels for linear attention (ditopt::linear_attention on CUDA).

Two passes over the tokens of each (batch, head):

* ``_kv_stats``: one program per (batch*head, block of key features): accumulates
  ``KV = phi(K)^T V`` ([D, Dv]) and ``z = sum_j phi(k_j)`` over the keys in BN-token blocks.
* ``_apply``: one program per (batch*head, BM queries): ``phi(q) KV / (phi(q) . z + eps)``.

The depthwise value convolution is a grouped ``conv2d`` (cuDNN) added by the launcher: it is
k*k multiply-adds per value channel, not worth a kernel of its own. Checked against
:func:`ditopt.kernels.linear_attention.linear_attention_reference` under the Triton interpreter
(TRITON_INTERPRET=1) on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear_attention import value_conv

from ._triton import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "linear_attention_triton"]

FEATURE_CODES = {"relu": 0, "elu": 1}


if HAS_TRITON:

    @triton.jit
    def _phi(x, FEATURE: tl.constexpr):
        if FEATURE == 0:
            return tl.maximum(x, 0.0)
        return tl.where(x > 0, x + 1.0, tl.exp(x))  # ELU + 1

    @triton.jit
    def _kv_stats(K, V, KV, Z, N, sk_bh, sk_n, sv_bh, sv_n, D: tl.constexpr, DV: tl.constexpr,
                  BN: tl.constexpr, FEATURE: tl.constexpr):
        bh = tl.program_id(0)
        rd = tl.arange(0, D)
        rv = tl.arange(0, DV)
        acc = tl.zeros((D, DV), dtype=tl.float32)
        z = tl.zeros((D,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            valid = rn < N
            k = tl.load(K + bh * sk_bh + rn[:, None] * sk_n + rd[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + bh * sv_bh + rn[:, None] * sv_n + rv[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            fk = tl.where(valid[:, None], _phi(k, FEATURE), 0.0)
            acc += tl.dot(tl.trans(fk), v, input_precision="ieee")
            z += tl.sum(fk, 0)
        tl.store(KV + bh * D * DV + rd[:, None] * DV + rv[None, :], acc)
        tl.store(Z + bh * D + rd, z)

    @triton.jit
    def _apply(Q, KV, Z, O, N, eps, sq_bh, sq_n, so_bh, so_n, D: tl.constexpr, DV: tl.constexpr,
               BM: tl.constexpr, FEATURE: tl.constexpr):
        bh = tl.program_id(0)
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rd = tl.arange(0, D)
        rv = tl.arange(0, DV)
        valid = rm < N
        q = tl.load(Q + bh * sq_bh + rm[:, None] * sq_n + rd[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        fq = _phi(q, FEATURE)
        kv = tl.load(KV + bh * D * DV + rd[:, None] * DV + rv[None, :])
        z = tl.load(Z + bh * D + rd)
        num = tl.dot(fq, kv, input_precision="ieee")
        den = tl.sum(fq * z[None, :], 1) + eps
        out = num / den[:, None]
        tl.store(O + bh * so_bh + rm[:, None] * so_n + rv[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])


def linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, conv_weight: Tensor, height: int, width: int,
                            n_text: int = 0, feature: str = "elu", eps: float = 1e-6,
                            block_n: int = 64, block_m: int = 64) -> Tensor:
    """q, k [B, H, N, D], v [B, H, N, Dv] (D and Dv powers of two >= 16) -> [B, H, N, Dv] in q's dtype."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    b, heads, n, d = q.shape
    dv = v.shape[-1]
    for name, size in (("head_dim", d), ("value head_dim", dv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"linear_attention_triton: {name} {size} must be a power of two >= 16")
    qc, kc, vc = (x.reshape(b * heads, n, x.shape[-1]).contiguous() for x in (q, k, v))
    kv = torch.empty(b * heads, d, dv, device=q.device, dtype=torch.float32)
    z = torch.empty(b * heads, d, device=q.device, dtype=torch.float32)
    code = FEATURE_CODES[feature]
    _kv_stats[(b * heads,)](kc, vc, kv, z, n, kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
                            D=d, DV=dv, BN=block_n, FEATURE=code)
    out = torch.empty(b * heads, n, dv, device=q.device, dtype=q.dtype)
    _apply[(b * heads, triton.cdiv(n, block_m))](qc, kv, z, out, n, eps, qc.stride(0), qc.stride(1), out.stride(0),
                                                 out.stride(1), D=d, DV=dv, BM=block_m, FEATURE=code)
    out = out.reshape(b, heads, n, dv)
    return (out.float() + value_conv(v.float(), conv_weight.float(), height, width, n_text)).to(q.dtype)
