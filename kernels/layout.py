"""Tile-major token layout for 2-D image token grids.

The ditopt runtime reorders the image tokens of a DiT ONCE after patchify into *tile-major*
order and undoes it before unpatchify, so that inside every attention layer a run of
``tile*tile`` consecutive tokens is a 2-D ``tile x tile`` patch of the image.

Layout definition (H x W token grid, tile size ``t``):

* The tile grid has ``TH = ceil(H / t)`` rows and ``TW = ceil(W / t)`` columns; tiles are
  enumerated row-major (``tile_id = ty * TW + tx``).
* Tokens inside a tile are enumerated row-major.
* **Grids that are not a multiple of the tile** get *partial tiles* on the bottom tile row
  and/or right tile column: tile ``(ty, tx)`` covers ``th = min(t, H - ty*t)`` rows and
  ``tw = min(t, W - tx*t)`` columns and holds exactly ``th*tw`` tokens (row-major inside,
  row width ``tw``).  There is **no padding**: the layout is a pure permutation of the ``H*W``
  tokens, so the sequence length, position embeddings, norms etc. are unchanged; only the
  token order changes (RoPE position ids / position embeddings must be permuted with the same
  index).  Attention kernels in ``ditopt.kernels`` understand partial tiles.
* Consequence used by the kernels: all tiles of one tile row are contiguous in the sequence,
  and when ``H % t == 0 and W % t == 0`` every tile is exactly ``t*t`` consecutive tokens.

``perm = tile_permutation(H, W, t)`` maps row-major -> tile-major: ``x_tile = x_row[..., perm, :]``
(``perm[j]`` is the row-major index of the token at tile-major position ``j``);
``inv = inverse_tile_permutation(H, W, t)`` undoes it: ``x_row = x_tile[..., inv, :]``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

__all__ = [
    "tile_grid",
    "tile_permutation",
    "inverse_tile_permutation",
    "tile_major_coords",
    "permute_to_tiles",
    "permute_from_tiles",
]


def _check(H: int, W: int, tile: int) -> None:
    if H <= 0 or W <= 0 or tile <= 0:
        raise ValueError(f"need positive H, W, tile; got H={H} W={W} tile={tile}")


def tile_grid(H: int, W: int, tile: int) -> Tuple[int, int]:
    """Number of tile rows and columns (partial edge tiles included)."""
    _check(H, W, tile)
    return -(-H // tile), -(-W // tile)


@lru_cache(maxsize=64)
def _coords(H: int, W: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    _check(H, W, tile)
    ys, xs = [], []
    TH, TW = tile_grid(H, W, tile)
    for ty in range(TH):
        y0 = ty * tile
        th = min(tile, H - y0)
        for tx in range(TW):
            x0 = tx * tile
            tw = min(tile, W - x0)
            yy = torch.arange(y0, y0 + th).repeat_interleave(tw)
            xx = torch.arange(x0, x0 + tw).repeat(th)
            ys.append(yy)
            xs.append(xx)
    return torch.cat(ys), torch.cat(xs)


def tile_major_coords(H: int, W: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, x) grid coordinates of the token at every tile-major position (LongTensors, len H*W)."""
    y, x = _coords(H, W, tile)
    return y.clone(), x.clone()


def tile_permutation(H: int, W: int, tile: int) -> torch.Tensor:
    """Index mapping row-major -> tile-major: ``x_tile = x_row[..., perm, :]``."""
    y, x = _coords(H, W, tile)
    return y * W + x


def inverse_tile_permutation(H: int, W: int, tile: int) -> torch.Tensor:
    """Inverse of :func:`tile_permutation`: ``x_row = x_tile[..., inv, :]``."""
    perm = tile_permutation(H, W, tile)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def permute_to_tiles(x: torch.Tensor, H: int, W: int, tile: int, dim: int = -2) -> torch.Tensor:
    """Reorder the token dimension ``dim`` of ``x`` from row-major to tile-major."""
    return x.index_select(dim, tile_permutation(H, W, tile).to(x.device))


def permute_from_tiles(x: torch.Tensor, H: int, W: int, tile: int, dim: int = -2) -> torch.Tensor:
    """Reorder the token dimension ``dim`` of ``x`` from tile-major back to row-major."""
    return x.index_select(dim, inverse_tile_permutation(H, W, tile).to(x.device))
