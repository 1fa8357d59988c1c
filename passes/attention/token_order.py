"""Tile-major token order for the whole block stack: permute the image tokens once at the end
of the prologue and back at the start of the epilogue, so that substituted attentions need
no per-layer gather.

This is sound because everything between those two points is per-token (linears, norms,
FFN, adaLN modulation broadcast over tokens) except attention, and attention is equivariant
to one permutation applied to its queries, keys and values alike. Position information must
move with the tokens: every value that crosses into the blocks with a token axis is permuted
- the image stream `[B, M, C]`, a joint stream `[B, T+M, C]` and RoPE tables `[T+M, D]` / `[M, D]`
(their image rows). A token-shaped value the blocks read straight from the call's inputs, or a
grid that is not 2-D, makes the reorder unsupported (the pass then permutes per layer).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ditopt.graph import DiTGraph, Segment
from ditopt.kernels.layout import tile_permutation

aten = torch.ops.aten


def site_token_order(graph: DiTGraph, image_tokens: int, text_tokens: int, text_first: bool) -> torch.Tensor:
    """Original token index at each position of a site's q/k/v in this graph's current order."""
    img_start = text_tokens if text_first else 0
    txt_start = 0 if text_first else image_tokens
    order = graph.meta.get("token_order")
    image = img_start + (tile_permutation(*graph.grid, order["tile"]) if order else torch.arange(image_tokens))
    text = torch.arange(txt_start, txt_start + text_tokens)
    return torch.cat([text, image] if text_first else [image, text])


def _token_axis(shape: tuple[int, ...], m: int, t: int) -> tuple[int, int] | None:
    """(axis, image offset along it) of a token-shaped value, or None."""
    if len(shape) == 3 and shape[1] in (m, m + t):
        return 1, (shape[1] - m)
    if len(shape) == 2 and shape[0] in (m, m + t) and t > 0 and shape[0] == m + t:
        return 0, t
    return None


def reorder_tokens_once(graph: DiTGraph, tile: int) -> tuple[DiTGraph | None, str]:
    """The graph with image tokens tile-major between prologue and epilogue, or (None, why)."""
    if graph.meta.get("token_order"):
        return graph, "already tile-major"
    if graph.grid is None or len(graph.grid) != 2:
        return None, "no 2-D grid"
    sites = [s for b in graph.blocks for s in b.attention]
    m, t = graph.image_tokens, graph.text_tokens
    if any(s.text_tokens and not s.text_first for s in sites):
        return None, "text tokens after image tokens"
    perm = tile_permutation(*graph.grid, tile)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    prologue, epilogue = graph.prologue, graph.epilogue
    shapes = {n.name: tuple(n.meta["val"].shape) for n in prologue.module.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    block_inputs = {i for s in graph.block_segments for i in s.inputs}
    for name in block_inputs & set(graph.signature.input_names):
        shape = _placeholder_shape(graph, name)
        if shape is not None and _token_axis(shape, m, t):
            return None, f"blocks read the token-shaped input {name!r} directly"
    permuted = {o: _token_axis(shapes.get(o, ()), m, t) for o in prologue.outputs}
    permuted = {o: ax for o, ax in permuted.items() if ax is not None}
    if not permuted:
        return None, "no token-shaped prologue output"
    new_prologue = _permute_outputs(prologue, permuted, perm)
    epi_shapes = {n.name: tuple(n.meta["val"].shape) for n in epilogue.module.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    restore = {i: _token_axis(epi_shapes.get(i, ()), m, t) for i in epilogue.inputs if i not in graph.signature.input_names}
    new_epilogue = _permute_inputs(epilogue, {i: ax for i, ax in restore.items() if ax is not None}, inverse)
    out = graph.with_segment(new_prologue).with_segment(new_epilogue)
    record = {"tile": tile, "grid": list(graph.grid), "prologue_outputs": sorted(permuted), "epilogue_inputs": sorted(i for i, ax in restore.items() if ax)}
    return out.evolve(meta={**{k: v for k, v in graph.meta.items() if not k.startswith("_")}, "token_order": record}), "ok"


def _placeholder_shape(graph: DiTGraph, name: str) -> tuple[int, ...] | None:
    for seg in graph.segments:
        for n in seg.module.graph.nodes:
            if n.op == "placeholder" and n.name == name and isinstance(n.meta.get("val"), torch.Tensor):
                return tuple(n.meta["val"].shape)
    return None


def _full_index(index: torch.Tensor, offset: int) -> torch.Tensor:
    return torch.cat([torch.arange(offset), offset + index])


def _permute_outputs(seg: Segment, axes: dict[str, tuple[int, int]], perm: torch.Tensor) -> Segment:
    gm = fx.GraphModule(seg.module, copy.deepcopy(seg.module.graph))
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    values = list(out.args[0])
    with g.inserting_before(out):
        for i, name in enumerate(seg.outputs):
            if name in axes:
                values[i] = _select(gm, values[i], axes[name], perm, f"_ditopt_tile_order_{i}")
    out.args = (tuple(values),)
    gm.recompile()
    return seg.replace_module(gm)


def _permute_inputs(seg: Segment, axes: dict[str, tuple[int, int]], inverse: torch.Tensor) -> Segment:
    gm = fx.GraphModule(seg.module, copy.deepcopy(seg.module.graph))
    g = gm.graph
    position = {n: i for i, n in enumerate(g.nodes)}
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, seg.inputs):
        if name not in axes or not node.users:
            continue
        users = list(node.users)
        with g.inserting_before(min(users, key=position.__getitem__)):
            restored = _select(gm, node, axes[name], inverse, f"_ditopt_row_order_{node.name}")
        for user in users:
            user.replace_input_with(node, restored)
    g.lint()
    gm.recompile()
    return seg.replace_module(gm)


def _select(gm: fx.GraphModule, value: fx.Node, axis: tuple[int, int], index: torch.Tensor, buffer: str) -> fx.Node:
    dim, offset = axis
    gm.register_buffer(buffer, _full_index(index, offset))
    g = gm.graph
    idx = g.get_attr(buffer)
    node = g.call_function(aten.index_select.default, (value, dim, idx))
    if isinstance(value.meta.get("val"), torch.Tensor):
        node.meta["val"] = value.meta["val"]
    return node
