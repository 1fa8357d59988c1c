"""How much attention mass a sparse pattern keeps, computed from a site's q, k and v.

Both patterns are evaluated as the kernels in `ditopt.kernels` apply them: tokens are put in
the kernels' order (text prefix, then image tokens tile-major), the neighbourhood window is
`neighborhood_mask` (clamped window centre, tile granularity) and the top-rho key blocks are
what `select_blocks` picks (its ranking reads ||H_j||, hence v). Only image queries are
measured (text queries always stay dense), and mass on text keys always counts as kept.
"""

from __future__ import annotations

import torch

from ditopt.kernels.block_sparse import block_stats, select_blocks
from ditopt.kernels.layout import tile_permutation
from ditopt.kernels.neighborhood import neighborhood_mask


def kernel_order(image_tokens: int, text_tokens: int, text_first: bool, grid: tuple[int, int], tile: int) -> torch.Tensor:
    """Index taking a site's token order to the kernels' order: text prefix, then tile-major image."""
    h, w = grid
    img_start = text_tokens if text_first else 0
    txt_start = 0 if text_first else image_tokens
    text = torch.arange(txt_start, txt_start + text_tokens)
    return torch.cat([text, img_start + tile_permutation(h, w, tile)])


def attention_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    tile: int,
    radii: tuple[int, ...],
    rhos: tuple[float, ...],
    *,
    text_tokens: int = 0,
    text_first: bool = True,
    scale: float | None = None,
    query_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention mass kept per head: ([heads, radii] inside the window, [heads, rhos] in
    the top-rho key blocks of block size tile*tile).

    `q`, `k`, `v`: [B, heads, N, D] in the site's own token order. `query_rows` (optional)
    restricts the measurement to those image queries, as positions in tile-major image order.
    """
    h, w = grid
    n_img = h * w
    order = kernel_order(n_img, text_tokens, text_first, grid, tile).to(q.device)
    q, k, v = (x.float().index_select(2, order) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = torch.arange(n_img) if query_rows is None else query_rows.cpu()
    q_img = q[:, :, text_tokens:]
    probs = torch.softmax(scale * q_img.index_select(2, rows.to(q.device)) @ k.transpose(-1, -2), dim=-1)  # [B, heads, rows, N]
    window = []
    for r in radii:
        mask = neighborhood_mask(h, w, tile, r, text_tokens)[text_tokens:][rows].to(q.device)
        window.append((probs * mask).sum(-1).mean(dim=(0, 2)))
    block_size = tile * tile
    k_img, v_img = k[:, :, text_tokens:], v[:, :, text_tokens:]
    kc, _, _, hm = block_stats(k_img, v_img, block_size)
    key_block = torch.arange(n_img, device=q.device) // block_size
    query_block = rows.to(q.device) // block_size
    text_mass = probs[..., :text_tokens].sum(-1)
    blocks = []
    for rho in rhos:
        _, selected = select_blocks(q_img, kc, hm, block_size, rho, scale)  # [B, heads, nb, nb]
        keep = selected[:, :, query_block][..., key_block]  # [B, heads, rows, n_img]
        blocks.append((text_mass + (probs[..., text_tokens:] * keep).sum(-1)).mean(dim=(0, 2)))
    return torch.stack(window, -1), torch.stack(blocks, -1)
