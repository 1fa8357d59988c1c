"""Triton kernels for neighbourhood and block-sparse (PISA) attention.

Used for CUDA tensors by the ``ditopt::`` custom ops.  On machines without a GPU they run
under the Triton interpreter (``TRITON_INTERPRET=1``, which must be set before ``triton`` is
imported) on CPU tensors -- that is how the tests check them against the float64 references.

Both kernels handle image queries only; text queries (MMDiT prefix) attend densely and are
computed by ``torch.nn.functional.scaled_dot_product_attention`` in the launcher.

* ``_nbhd_fwd``: one program per (batch*head, query tile).  Loops over the KY x KX key tiles
  of the clamped window (tile-major layout, partial edge tiles handled with masks computed
  from the tile geometry), then over the text keys in blocks, with an online softmax and
  ``tl.dot`` for Q K^T and P V.
* ``_pisa_fwd``: one program per (batch*head, query block).  Exact online softmax over the
  selected key blocks (indices precomputed by :func:`ditopt.kernels.block_sparse.select_blocks`)
  and the text keys, then the first-order compensation of every unselected block
  (``w_j (vs_j + scale q H_j)``, ``w_j n_j``) folded into the same running max.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton

__all__ = ["HAS_TRITON", "neighborhood_attention_triton", "block_sparse_attention_triton"]


if HAS_TRITON:

    @triton.jit
    def _tile_tokens(ty, tx, offs, H, W, T: tl.constexpr):
        """Image-relative token positions and validity of the tile's (padded) T*T slots."""
        th = tl.minimum(T, H - ty * T)
        tw = tl.minimum(T, W - tx * T)
        iy = offs // T
        ix = offs % T
        valid = (offs < T * T) & (iy < th) & (ix < tw)
        pos = ty * T * W + tx * T * th + iy * tw + ix
        return pos, valid

    @triton.jit
    def _online_softmax_step(q, kt, vt, kvalid, scale, m_i, l_i, acc):
        """One key tile of flash attention: fold softmax(q kt^T) vt into the running max m_i,
        normaliser l_i and accumulator acc (keys where kvalid is false get no weight)."""
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
        s = tl.where(kvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        return m_new, l_i, acc

    @triton.jit
    def _attend_text(q, kbase, vbase, skn, svn, offs_d, dmask, N_TEXT, scale, m_i, l_i, acc,
                     BLOCK_T: tl.constexpr):
        """The text keys (the first N_TEXT tokens), which every image query sees exactly."""
        offs_t = tl.arange(0, BLOCK_T)
        for t0 in range(0, N_TEXT, BLOCK_T):
            tpos = t0 + offs_t
            tvalid = tpos < N_TEXT
            tmask = tvalid[:, None] & dmask[None, :]
            kt = tl.load(kbase + tpos[:, None] * skn + offs_d[None, :], mask=tmask, other=0.0)
            vt = tl.load(vbase + tpos[:, None] * svn + offs_d[None, :], mask=tmask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(q, kt, vt, tvalid, scale, m_i, l_i, acc)
        return m_i, l_i, acc

    @triton.jit
    def _nbhd_fwd(Q, K, V, O,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                  NH, H, W, TH, TW, KY, KX, R, N_TEXT, scale,
                  T: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                  BLOCK_T: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_t = tl.program_id(1)
        b = pid_bh // NH
        hh = pid_bh % NH
        ty = pid_t // TW
        tx = pid_t % TW
        offs = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qpos, qvalid = _tile_tokens(ty, tx, offs, H, W, T)
        qptr = Q + b * sqb + hh * sqh + (N_TEXT + qpos)[:, None] * sqn + offs_d[None, :]
        q = tl.load(qptr, mask=qvalid[:, None] & dmask[None, :], other=0.0)
        m_i = tl.zeros([BLOCK], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        sy = tl.minimum(tl.maximum(ty - R, 0), TH - KY)
        sx = tl.minimum(tl.maximum(tx - R, 0), TW - KX)
        kbase = K + b * skb + hh * skh
        vbase = V + b * svb + hh * svh
        for dy in range(0, KY):
            for dx in range(0, KX):
                kpos, kvalid = _tile_tokens(sy + dy, sx + dx, offs, H, W, T)
                kmask = kvalid[:, None] & dmask[None, :]
                kt = tl.load(kbase + (N_TEXT + kpos)[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
                vt = tl.load(vbase + (N_TEXT + kpos)[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
                m_i, l_i, acc = _online_softmax_step(q, kt, vt, kvalid, scale, m_i, l_i, acc)
        m_i, l_i, acc = _attend_text(q, kbase, vbase, skn, svn, offs_d, dmask, N_TEXT, scale, m_i, l_i, acc, BLOCK_T)
        out = acc / l_i[:, None]
        optr = O + b * sob + hh * soh + (N_TEXT + qpos)[:, None] * son + offs_d[None, :]
        tl.store(optr, out, mask=qvalid[:, None] & dmask[None, :])

    @triton.jit
    def _pisa_fwd(Q, K, V, O, IDX, SEL, KC, VS, CNT, HM,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                  NH, M, NB, KSEL, N_TEXT, scale,
                  BS: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                  COMPENSATE: tl.constexpr):
        pid_bh = tl.program_id(0)
        i = tl.program_id(1)
        b = pid_bh // NH
        hh = pid_bh % NH
        offs = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qpos = i * BS + offs
        qvalid = qpos < M
        q = tl.load(Q + b * sqb + hh * sqh + (N_TEXT + qpos)[:, None] * sqn + offs_d[None, :],
                    mask=qvalid[:, None] & dmask[None, :], other=0.0)
        m_i = tl.zeros([BS], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BS], dtype=tl.float32)
        acc = tl.zeros([BS, BLOCK_D], dtype=tl.float32)
        kbase = K + b * skb + hh * skh
        vbase = V + b * svb + hh * svh
        # exact part: selected blocks
        for s_i in range(0, KSEL):
            j = tl.load(IDX + (pid_bh * NB + i) * KSEL + s_i)
            kpos = j * BS + offs
            kvalid = kpos < M
            kmask = kvalid[:, None] & dmask[None, :]
            kt = tl.load(kbase + (N_TEXT + kpos)[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
            vt = tl.load(vbase + (N_TEXT + kpos)[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(q, kt, vt, kvalid, scale, m_i, l_i, acc)
        # exact part: text keys
        m_i, l_i, acc = _attend_text(q, kbase, vbase, skn, svn, offs_d, dmask, N_TEXT, scale, m_i, l_i, acc, BLOCK_T)
        # first-order compensation of the unselected blocks, same running max
        if COMPENSATE:
            for j in range(0, NB):
                sel = tl.load(SEL + (pid_bh * NB + i) * NB + j)
                kc = tl.load(KC + (pid_bh * NB + j) * D + offs_d, mask=dmask, other=0.0)
                vs = tl.load(VS + (pid_bh * NB + j) * D + offs_d, mask=dmask, other=0.0)
                cnt = tl.load(CNT + j)
                hm = tl.load(HM + (pid_bh * NB + j) * D * D + offs_d[:, None] * D + offs_d[None, :],
                             mask=dmask[:, None] & dmask[None, :], other=0.0)
                a = tl.sum(q * kc[None, :], 1) * scale
                a = tl.where(sel != 0, float("-inf"), a)
                m_new = tl.maximum(m_i, a)
                alpha = tl.exp(m_i - m_new)
                w = tl.exp(a - m_new)
                qh = tl.dot(q, hm, input_precision="ieee")
                acc = acc * alpha[:, None] + w[:, None] * (vs[None, :] + scale * qh)
                l_i = l_i * alpha + w * cnt
                m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + b * sob + hh * soh + (N_TEXT + qpos)[:, None] * son + offs_d[None, :], out,
                 mask=qvalid[:, None] & dmask[None, :])


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def neighborhood_attention_triton(q, k, v, height: int, width: int, tile: int = 8, radius: int = 1,
                                  n_text: int = 0, scale: Optional[float] = None) -> torch.Tensor:
    """Triton neighbourhood attention (same semantics as the reference).  fp32 accumulation."""
    _require_triton()
    B, Hh, N, D = q.shape
    if N != n_text + height * width:
        raise ValueError("N != n_text + height*width")
    scale = D ** -0.5 if scale is None else float(scale)
    TH, TW = -(-height // tile), -(-width // tile)
    KY, KX = min(2 * radius + 1, TH), min(2 * radius + 1, TW)
    out = torch.empty(B, Hh, N, D, device=q.device, dtype=q.dtype)
    grid = (B * Hh, TH * TW)
    _nbhd_fwd[grid](q, k, v, out,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                    Hh, height, width, TH, TW, KY, KX, radius, n_text, scale,
                    T=tile, BLOCK=_pow2(tile * tile), BLOCK_D=_pow2(D), D=D, BLOCK_T=32)
    if n_text:
        out[:, :, :n_text] = F.scaled_dot_product_attention(q[:, :, :n_text], k, v, scale=scale)
    return out


def block_sparse_attention_triton(q, k, v, block_size: int = 64, rho: float = 0.25, n_text: int = 0,
                                  include_diagonal: bool = True, scale: Optional[float] = None,
                                  eps: float = 1e-6, compensate: bool = True) -> torch.Tensor:
    """Triton PISA attention; block statistics and selection come from PyTorch."""
    _require_triton()
    from .block_sparse import block_stats, select_blocks
    B, Hh, N, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError("the Triton kernel needs a power-of-two block_size >= 16")
    M = N - n_text
    qi, ki, vi = q[:, :, n_text:], k[:, :, n_text:], v[:, :, n_text:]
    kc, vs, cnt, Hm = block_stats(ki.float(), vi.float(), block_size)
    idx, selected = select_blocks(qi.float(), kc, Hm, block_size, rho, scale, eps, include_diagonal)
    nb = kc.shape[2]
    ksel = idx.shape[-1]
    out = torch.empty(B, Hh, N, D, device=q.device, dtype=q.dtype)
    grid = (B * Hh, nb)
    _pisa_fwd[grid](q, k, v, out,
                    idx.to(torch.int32).contiguous(), selected.to(torch.int8).contiguous(),
                    kc.contiguous(), vs.contiguous(), cnt.contiguous(), Hm.contiguous(),
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                    Hh, M, nb, ksel, n_text, scale,
                    BS=block_size, BLOCK_D=_pow2(D), D=D, BLOCK_T=32,
                    COMPENSATE=bool(compensate and ksel < nb))
    if n_text:
        out[:, :, :n_text] = F.scaled_dot_product_attention(q[:, :, :n_text], k, v, scale=scale)
    return out
