"""Tiled 2-D neighbourhood attention (NATTEN-style, clamped window centre, tile granularity).

Token layout: ``q, k, v`` are ``[B, heads, N, D]`` with ``N = n_text + H*W``: an optional
prefix of ``n_text`` global tokens (MMDiT text) followed by the image tokens in tile-major
order (see :mod:`ditopt.kernels.layout`; partial edge tiles allowed).

Semantics (tile granularity, per axis; shown for rows):

* tile grid ``TH = ceil(H/t)``; window size ``KY = min(2r+1, TH)`` tile rows;
* query tile row ``ty`` sees key tile rows ``sy .. sy+KY-1`` with
  ``sy = clamp(ty - r, 0, TH - KY)``.  For ``TH >= 2r+1`` this is exactly the NATTEN clamped
  centre ``cy = clamp(ty, r, TH-1-r)``, ``sy = cy - r``: every query tile sees ``(2r+1)^2`` key
  tiles.  For grids smaller than the window the window shrinks to the whole axis.
* image queries also attend to all ``n_text`` text keys; text queries attend to all keys.

Implementations:

* :func:`neighborhood_attention_reference` -- dense boolean mask + masked softmax (float64 by
  default); the ground truth for tests and for ``max_rel_err`` in the benchmark.
* :func:`neighborhood_attention_cpu` -- the fast CPU path (see the design note there).
* the Triton kernel lives in :mod:`ditopt.kernels.triton_kernels`.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .layout import tile_grid, tile_major_coords

__all__ = [
    "axis_window",
    "neighborhood_mask",
    "neighborhood_density",
    "neighborhood_attention_reference",
    "neighborhood_attention_cpu",
]

_NEG = -1.0e30  # finite "minus infinity" used for padded keys


def axis_window(T: int, radius: int) -> Tuple[int, torch.Tensor]:
    """Window size (in tiles) and clamped window start for every tile index along one axis."""
    if radius < 0:
        raise ValueError("radius must be >= 0")
    Kw = min(2 * radius + 1, T)
    start = torch.clamp(torch.arange(T) - radius, 0, T - Kw)
    return Kw, start


@lru_cache(maxsize=32)
def _image_mask_cpu(H: int, W: int, tile: int, radius: int) -> torch.Tensor:
    y, x = tile_major_coords(H, W, tile)
    ty, tx = y // tile, x // tile
    TH, TW = tile_grid(H, W, tile)
    KY, sy = axis_window(TH, radius)
    KX, sx = axis_window(TW, radius)
    qy, qx = sy[ty], sx[tx]  # window start of each query token's tile
    my = (ty[None, :] >= qy[:, None]) & (ty[None, :] < qy[:, None] + KY)
    mx = (tx[None, :] >= qx[:, None]) & (tx[None, :] < qx[:, None] + KX)
    return my & mx


def neighborhood_mask(height: int, width: int, tile: int = 8, radius: int = 1, n_text: int = 0,
                      device=None) -> torch.Tensor:
    """Dense boolean ``[N, N]`` mask (True = attend), ``N = n_text + height*width``."""
    img = _image_mask_cpu(height, width, tile, radius)
    n = n_text + height * width
    m = torch.ones(n, n, dtype=torch.bool)
    m[n_text:, n_text:] = img
    return m if device is None else m.to(device)


def neighborhood_density(height: int, width: int, tile: int = 8, radius: int = 1, n_text: int = 0) -> float:
    """Fraction of the dense ``N x N`` score matrix that the neighbourhood pattern keeps.

    Computed analytically (no N x N mask), so it is cheap for large grids."""
    TH, TW = tile_grid(height, width, tile)
    KY, sy = axis_window(TH, radius)
    KX, sx = axis_window(TW, radius)
    rows = torch.tensor([min(tile, height - i * tile) for i in range(TH)])
    cols = torch.tensor([min(tile, width - i * tile) for i in range(TW)])
    # keys visible from each tile row / column (counting tokens along that axis)
    ky = torch.stack([rows[s:s + KY].sum() for s in sy.tolist()])
    kx = torch.stack([cols[s:s + KX].sum() for s in sx.tolist()])
    img_pairs = float(((rows * ky).sum()) * ((cols * kx).sum()))
    hw = height * width
    n = n_text + hw
    pairs = img_pairs + hw * n_text + n_text * n
    return pairs / float(n * n)


def neighborhood_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     height: int, width: int, tile: int = 8, radius: int = 1,
                                     n_text: int = 0, scale: Optional[float] = None,
                                     dtype: torch.dtype = torch.float64,
                                     query_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Masked dense softmax attention in ``dtype`` (float64 by default); returns ``dtype``.

    ``query_index`` (optional LongTensor) restricts the computation to those query rows
    (the result then has ``len(query_index)`` rows) -- used to check large grids cheaply."""
    B, Hh, N, D = q.shape
    if N != n_text + height * width:
        raise ValueError(f"N={N} != n_text + height*width = {n_text + height * width}")
    scale = D ** -0.5 if scale is None else scale
    mask = neighborhood_mask(height, width, tile, radius, n_text).to(q.device)
    qq = q.to(dtype)
    if query_index is not None:
        query_index = query_index.to(q.device)
        qq = qq.index_select(2, query_index)
        mask = mask.index_select(0, query_index)
    s = torch.matmul(qq, k.to(dtype).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(dtype))


