"""Attention substitution passes: 2-D neighbourhood attention and PISA block-sparse attention,
chosen per layer from the "attention" calibration (the mass each pattern keeps)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from ditopt.graph import AttentionSite, DiTGraph
from ditopt.kernels.block_sparse import num_selected
from ditopt.kernels.layout import tile_grid
from ditopt.kernels.neighborhood import neighborhood_density
from ditopt.registry import PassConfig, PassContext, PassResult, register_pass

from .collector import RADII, RHOS, measurable_sites
from .rewrite import replace_attention, substitutable, substituted
from .token_order import reorder_tokens_once


class NeighborhoodAttentionConfig(PassConfig):
    reorder: Literal["once", "per_layer"] = Field("once", description="tile-major token order: once after the prologue (falls back to per layer when unsupported), or permute q/k/v inside each substituted attention")
    radius: int | Literal["auto"] = Field("auto", description="window radius in tiles; auto: smallest calibrated radius keeping min_mass")
    tile: int | Literal["auto"] = Field("auto", description="tile edge in tokens (the kernels' tile-major layout); auto: see auto_tile")
    min_mass: float = Field(0.95, ge=0.0, le=1.0, description="a layer stays dense when its calibrated mass in the window is below this")
    blocks: tuple[int, ...] | None = Field(None, description="restrict to these block indices (default: all)")


class BlockSparseAttentionConfig(PassConfig):
    reorder: Literal["once", "per_layer"] = Field("once", description="tile-major token order: once after the prologue (falls back to per layer when unsupported), or permute q/k/v inside each substituted attention")
    rho: float | Literal["auto"] = Field("auto", description="fraction of key blocks kept; auto: smallest calibrated rho keeping min_mass")
    tile: int | Literal["auto"] = Field("auto", description="tile edge in tokens; the block size is tile*tile; auto: see auto_tile")
    min_mass: float = Field(0.95, ge=0.0, le=1.0, description="a layer stays dense when its calibrated top-rho mass is below this")
    compensate: bool = Field(True, description="first-order compensation for the skipped blocks (PISA)")
    blocks: tuple[int, ...] | None = None


def calibrated_mass(ctx: PassContext, block: int, tile: int, key: str) -> torch.Tensor | None:
    """Worst case over heads and step buckets of the mass kept, per radius / rho; None when
    this block or tile was not calibrated."""
    stats = ctx.stats
    name = f"attention.{key}_by_step.tile{tile}"
    if stats is None or name not in getattr(stats, "tensors", {}):
        return None
    by_step = stats.tensors[name][:, block]  # [buckets, heads, n]
    if torch.isnan(by_step).all():
        return None
    return by_step.nan_to_num(nan=1.0).amin(dim=(0, 1))


def attention_flops(site: AttentionSite) -> float:
    """Multiply-adds x2 of QK^T and PV for one batch row."""
    return 4.0 * site.heads * site.query_tokens * site.key_tokens * site.head_dim


def _sites(graph: DiTGraph, blocks: tuple[int, ...] | None) -> list[tuple[int, AttentionSite]]:
    return [(b.index, s) for b in graph.blocks for s in b.attention if blocks is None or b.index in blocks]


def _substitute(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str) -> PassResult:
    """Shared driver: per site, decide from calibration; reorder tokens once when asked;
    rewrite; report."""
    original = graph
    measured = {b for b, _ in measurable_sites(graph)}
    layers, dense, chosen, total_flops, kept_flops = [], [], [], 0.0, 0.0
    for block, site in _sites(graph, config.blocks):
        flops = attention_flops(site)
        total_flops += flops
        previous = substituted(graph, block, site)
        if previous is not None:
            layers.append({"block": block, **previous, "note": "already substituted"})
            kept_flops += flops * previous["density"]
            continue
        reason = substitutable(graph, site) or (None if block in measured else "not the block's measured attention")
        choice = None if reason else _choose(graph, site, block, config, ctx, pattern)
        if isinstance(choice, str) or choice is None:
            dense.append({"block": block, "kind": site.kind, "reason": reason or choice})
            kept_flops += flops
            continue
        chosen.append((block, site, choice, flops))
    token_order = graph.meta.get("token_order")
    if chosen and config.reorder == "once" and token_order is None:
        reordered, why = reorder_tokens_once(graph, chosen[0][2][2]["tile"])
        token_order = reordered.meta["token_order"] if reordered is not None else {"unsupported": why}
        graph = reordered if reordered is not None else graph
    for block, site, (op, args, record), flops in chosen:
        new = replace_attention(graph, block, site, op, args, record)
        if new is None:
            dense.append({"block": block, "kind": site.kind, "reason": "attention is masked, causal or has dropout"})
            kept_flops += flops
            continue
        graph = new
        layers.append({"block": block, **record})
        kept_flops += flops * record["density"]
    report = {
        "pattern": pattern,
        "substituted": [l["block"] for l in layers],
        "layers": layers,
        "dense": dense,
        "token_order": token_order or "row-major (permuted inside each substituted attention)",
        "attention_flops_per_row": total_flops,
        "predicted_attention_flop_saving": 0.0 if total_flops == 0 else 1.0 - kept_flops / total_flops,
    }
    return PassResult(graph, graph is not original, report)


def auto_tile(grid: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 that leaves at least 4 tiles per axis (so that a radius-1 window
    skips something); 8 is the kernels' fast size (64-token blocks)."""
    return next((t for t in (8, 4) if min(grid) >= 4 * t), 2)


