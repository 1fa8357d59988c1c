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

import threading
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

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
# Design (measured on the 2-core dev box, fp32, 1x4 heads x 64 dims, 8x8 tiles, r=1; the box
# was shared and loaded, so only numbers taken interleaved in one run are compared):
#
# * Inner kernel: ATen's CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu``),
#   which accepts arbitrary (even overlapping) strides for its batch / head / sequence dims
#   without copying, and returns the log-sum-exp.  On 64-query x 576-key problems it reaches
#   ~75-85 % of the throughput of the dense 4096x4096 call; bmm + softmax + bmm on the same
#   windows was 3x slower (the score tensor round-trips memory), and splitting the window into
#   (2r+1) row segments merged by LSE ran at S=192 (less efficient) plus the merges.
# * No per-layer (2r+1)^2 gather.  In tile-major order the tiles of one tile row are
#   consecutive, so only the row direction is restructured: K and V are copied once into
#   K3[bh, ty, p, dy] = K[bh, sy(ty)+dy, P[p]] (~3x the size of K; one ``index_select`` of
#   whole 16 KiB tiles into a reused workspace).  Along the row, P is the column sequence
#   padded with r "reflected" tiles on each side (see ``_column_sequence``): window sets are
#   order-free, so even the clamped edge windows become plain sliding windows, and the
#   window of query tile (ty, tx) is the contiguous run K3[bh, ty, tx : tx+2r+1].  The window
#   tensor is a zero-copy ``as_strided`` view with overlapping windows.
# * So the whole image is ONE flash call (Batch = batch*heads*tile rows, Heads = tiles of a
#   row, L = t*t queries, S = (2r+1)^2*t*t keys) whose output already is the tile-major
#   [B, heads, H*W, D] result: no wasted scores, no output concatenation.
# * Few, large parallel regions matter on a shared box: with the default OpenMP spin-wait,
#   an earlier version with 10 regions per call (band copies per row group, main + edge
#   calls, concatenations) was 4x slower with 2 threads than with 1 under load (every region
#   waits for a descheduled worker); the single-call version has 3 regions (2 gathers + the
#   attention) and a reused workspace (fresh 3x-K buffers cost ~6000 page faults per call).
# * Text tokens (MMDiT): image queries x text keys is one more flash call, merged exactly
#   through the log-sum-exps (``lerp`` with ``sigmoid(lse_img - lse_txt)``); text queries run
#   dense SDPA.
# * Grids that are not a multiple of the tile: tokens are scattered into a padded full-tile
#   buffer with one extra head dim; pad keys get -1e30 in that dim (q gets 1 there, q is
#   pre-scaled), so they have zero weight without an attention mask.
# * FlexAttention (torch.compile'd ``flex_attention``, BLOCK_SIZE=64 block mask in tile-major
#   order, exact) measured against this final version, interleaved, same inputs, loaded box:
#       grid     threads   dense SDPA   this path   flex (compiled)
#       64x64       1        263.7 ms     41.9 ms     48.2 ms
#       64x64       2        310.8 ms     65.8 ms     51.0 ms
#       128x128     1      18929   ms    708   ms    677   ms
#       128x128     2      11427   ms    616   ms    544   ms
#   i.e. the same speed within the noise (flex ~10-20 % ahead with 2 threads under load, this
#   path ahead with 1 thread).  Flex needs torch.compile (20-35 s per new shape, a C++
#   toolchain, Inductor's CPU template); this path needs nothing, so it is the default.

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash(q, k, v, scale, attention=None):
    out, lse = (attention or _flash_cpu)(q, k, v, scale=scale)
    return out, lse


def attention_with_lse(q, k, v, attn_mask=None, scale=None):
    """(out, log-sum-exp) like ``_scaled_dot_product_flash_attention_for_cpu``, from matmul,
    logsumexp and exp: what ONNX export traces instead (its translation of the fused op does
    not give a log-sum-exp onnxruntime accepts). Materializes the logits: export only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        logits = logits + attn_mask
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v), lse


@lru_cache(maxsize=64)
def _pad_index(H: int, W: int, tile: int) -> torch.Tensor:
    """Positions in the padded full-tile buffer (TH*TW*t*t slots) of the H*W real tokens."""
    y, x = tile_major_coords(H, W, tile)
    TW = -(-W // tile)
    ty, tx, iy, ix = y // tile, x // tile, y % tile, x % tile
    return ((ty * TW + tx) * tile + iy) * tile + ix


@lru_cache(maxsize=64)
def _column_sequence(T: int, radius: int) -> Tuple[int, Tuple[int, ...]]:
    """Window size K and a tile sequence P (len T+K-1) with set(P[j:j+K]) == window of tile j.

    Window sets are order-free, so the clamped edge windows become plain sliding windows over
    a sequence padded with r "reflected" tiles on each side:
    ``P = [r+1 .. 2r] + [0 .. T-1] + [T-1-2r .. T-2-r]``  (T >= 2r+1), or the cyclic
    ``[0 .. T-1] + [0 .. T-2]`` when the axis is shorter than the window."""
    K, start = axis_window(T, radius)
    if T >= 2 * radius + 1:
        P = list(range(radius + 1, 2 * radius + 1)) + list(range(T)) + \
            list(range(T - 1 - 2 * radius, T - 1 - radius))
    else:
        P = list(range(T)) + list(range(T - 1))
    for j in range(T):  # cheap self-check, cached
        s0 = int(start[j])
        assert sorted(P[j:j + K]) == list(range(s0, s0 + K)), (T, radius, j)
    return K, tuple(P)


@lru_cache(maxsize=64)
def _window_tile_index(TH: int, TW: int, radius: int) -> Tuple[torch.Tensor, int, int, int]:
    """Flat tile indices of the band-stacked, column-reflected K layout (see the design note)."""
    KY, sy = axis_window(TH, radius)
    KX, P = _column_sequence(TW, radius)
    rows = sy[:, None] + torch.arange(KY)[None, :]                      # [TH, KY]
    cols = torch.tensor(P)                                              # [TW+KX-1]
    idx = rows[:, None, :] * TW + cols[None, :, None]                   # [TH, TW+KX-1, KY]
    return idx.reshape(-1), KY, KX, len(P)


_workspace = threading.local()


def _get_workspace(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch buffer that is reused across calls.

    The band-stacked K/V copies are ~3x the size of K; allocating them fresh in every layer
    costs a page fault per 4 KiB page (glibc returns big blocks to the OS on free), which on
    the dev VM was ~6000 faults and tens of ms per call at 64x64 -- as much as the copy."""
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    key = (slot, like.dtype, like.device, torch.is_inference_mode_enabled())  # inference tensors cannot be reused outside inference mode
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel or type(buf) is not torch.Tensor:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        bufs[key] = buf
    return buf[:numel]