# --------------------------------------------------------------------------------------------
# Fast CPU path
# --------------------------------------------------------------------------------------------
#
# Design (measured on the 2-core dev box, fp32, 1x4 heads x 64 dims, 8x8 tiles, r=1):
#
# * Inner kernel: ATen's CPU flash-attention (``_scaled_dot_product_flash_attention_for_cpu``),
#   which accepts arbitrary (even overlapping, stride-0) strides for its batch / head / sequence
#   dims without copying and returns the log-sum-exp.  Throughput on 64-query x 576-key problems
#   is ~75-85 % of the dense 4096x4096 call (40-46 vs 55 GFLOP/s), much better than
#   bmm + softmax + bmm on the same windows (3x slower: the score tensor round-trips memory)
#   and than splitting the window into (2r+1) row segments merged by LSE (S=192: 35 GFLOP/s
#   plus the merges).
# * No per-layer gather of the (2r+1)^2 neighbourhood.  In tile-major order the (2r+1) key
#   tiles of one tile row that a query tile needs are already ONE contiguous run of tokens, so
#   only the row direction needs restructuring: K and V are copied once into a "band-stacked"
#   layout K3[bh, ty, tx, dy] = K[bh, sy(ty)+dy, tx] (3x the size of K, one strided copy).  In
#   K3 the whole (2r+1)x(2r+1) window of a query tile is one contiguous run of
#   (2r+1)^2*t^2 tokens, and consecutive windows of a tile row are (2r+1)*t^2 tokens apart, so
#   the window tensor is a zero-copy ``as_strided`` view with overlapping windows.
# * Batch = (batch*heads*tile-rows) folded, Heads = windows of the row; the clamped window
#   centre at the left/right edges (tiles sharing window 0 / the last window) is one more
#   call with Heads = 2.  So the whole image runs in 2 attention calls, no wasted scores.
# * Text tokens (MMDiT): image queries x text keys is one more flash call; the two partial
#   results are merged exactly through their log-sum-exps.  Text queries run dense SDPA.
# * Grids that are not a multiple of the tile: tokens are scattered into a padded full-tile
#   buffer with one extra head dim; pad keys get -1e30 in that dim (q gets 1 there, q is
#   pre-scaled), so they have zero weight without any attention mask.
#
# Measured numbers (interleaved, median; see benchmarks/bench_attention_kernels.py) are in
# the module docstring of ditopt.kernels.bench.

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash(q, k, v, scale):
    out, lse = _flash_cpu(q, k, v, scale=scale)
    return out, lse


