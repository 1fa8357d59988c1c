"""Calibration collector "attention": per block and head, the attention mass that a 2-D
neighbourhood window (radius 1..3 tiles) and PISA's top-rho key blocks keep, over the
sampling trajectory, bucketed by step (first / middle / last third) so stability is visible.

The block segments are made to also output their attention's q, k, v (an extra output never
changes results); a stage at the end of the plan reads them on the host, subsamples query rows
and batch rows, and accumulates the masses (`attention_masses`) per measured step (0, 1, 2, then every third).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ditopt.graph import DiTGraph
from ditopt.plan import Stage, StepContext
from ditopt.registry import available_passes, register_collector, register_report_figure

from .masses import attention_masses

RADII = (1, 2, 3)
RHOS = (0.125, 0.25, 0.5)
TILES = (2, 4, 8)
BUCKETS = 3
MAX_QUERIES = 256  # image query rows measured per call
MAX_ROWS = 2  # batch rows measured per call
STEP_STRIDE = 3  # measure steps 0, 1, 2 and then every third step: the pattern is stable across steps


def site_node(gm: fx.GraphModule, name: str) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.name == name), None)


def sdpa_scale(node: fx.Node) -> float | None:
    return node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)


def plain_sdpa(node: fx.Node) -> bool:
    """No mask, no dropout, not causal: the attention the substitutions can stand in for."""
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
    return mask is None and not dropout and not causal


def measurable_sites(graph: DiTGraph) -> list[tuple[int, Any]]:
    """(block index, site) of the first self/joint attention of every block whose image
    tokens lie on a known 2-D grid."""
    if graph.grid is None or len(graph.grid) != 2:
        return []
    h, w = graph.grid
    out = []
    for block in graph.blocks:
        for site in block.attention:
            if site.kind in ("self", "joint") and site.image_tokens == h * w and site.query_tokens == site.key_tokens == site.image_tokens + site.text_tokens:
                out.append((block.index, site))
                break
    return out


class AttentionRecorder(Stage):
    kind = "calibration-attention"

    def __init__(self, sink: "AttentionCollector", outputs: dict[int, tuple[str, str, str]]) -> None:
        self.sink, self.outputs = sink, outputs

    def segment_names(self) -> tuple[str, ...]:
        return ()

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        for block, names in self.outputs.items():
            self.sink.add(ctx.step, block, *(env.pop(n) for n in names))


class AttentionCollector:
    name = "attention"

    def __init__(self, graph: DiTGraph, tiles: tuple[int, ...] = TILES, seed: int = 0) -> None:
        self.sites = dict(measurable_sites(graph))
        self.grid = tuple(graph.grid) if self.sites else None
        self.tiles = tuple(t for t in tiles if self.grid and t < min(self.grid))
        self.heads = max((s.heads for s in self.sites.values()), default=0)
        self.blocks = len(graph.blocks)
        self.seed = seed
        self.scales: dict[int, float | None] = {}
        # per step: tile -> (window sums [blocks, heads, radii], block sums [blocks, heads, rhos], counts [blocks])
        self.sums: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.steps = 0

    def instrument(self, g: DiTGraph) -> DiTGraph:
        outputs: dict[int, tuple[str, str, str]] = {}
        for block, site in self.sites.items():
            seg = g.segment_for_block(block)
            gm = seg.module
            graph = copy.deepcopy(gm.graph)
            new = fx.GraphModule(gm, graph)
            node = site_node(new, site.node)
            if node is None or not plain_sdpa(node):
                continue
            self.scales[block] = sdpa_scale(node)
            out = next(n for n in graph.nodes if n.op == "output")
            values = tuple(out.args[0]) + tuple(node.args[:3])
            out.args = (values,)
            new.recompile()
            names = tuple(f"{seg.name}.attention.{x}" for x in "qkv")
            g = g.with_segment(dataclasses.replace(seg, module=new, outputs=seg.outputs + names))
            outputs[block] = names
        return g.evolve(plan=tuple(g.plan) + (AttentionRecorder(self, outputs),))

    def add(self, step: int, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.steps = max(self.steps, step + 1)
        if step >= STEP_STRIDE and step % STEP_STRIDE:
            return
        site = self.sites[block]
        q, k, v = (x[:MAX_ROWS].detach().cpu() for x in (q, k, v))
        n_img = site.image_tokens
        rows = None
        if n_img > MAX_QUERIES:
            gen = torch.Generator().manual_seed(self.seed + 7919 * step + block)
            rows = torch.randperm(n_img, generator=gen)[:MAX_QUERIES].sort().values
        per_tile = self.sums.setdefault(step, {})
        for tile in self.tiles:
            window, blocks = attention_masses(
                q, k, v, self.grid, tile, RADII, RHOS,
                text_tokens=site.text_tokens, text_first=site.text_first, scale=self.scales.get(block), query_rows=rows,
            )
            acc = per_tile.setdefault(tile, [
                torch.zeros(self.blocks, self.heads, len(RADII)), torch.zeros(self.blocks, self.heads, len(RHOS)), torch.zeros(self.blocks),
            ])
            acc[0][block, : window.shape[0]] += window
            acc[1][block, : blocks.shape[0]] += blocks
            acc[2][block] += 1

    def summarise(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        steps = self.steps
        buckets = [(b * steps // BUCKETS, (b + 1) * steps // BUCKETS) for b in range(BUCKETS)] if steps >= BUCKETS else [(0, steps)]
        for tile in self.tiles:
            by_bucket = []
            for start, end in buckets:
                parts = [self.sums[s][tile] for s in range(start, end) if s in self.sums]
                if not parts:
                    nan = torch.full((self.blocks, self.heads, len(RADII)), float("nan"))
                    by_bucket.append((nan, torch.full((self.blocks, self.heads, len(RHOS)), float("nan")), torch.zeros(self.blocks)))
                    continue
                win = sum(p[0] for p in parts)
                blk = sum(p[1] for p in parts)
                cnt = sum(p[2] for p in parts)
                by_bucket.append((win / cnt.clamp(min=1e-12)[:, None, None], blk / cnt.clamp(min=1e-12)[:, None, None], cnt))
            window = torch.stack([b[0] for b in by_bucket])
            block = torch.stack([b[1] for b in by_bucket])
            weights = torch.stack([b[2] for b in by_bucket])[:, :, None, None]
            uncalibrated = torch.tensor([i not in self.scales for i in range(self.blocks)])
            for key, t in (("window_mass", window), ("block_mass", block)):
                t = t.masked_fill(uncalibrated[None, :, None, None], float("nan"))
                tensors[f"attention.{key}_by_step.tile{tile}"] = t
                tensors[f"attention.{key}.tile{tile}"] = (t.nan_to_num() * weights).sum(0) / weights.sum(0)
        meta = {
            "grid": list(self.grid) if self.grid else None,
            "tiles": list(self.tiles),
            "radii": list(RADII),
            "rhos": list(RHOS),
            "step_buckets": [list(b) for b in buckets],
            "blocks": sorted(self.scales),
            "kinds": {str(b): self.sites[b].kind for b in sorted(self.scales)},
            "layout": "tensors [blocks, heads, radii|rhos]; *_by_step: [step bucket, blocks, heads, ...]; NaN = not measured",
        }
        return tensors, meta


@register_collector("attention")
def attention_collector(graph: DiTGraph) -> AttentionCollector:
    return AttentionCollector(graph)


def auto_tile(grid: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 that leaves at least 4 tiles per axis (so that a radius-1 window
    skips something); 8 is the kernels' fast size (64-token blocks)."""
    return next((t for t in (8, 4) if min(grid) >= 4 * t), 2)


