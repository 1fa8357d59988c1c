"""Graph surgery shared by the attention substitutions: replace one block's
`aten.scaled_dot_product_attention` node by a `ditopt::` kernel op that expects the kernels'
token order (text prefix, image tokens tile-major), permuting q/k/v into that order and the
result back inside the block (so every other node of the graph keeps its token order)."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx

from ditopt.graph import AttentionSite, DiTGraph, Segment

from .collector import plain_sdpa, sdpa_scale, site_node
from .masses import kernel_order
from .token_order import site_token_order

aten = torch.ops.aten


def substitutable(graph: DiTGraph, site: AttentionSite) -> str | None:
    """Why `site` cannot be substituted, or None when it can."""
    if site.kind == "cross":
        return "cross-attention"
    if graph.grid is None or len(graph.grid) != 2:
        return "image tokens are not on a known 2-D grid"
    h, w = graph.grid
    if site.image_tokens != h * w or not (site.query_tokens == site.key_tokens == site.image_tokens + site.text_tokens):
        return "token counts do not match the grid"
    return None


def substituted(graph: DiTGraph, block: int, site: AttentionSite) -> dict[str, Any] | None:
    """The substitution already made for `site` in this block's segment, if any."""
    for node in graph.segment_for_block(block).module.graph.nodes:
        sub = node.meta.get("ditopt", {}).get("substitution")
        if sub and sub.get("site") == site.node:
            return sub
    return None


def replace_attention(
    graph: DiTGraph,
    block: int,
    site: AttentionSite,
    op: Callable,
    op_args: Callable[[int, float | None], tuple],
    record: dict[str, Any],
    segment: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> DiTGraph | None:
    """New graph with `site`'s sdpa node in `block` replaced by `op(q', k', v', *weights,
    *op_args(n_text, scale))` on tokens in the kernels' order; None when the node is not a plain
    sdpa (masked, causal, or already replaced). `segment` names another segment of the block
    holding the same node (a variant an earlier pass copied from it); default: the block's
    segment. `weights` (name -> tensor) become parameters of the new segment (frozen), read by
    the op: a substitute's own weights (linear attention's value convolution)."""
    seg = graph.segment(segment) if segment is not None else graph.segment_for_block(block)
    gm = fx.GraphModule(seg.module, copy.deepcopy(seg.module.graph))
    g = gm.graph
    node = site_node(gm, site.node)
    if node is None or not plain_sdpa(node):
        return None
    tile = record["tile"]
    # Index from the site's current token order (row-major, or tile-major when the graph was
    # reordered once) to the kernels' order.
    needed = kernel_order(site.image_tokens, site.text_tokens, site.text_first, graph.grid, tile)
    current = site_token_order(graph, site.image_tokens, site.text_tokens, site.text_first)
    where = torch.empty_like(current)
    where[current] = torch.arange(current.numel())
    order = where[needed]
    identity = bool(torch.equal(order, torch.arange(order.numel())))
    q, k, v = node.args[:3]
    # What restore_dense needs to put the original call back (plain sdpa: the rest are constants).
    restore = {"qkv": (q.name, k.name, v.name), "args": tuple(node.args[3:]), "kwargs": dict(node.kwargs), "site": node.name}
    with g.inserting_before(node):
        if not identity:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel())
            base = f"_ditopt_token_order_{site.node}"
            gm.register_buffer(base, order)
            gm.register_buffer(base + "_inverse", inverse)
            fwd, back = g.get_attr(base), g.get_attr(base + "_inverse")
            q, k, v = (_index(g, x, fwd) for x in (q, k, v))
        extra = []
        for name, tensor in (weights or {}).items():
            gm.register_parameter(name, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
            extra.append(g.get_attr(name))
        new = g.call_function(op, (q, k, v, *extra, *op_args(site.text_tokens, sdpa_scale(node))))
        new.meta["val"] = node.meta.get("val")
        out = new if identity else _index(g, new, back)
    new.meta["ditopt"] = {**node.meta.get("ditopt", {}), "substitution": {**record, "site": site.node}, "restore": {**restore, "out": out.name}}
    if "nn_module_stack" in node.meta:
        new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
    node.replace_all_uses_with(out)
    g.erase_node(node)
    g.lint()
    gm.recompile()
    return graph.with_segment(seg.replace_module(gm))


def restore_dense(segment: Segment) -> fx.GraphModule | None:
    """`segment`'s module with every substitution made with dense steps (record
    "dense_steps" > 0) put back to the original sdpa call on the original q/k/v; None when it
    has none. The derive function of the attention passes' EarlySteps rule: it also applies to
    copies of a substituted block that later passes make (feature forecasting's `:record`)."""
    graph = copy.deepcopy(segment.module.graph)
    by_name = {n.name: n for n in graph.nodes}
    kernels = [
        n for n in graph.nodes
        if "restore" in (n.meta.get("ditopt") or {}) and n.meta["ditopt"].get("substitution", {}).get("dense_steps", 0) > 0
    ]
    if not kernels:
        return None
    for kernel in kernels:
        info = kernel.meta["ditopt"]["restore"]
        out = by_name[info["out"]]
        qkv = tuple(by_name[name] for name in info["qkv"])
        gathers = [a for a in kernel.args[:3] if isinstance(a, fx.Node) and a not in qkv and a.target == aten.index_select.default]
        with graph.inserting_before(kernel):
            dense = graph.create_node(
                "call_function", aten.scaled_dot_product_attention.default, (*qkv, *info["args"]), dict(info["kwargs"]), name=info["site"]
            )
        dense.meta = {**kernel.meta, "ditopt": {k: v for k, v in kernel.meta["ditopt"].items() if k not in ("substitution", "restore")}}
        out.replace_all_uses_with(dense)
        # Drop the kernel, its token-order gathers and their index buffers (users before inputs).
        index = [n.args[2] for n in (out, *gathers) if n is not kernel and isinstance(n.args[2], fx.Node)]
        for node in dict.fromkeys((out, kernel, *gathers, *index)):
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(segment.module, graph, class_name=f"{type(segment.module).__name__}_dense")


def _index(g: fx.Graph, x: fx.Node, index: fx.Node) -> fx.Node:
    node = g.call_function(aten.index_select.default, (x, 2, index))
    if isinstance(x.meta.get("val"), torch.Tensor):
        node.meta["val"] = x.meta["val"]
    return node