@lru_cache(maxsize=64)
def _pad_index(H: int, W: int, tile: int) -> torch.Tensor:
    """Positions in the padded full-tile buffer (TH*TW*t*t slots) of the H*W real tokens."""
    y, x = tile_major_coords(H, W, tile)
    TW = -(-W // tile)
    ty, tx, iy, ix = y // tile, x // tile, y % tile, x % tile
    return ((ty * TW + tx) * tile + iy) * tile + ix


def _split(T: int, radius: int):
    """Per-axis plan: window size, #windows, and the tile ranges sharing the edge windows.

    Tiles [0, a) use window 0, tiles [a, a+nw) use window (tile-a), tiles [a+nw, T) use
    window nw-1."""
    Kw = min(2 * radius + 1, T)
    nw = T - Kw + 1
    a = min(radius, T - nw)
    return Kw, nw, a, T - a - nw


def _band_stack(xt: torch.Tensor, KY: int, nwy: int, ay: int, by: int) -> torch.Tensor:
    """xt [BH, TH, TW, t2, Dp] -> K3 [BH, TH, TW, KY, t2, Dp] with K3[:, ty, :, dy] = xt[:, sy(ty)+dy]."""
    BH, TH, TW, t2, Dp = xt.shape
    u = xt.unfold(1, KY, 1).permute(0, 1, 2, 5, 3, 4)  # [BH, nwy, TW, KY, t2, Dp] (view)
    out = xt.new_empty(BH, TH, TW, KY, t2, Dp)
    out[:, ay:ay + nwy].copy_(u)
    if ay:
        out[:, :ay].copy_(u[:, :1].expand(BH, ay, TW, KY, t2, Dp))
    if by:
        out[:, ay + nwy:].copy_(u[:, nwy - 1:].expand(BH, by, TW, KY, t2, Dp))
    return out


def _image_neighborhood(qt, kt, vt, radius, scale):
    """qt, kt, vt: [BH, TH, TW, t2, Dp] full tiles.  Returns (out [BH, TH*TW*t2, Dp], lse [BH, TH*TW*t2])."""
    BH, TH, TW, t2, Dp = qt.shape
    KY, nwy, ay, by = _split(TH, radius)
    KX, nwx, ax, bx = _split(TW, radius)
    K3 = _band_stack(kt, KY, nwy, ay, by)
    V3 = _band_stack(vt, KY, nwy, ay, by)
    R = BH * TH
    S = KX * KY * t2                # keys per window
    wstride = KY * t2 * Dp          # elements between consecutive windows of a row
    rstride_k = TW * KY * t2 * Dp   # elements between tile rows in K3
    rstride_q = TW * t2 * Dp
    if not qt.is_contiguous():
        qt = qt.contiguous()

    def kv_win(n, first, step):
        shape = (R, n, S, Dp)
        strides = (rstride_k, step * wstride, Dp, 1)
        off = first * wstride
        return (K3.as_strided(shape, strides, K3.storage_offset() + off),
                V3.as_strided(shape, strides, V3.storage_offset() + off))

    def q_run(n, first_tile, ntiles, step_tiles):
        return qt.as_strided((R, n, ntiles * t2, Dp), (rstride_q, step_tiles * t2 * Dp, Dp, 1),
                             qt.storage_offset() + first_tile * t2 * Dp)

    outs, lses = [], []
    # main: tile ax+w uses window w
    km, vm = kv_win(nwx, 0, 1)
    om, lm = _flash(q_run(nwx, ax, 1, 1), km, vm, scale)
    om, lm = om.reshape(R, nwx * t2, Dp), lm.reshape(R, nwx * t2)
    ol = orr = ll = lr = None
    if ax and ax == bx:  # both edge groups in one call
        ke, ve = kv_win(2, 0, nwx - 1)
        oe, le = _flash(q_run(2, 0, ax, ax + nwx), ke, ve, scale)
        ol, orr = oe[:, 0], oe[:, 1]
        ll, lr = le[:, 0], le[:, 1]
    else:
        if ax:
            ke, ve = kv_win(1, 0, 1)
            o, l = _flash(q_run(1, 0, ax, 1), ke, ve, scale)
            ol, ll = o[:, 0], l[:, 0]
        if bx:
            ke, ve = kv_win(1, nwx - 1, 1)
            o, l = _flash(q_run(1, ax + nwx, bx, 1), ke, ve, scale)
            orr, lr = o[:, 0], l[:, 0]
    for o, l in ((ol, ll), (om, lm), (orr, lr)):
        if o is not None:
            outs.append(o)
            lses.append(l)
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, 1) if len(lses) > 1 else lses[0]
    return out.view(BH, TH * TW * t2, Dp), lse.view(BH, TH * TW * t2)