def attention_heatmap(stats: Any, path: str, tile: int | None = None) -> str:
    """PNG: per radius (and per rho), a layer x head map of the calibrated attention mass kept,
    at `tile` (default: the tile `tile='auto'` starts from for this grid). The tile is also in
    the PNG's Title text."""
    from ditopt.errors import require_extra

    matplotlib = require_extra("matplotlib", "plots", "the attention heatmap")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = stats.meta["attention"]
    tile = tile or (auto_tile(meta["grid"]) if auto_tile(meta["grid"]) in meta["tiles"] else meta["tiles"][0])
    window = stats.tensors[f"attention.window_mass.tile{tile}"]
    block = stats.tensors[f"attention.block_mass.tile{tile}"]
    panels = [(f"window r={r}", window[..., i]) for i, r in enumerate(meta["radii"])]
    panels += [(f"top-rho {rho}", block[..., i]) for i, rho in enumerate(meta["rhos"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1, 0.35 * window.shape[0] + 1.8), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        im = ax.imshow(data.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
    axes[0][0].set_ylabel("block")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="attention mass kept")
    fig.suptitle(f"attention mass kept (tile {tile}, grid {meta['grid']})", fontsize=10)
    import io

    from ditopt.io import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, metadata={"Title": f"attention mass kept, tile {tile}"})
    plt.close(fig)
    return str(atomic_write_bytes(path, png.getvalue()))  # never a half-written PNG


def substituted_tile(report: dict[str, Any]) -> int | None:
    """The tile an applied attention pass of this report chose (its 'auto' pick may differ from
    the default tile for the grid), or None."""
    readers = {name for name, spec in available_passes().items() if "attention" in spec.needs}
    for entry in report.get("passes", []):
        tile = (entry.get("report") or {}).get("tile")
        if entry.get("name") in readers and entry.get("applied") and isinstance(tile, int):
            return tile
    return None


@register_report_figure("attention heatmap", ".attention.png")
def attention_report_figure(stats: Any, report: dict[str, Any], path: Any) -> str | None:
    """The heatmap beside an optimization report, when the calibration measured attention: drawn at
    the tile the report's attention pass chose when that tile was measured, else the default one."""
    meta = (getattr(stats, "meta", None) or {}).get("attention")
    if not meta or not meta.get("tiles"):  # not calibrated, or no site on a 2-D grid was measured
        return None
    tile = substituted_tile(report)
    return attention_heatmap(stats, path, tile if tile in meta.get("tiles", []) else None)