def _choose(graph: DiTGraph, site: AttentionSite, block: int, config: Any, ctx: PassContext, pattern: str):
    h, w = graph.grid
    tile = auto_tile(graph.grid) if config.tile == "auto" else config.tile
    if tile < 1:
        return f"tile {tile} is not a positive size"
    if pattern == "neighborhood":
        masses = calibrated_mass(ctx, block, tile, "window_mass")
        candidates = RADII if config.radius == "auto" else (config.radius,)
        for radius in candidates:
            mass = _mass_at(masses, RADII, radius)
            if mass is None and not _window_covers_grid(h, w, tile, radius):
                return f"not calibrated for tile {tile}, radius {radius}"
            if mass is None or mass >= config.min_mass:
                density = neighborhood_density(h, w, tile, radius, site.text_tokens)
                if config.radius == "auto" and density >= 1.0:
                    return f"radius {radius} at tile {tile} covers the whole grid: nothing to save"
                record = {"pattern": "neighborhood", "tile": tile, "radius": radius, "mass": 1.0 if mass is None else mass, "density": density, "kind": site.kind}
                args = lambda n_text, scale, r=radius: (h, w, tile, r, n_text, scale)  # noqa: E731
                return torch.ops.ditopt.neighborhood_attention.default, args, record
        best = None if masses is None else float(masses.max())
        return f"attention is broad: calibrated window mass {best} < min_mass {config.min_mass}"
    masses = calibrated_mass(ctx, block, tile, "block_mass")
    if masses is None:
        return f"not calibrated for tile {tile}"
    candidates = RHOS if config.rho == "auto" else (config.rho,)
    for rho in candidates:
        mass = _mass_at(masses, RHOS, rho)
        if mass is None:
            return f"not calibrated for rho {rho}"
        if mass >= config.min_mass:
            bs = tile * tile
            density = _block_density(site, bs, rho)
            record = {"pattern": "block_sparse", "tile": tile, "block_size": bs, "rho": rho, "mass": mass, "density": density, "kind": site.kind}
            args = lambda n_text, scale, r=rho: (bs, r, n_text, True, scale, 1e-6, config.compensate)  # noqa: E731
            return torch.ops.ditopt.block_sparse_attention.default, args, record
    return f"attention is not block-sparse: calibrated top-rho mass {float(masses.max()):.4f} < min_mass {config.min_mass}"


def _mass_at(masses: torch.Tensor | None, grid: tuple, value: Any) -> float | None:
    if masses is None or value not in grid:
        return None
    return float(masses[grid.index(value)])


def _window_covers_grid(h: int, w: int, tile: int, radius: int) -> bool:
    th, tw = tile_grid(h, w, tile)
    return 2 * radius + 1 >= max(th, tw)


def _block_density(site: AttentionSite, block_size: int, rho: float) -> float:
    """Share of the dense score matrix computed exactly (compensation terms not counted)."""
    m, t = site.image_tokens, site.text_tokens
    n = m + t
    kept_keys = min(m, num_selected(math.ceil(m / block_size), rho) * block_size)
    return (t * n + m * t + m * kept_keys) / float(n * n)


@register_pass("neighborhood_attention", NeighborhoodAttentionConfig, needs=("attention",))
def neighborhood_attention(graph: DiTGraph, config: NeighborhoodAttentionConfig, ctx: PassContext) -> PassResult:
    """Replace self/joint attention by tiled 2-D neighbourhood attention where calibration shows it is local."""
    return _substitute(graph, config, ctx, "neighborhood")


@register_pass("block_sparse_attention", BlockSparseAttentionConfig, needs=("attention",))
def block_sparse_attention(graph: DiTGraph, config: BlockSparseAttentionConfig, ctx: PassContext) -> PassResult:
    """Replace self/joint attention by PISA top-rho block-sparse attention where calibration shows it is block-sparse."""
    return _substitute(graph, config, ctx, "block_sparse")
