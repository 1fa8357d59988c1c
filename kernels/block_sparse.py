"""Block-sparse top-rho attention with first-order compensation (PISA).

Token layout: ``q, k, v`` are ``[B, heads, N, D]``, ``N = n_text + M``: an optional prefix of
``n_text`` global (text) tokens, then ``M`` image tokens (in tile-major order, so a block of
``block_size = tile*tile`` consecutive tokens is a 2-D tile; the last block may be partial).

Per image key block j: ``kc_j = mean k``, ``vs_j = sum v``, ``n_j = count`` and
``H_j = sum_i (k_i - kc_j)^T v_i`` (D x D).  Per image query block i (same partition) with
centroid ``qc_i``: the ``ceil(rho * nb)`` key blocks with the largest
``softmax_j(scale * qc_i . kc_j + log(||H_j||_F + eps))`` are *selected* (softmax is monotone,
so this is a top-k of the logits).  With ``include_diagonal=True`` (default) block i itself
is always among them (it replaces the lowest-ranked pick; the count stays ``ceil(rho*nb)``):
the diagonal block holds the query's own 2-D neighbourhood core, and in practice it is what
first-order compensation approximates worst.

For every image query q:

* selected blocks and all text keys: exact ``exp(scale q.k_i - m)``;
* every unselected block j: numerator ``+= w_j (vs_j + scale * q H_j)``, denominator
  ``+= w_j n_j`` with ``w_j = exp(scale q.kc_j - m)`` -- the first-order expansion
  ``exp(s q.k) ~ exp(s q.kc)(1 + s q.(k - kc))`` summed over the block (the first-order term
  of the denominator vanishes because ``sum_i (k_i - kc) = 0``);
* one max ``m`` over both parts.

Text queries attend densely to all keys.  ``compensate=False`` gives plain top-rho dropping.
With ``rho = 1`` every block is selected and the result is dense attention.

CPU cost note: the compensation costs ``N * nb * D^2`` multiply-adds (one GEMM over the outer
product ``w (x) q``), about half of dense attention when ``D == block_size``; on CPU the
vectorized path is therefore NOT faster than dense SDPA (64x64 grid, 4x64 heads, rho=0.25,
loaded 2-core box: dense 452 ms, compensated 1442 ms, plain top-rho dropping 521 ms).  Its
purpose is correctness/portability; the speed path is the Triton kernel on GPU.

Implementations: :func:`block_sparse_attention_reference` (dense formulation, float64),
:func:`block_sparse_attention_cpu` (vectorized PyTorch: gather of the selected blocks +
ATen CPU flash attention with log-sum-exp, compensation as GEMMs, exact LSE merge) and the
Triton kernel in :mod:`ditopt.kernels.triton_kernels`.  All share :func:`block_stats` and
:func:`select_blocks`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "num_selected",
    "block_stats",
    "select_blocks",
    "block_sparse_attention_reference",
    "block_sparse_attention_cpu",
]

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def num_selected(num_blocks: int, rho: float) -> int:
    """``ceil(rho * num_blocks)`` clamped to ``[1, num_blocks]``."""
    return max(1, min(num_blocks, int(math.ceil(rho * num_blocks - 1e-9))))


def _blocks(x: torch.Tensor, bs: int) -> Tuple[torch.Tensor, int]:
    """[B, h, M, D] -> zero-padded [B, h, nb, bs, D]."""
    B, Hh, M, D = x.shape
    nb = -(-M // bs)
    pad = nb * bs - M
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, Hh, nb, bs, D), nb


def block_stats(k_img: torch.Tensor, v_img: torch.Tensor, block_size: int):
    """Key-block statistics of image keys ``[B, h, M, D]``.

    Returns ``kc [B,h,nb,D]`` (mean key), ``vs [B,h,nb,D]`` (sum of values), ``n [nb]`` (token
    count, float) and ``H [B,h,nb,D,D]`` with ``H_j = sum_i (k_i - kc_j)^T v_i``."""
    M = k_img.shape[2]
    kb, nb = _blocks(k_img, block_size)
    vb, _ = _blocks(v_img, block_size)
    n = torch.full((nb,), float(block_size), dtype=k_img.dtype, device=k_img.device)
    n[-1] = M - (nb - 1) * block_size
    kc = kb.sum(3) / n[:, None]
    vs = vb.sum(3)
    # pad rows of v are zero, so they add nothing to H even though (k - kc) != 0 there
    Hm = torch.matmul((kb - kc.unsqueeze(3)).transpose(-1, -2), vb)
    return kc, vs, n, Hm


def select_blocks(q_img: torch.Tensor, kc: torch.Tensor, Hm: torch.Tensor, block_size: int,
                  rho: float, scale: float, eps: float = 1e-6, include_diagonal: bool = True):
    """Top-rho key blocks per image query block.

    Returns ``idx [B,h,nb,ksel]`` (LongTensor, sorted ascending) and ``selected [B,h,nb,nb]``
    (bool)."""
    M = q_img.shape[2]
    qb, nb = _blocks(q_img, block_size)
    cnt = torch.full((nb,), float(block_size), dtype=q_img.dtype, device=q_img.device)
    cnt[-1] = M - (nb - 1) * block_size
    qc = qb.sum(3) / cnt[:, None]
    hn = torch.linalg.matrix_norm(Hm)  # Frobenius, [B,h,nb]
    logits = scale * torch.matmul(qc, kc.transpose(-1, -2)) + torch.log(hn + eps).unsqueeze(-2)
    if include_diagonal:
        eye = torch.eye(nb, dtype=torch.bool, device=q_img.device)
        logits = logits.masked_fill(eye, float("inf"))
    ksel = num_selected(nb, rho)
    idx = torch.topk(logits, ksel, dim=-1).indices.sort(-1).values
    selected = torch.zeros(logits.shape, dtype=torch.bool, device=q_img.device)
    selected.scatter_(-1, idx, True)
    return idx, selected


def block_sparse_attention_reference(q, k, v, block_size: int = 64, rho: float = 0.25, n_text: int = 0,
                                     include_diagonal: bool = True, scale: Optional[float] = None,
                                     eps: float = 1e-6, compensate: bool = True,
                                     dtype: torch.dtype = torch.float64, selected: Optional[torch.Tensor] = None):
    """Straightforward dense formulation (token-level masks, float64 by default); returns ``dtype``.

    ``selected`` (optional ``[B,h,nb,nb]`` bool) overrides the block selection."""
    B, Hh, N, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    qi, ki, vi = q[:, :, n_text:], k[:, :, n_text:], v[:, :, n_text:]
    M = N - n_text
    kc, vs, n, Hm = block_stats(ki, vi, block_size)
    if selected is None:
        _, selected = select_blocks(qi, kc, Hm, block_size, rho, scale, eps, include_diagonal)
    blk = torch.arange(M, device=q.device) // block_size
    # token-level mask [B,h,M(query), N(key)]
    sel_tok = selected[:, :, blk][:, :, :, blk]
    mask = torch.cat([torch.ones(B, Hh, M, n_text, dtype=torch.bool, device=q.device), sel_tok], -1)
    s = torch.matmul(qi, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    unsel = ~selected[:, :, blk]                          # [B,h,M,nb]
    a = (torch.matmul(qi, kc.transpose(-1, -2)) * scale).masked_fill(~unsel, float("-inf"))
    if not compensate:
        a = torch.full_like(a, float("-inf"))
    m = torch.maximum(s.amax(-1), a.amax(-1)).unsqueeze(-1)
    p = torch.exp(s - m)
    w = torch.exp(a - m)                                  # [B,h,M,nb]
    qH = torch.einsum("bhmd,bhjde->bhmje", qi, Hm)        # [B,h,M,nb,D]
    num = torch.matmul(p, v) + torch.matmul(w, vs) + scale * torch.einsum("bhmj,bhmje->bhme", w, qH)
    den = p.sum(-1, keepdim=True) + torch.matmul(w, n.unsqueeze(-1))
    out_img = num / den
    if n_text == 0:
        return out_img
    out_txt = torch.softmax(torch.matmul(q[:, :, :n_text], k.transpose(-1, -2)) * scale, -1) @ v
    return torch.cat([out_txt, out_img], 2)


def _compensation(qb, kc, vs, n, Hm, selected, scale, chunk_elems: int = 1 << 21):
    """Numerator, denominator (scaled by exp(-m_c)) and max m_c of the unselected-block terms.

    qb [BH, nb, bs, D]; kc/vs [BH, nb, D]; n [nb]; Hm [BH, nb, D, D]; selected [BH, nb, nb].
    Returns num [BH, nb, bs, D], den [BH, nb, bs], m [BH, nb, bs] (m = -inf where nothing is
    unselected)."""
    BH, nb, bs, D = qb.shape
    a = torch.matmul(qb, kc.unsqueeze(1).transpose(-1, -2)) * scale          # [BH, nb, bs, nb]
    a = a.masked_fill(selected.unsqueeze(2), float("-inf"))
    m = a.amax(-1)                                                          # [BH, nb, bs]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(a - m_safe.unsqueeze(-1))                                 # 0 where selected
    den = torch.matmul(w, n)                                                # [BH, nb, bs]
    num = torch.matmul(w, vs.unsqueeze(1))                                  # [BH, nb, bs, D]
    # first-order term: sum_j w_j (q H_j) = (w (x) q) @ [H_1; ...; H_nb]  -- one GEMM per chunk
    # of query blocks over the outer product [rows, nb*D] (N*nb*D^2 flops: for D = block size
    # this is about half of dense attention, the price of the compensation on CPU)
    Hflat = Hm.reshape(BH, nb * D, D)
    rows_per_chunk = max(1, chunk_elems // max(1, bs * nb * D))            # query blocks per chunk
    for i0 in range(0, nb, rows_per_chunk):
        i1 = min(nb, i0 + rows_per_chunk)
        wq = w[:, i0:i1].unsqueeze(-1) * qb[:, i0:i1].unsqueeze(-2)         # [BH, c, bs, nb, D]
        c = i1 - i0
        num[:, i0:i1] += scale * torch.bmm(wq.reshape(BH, c * bs, nb * D), Hflat).view(BH, c, bs, D)
    return num, den, m


def block_sparse_attention_cpu(q, k, v, block_size: int = 64, rho: float = 0.25, n_text: int = 0,
                               include_diagonal: bool = True, scale: Optional[float] = None,
                               eps: float = 1e-6, compensate: bool = True, attention=None) -> torch.Tensor:
    """Vectorized PyTorch path (CPU).  Returns contiguous ``[B, heads, N, D]`` in ``q.dtype``.
    `attention`: the (out, lse) attention to use instead of the fused CPU op (export passes
    :func:`ditopt.kernels.neighborhood.attention_with_lse`)."""
    flash = attention or _flash_cpu
    B, Hh, N, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    M = N - n_text
    BH = B * Hh
    bs = block_size
    qi, ki, vi = q[:, :, n_text:], k[:, :, n_text:], v[:, :, n_text:]
    kc, vs, n, Hm = block_stats(ki, vi, bs)
    nb = kc.shape[2]
    idx, selected = select_blocks(qi, kc, Hm, bs, rho, scale, eps, include_diagonal)
    ksel = idx.shape[-1]
    qb = _blocks(qi, bs)[0].reshape(BH, nb, bs, D)
    kb = _blocks(ki, bs)[0].reshape(BH, nb, bs, D)
    vb = _blocks(vi, bs)[0].reshape(BH, nb, bs, D)
    idx = idx.reshape(BH, nb, ksel)
    selected = selected.reshape(BH, nb, nb)
    ar = torch.arange(BH, device=q.device)[:, None, None]
    ks = kb[ar, idx].reshape(BH, nb, ksel * bs, D)        # gather of the selected blocks
    vsel = vb[ar, idx].reshape(BH, nb, ksel * bs, D)
    mask = None
    if M % bs:
        pm = torch.zeros(nb, bs, dtype=q.dtype, device=q.device)
        pm[-1, M - (nb - 1) * bs:] = float("-inf")
        mask = pm[idx].reshape(BH, nb, 1, ksel * bs).expand(BH, nb, bs, ksel * bs)
    o_e, l_e = flash(qb, ks, vsel, attn_mask=mask, scale=scale)   # [BH,nb,bs,D], [BH,nb,bs]
    parts_o = [o_e]
    parts_l = [l_e]
    if n_text:
        o_t, l_t = flash(qb.reshape(BH, 1, nb * bs, D), k[:, :, :n_text].reshape(BH, 1, n_text, D),
                              v[:, :, :n_text].reshape(BH, 1, n_text, D), scale=scale)
        parts_o.append(o_t.view(BH, nb, bs, D))
        parts_l.append(l_t.view(BH, nb, bs))
    l_all = torch.stack(parts_l)                           # exact parts: log-sum-exp each
    if compensate and ksel < nb:
        num_c, den_c, m_c = _compensation(qb, kc.reshape(BH, nb, D), vs.reshape(BH, nb, D), n,
                                          Hm.reshape(BH, nb, D, D), selected, scale)
        m = torch.maximum(l_all.amax(0), m_c)
        num = num_c * torch.exp(m_c - m).unsqueeze(-1)
        den = den_c * torch.exp(m_c - m)
    else:
        m = l_all.amax(0)
        num = torch.zeros_like(qb)
        den = torch.zeros_like(m)
    for o_p, l_p in zip(parts_o, parts_l):
        e = torch.exp(l_p - m)
        num = num + o_p * e.unsqueeze(-1)
        den = den + e
    out_img = (num / den.unsqueeze(-1)).reshape(B, Hh, nb * bs, D)[:, :, :M]
    if n_text == 0:
        return out_img.contiguous()
    out = q.new_empty(B, Hh, N, D)
    out[:, :, n_text:] = out_img
    out[:, :, :n_text] = F.scaled_dot_product_attention(q[:, :, :n_text], k, v, scale=scale)
    return out