def neighborhood_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               height: int, width: int, tile: int = 8, radius: int = 1,
                               n_text: int = 0, scale: Optional[float] = None) -> torch.Tensor:
    """Fast exact CPU path (fp32/bf16); same semantics as :func:`neighborhood_attention_reference`.

    Returns a contiguous ``[B, heads, N, D]`` tensor in ``q.dtype``."""
    B, Hh, N, D = q.shape
    HW = height * width
    if N != n_text + HW:
        raise ValueError(f"N={N} != n_text + height*width = {n_text + HW}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must have the same shape [B, heads, N, D]")
    scale = D ** -0.5 if scale is None else float(scale)
    BH = B * Hh
    TH, TW = tile_grid(height, width, tile)
    t2 = tile * tile
    regular = height % tile == 0 and width % tile == 0

    qi, ki, vi = (x[:, :, n_text:] for x in (q, k, v))
    if regular:
        qt = qi.reshape(BH, TH, TW, t2, D)
        kt = ki.reshape(BH, TH, TW, t2, D)
        vt = vi.reshape(BH, TH, TW, t2, D)
        o_img, l_img = _image_neighborhood(qt, kt, vt, radius, scale)
    else:
        # scatter into padded full tiles with one extra head dim that masks the pad keys
        Np = TH * TW * t2
        idx = _pad_index(height, width, tile).to(q.device)
        qp = q.new_zeros(BH, Np, D + 1)
        kp = q.new_zeros(BH, Np, D + 1)
        vp = q.new_zeros(BH, Np, D + 1)
        qp[:, :, D] = 1.0
        kp[:, :, D] = _NEG
        qp[:, idx, :D] = qi.reshape(BH, HW, D) * scale
        kp[:, idx, :D] = ki.reshape(BH, HW, D)
        kp[:, idx, D] = 0.0
        vp[:, idx, :D] = vi.reshape(BH, HW, D)
        shp = (BH, TH, TW, t2, D + 1)
        o_p, l_p = _image_neighborhood(qp.view(shp), kp.view(shp), vp.view(shp), radius, 1.0)
        o_img = o_p.index_select(1, idx)[..., :D]
        l_img = l_p.index_select(1, idx)

    if n_text == 0:
        return o_img.reshape(B, Hh, N, D).contiguous()

    out = q.new_empty(B, Hh, N, D)
    # image queries x text keys, merged through the log-sum-exps
    o_t, l_t = _flash(qi, k[:, :, :n_text], v[:, :, :n_text], scale)
    o_img = o_img.view(B, Hh, HW, D)
    l_img = l_img.view(B, Hh, HW)
    l_tot = torch.logaddexp(l_img, l_t)
    w_img = torch.exp(l_img - l_tot).unsqueeze(-1)
    w_t = torch.exp(l_t - l_tot).unsqueeze(-1)
    out[:, :, n_text:].copy_(torch.addcmul(o_img * w_img, o_t, w_t))
    # text queries: dense over all keys
    out[:, :, :n_text] = F.scaled_dot_product_attention(q[:, :, :n_text], k, v, scale=scale)
    return out