def clear_workspace() -> None:
    """Free the scratch buffers cached by the fast CPU path in this thread."""
    _workspace.bufs = {}


def _stack_tiles(xt: torch.Tensor, idx: torch.Tensor, slot: int) -> torch.Tensor:
    """One gather of whole tiles: xt [BH, T, t2, Dp] -> [BH, len(idx), t2, Dp] (workspace)."""
    BH, _, t2, Dp = xt.shape
    n = idx.numel()
    # Only plain eager tensors share the scratch buffer: under a tracing or dispatch mode (fake
    # tensors, functionalization, export) a cached buffer could be a tensor without real storage.
    if (xt.device.type == "cpu" and type(xt) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None):
        out = _get_workspace(slot, BH * n * t2 * Dp, xt).view(BH, n, t2, Dp)
        return torch.index_select(xt, 1, idx, out=out)
    return torch.index_select(xt, 1, idx)


def _image_neighborhood(qt, kt, vt, radius, scale, need_lse=True, attention=None):
    """qt, kt, vt: [BH, TH, TW, t2, Dp] full tiles.

    Returns (out [BH, TH*TW*t2, Dp], lse [BH, TH*TW*t2] or None).  ONE flash-attention call:
    Batch = (bh, tile row), Heads = tiles of the row, keys = a sliding window over the
    band-stacked, column-reflected copy of K/V."""
    BH, TH, TW, t2, Dp = qt.shape
    idx, KY, KX, LP = _window_tile_index(TH, TW, radius)
    idx = idx.to(qt.device)
    K3 = _stack_tiles(kt.reshape(BH, TH * TW, t2, Dp), idx, 0)         # [BH, TH*LP*KY, t2, Dp]
    V3 = _stack_tiles(vt.reshape(BH, TH * TW, t2, Dp), idx, 1)
    shape = (BH * TH, TW, KX * KY * t2, Dp)
    strides = (LP * KY * t2 * Dp, KY * t2 * Dp, Dp, 1)
    kw = K3.as_strided(shape, strides, K3.storage_offset())
    vw = V3.as_strided(shape, strides, V3.storage_offset())
    qw = qt.reshape(BH * TH, TW, t2, Dp)
    out, lse = _flash(qw, kw, vw, scale, attention)                     # [BH*TH, TW, t2, Dp]
    return out.reshape(BH, TH * TW * t2, Dp), (lse.reshape(BH, TH * TW * t2) if need_lse else None)


def neighborhood_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               height: int, width: int, tile: int = 8, radius: int = 1,
                               n_text: int = 0, scale: Optional[float] = None, attention=None) -> torch.Tensor:
    """Fast exact CPU path (fp32/bf16); same semantics as :func:`neighborhood_attention_reference`.
    `attention`: the (out, lse) attention to use instead of the fused CPU op (export passes
    :func:`attention_with_lse`).

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
        o_img, l_img = _image_neighborhood(qt, kt, vt, radius, scale, need_lse=n_text > 0, attention=attention)
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
        o_p, l_p = _image_neighborhood(qp.view(shp), kp.view(shp), vp.view(shp), radius, 1.0,
                                       need_lse=n_text > 0, attention=attention)
        o_img = o_p.index_select(1, idx)[..., :D]
        l_img = l_p.index_select(1, idx) if n_text else None

    if n_text == 0:
        return o_img.reshape(B, Hh, N, D).contiguous()

    out = q.new_empty(B, Hh, N, D)
    # image queries x text keys, merged through the log-sum-exps
    o_t, l_t = _flash(qi, k[:, :, :n_text], v[:, :, :n_text], scale, attention)
    o_img = o_img.view(B, Hh, HW, D)
    l_img = l_img.view(B, Hh, HW)
    # o = (e^l_img o_img + e^l_t o_t) / (e^l_img + e^l_t) = lerp(o_t, o_img, sigmoid(l_img - l_t))
    w = torch.sigmoid(l_img - l_t).unsqueeze(-1)
    torch.lerp(o_t, o_img, w.to(o_t.dtype), out=out[:, :, n_text:])
    # text queries: dense over all keys
    out[:, :, :n_text] = F.scaled_dot_product_attention(q[:, :, :n_text], k, v, scale=scale)
    return out
