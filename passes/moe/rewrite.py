"""The dense FFNs a MoE split can replace, and the segment rewrite that replaces them.

A splittable FFN is the chain `down(act(up(x)))` inside one block segment: one up projection
whose weight (and bias) are graph attributes, an elementwise activation used only by the down
projection, and a down projection that reads only the activation. FFNs that do not have that
shape are listed with the reason (a gated FFN with two up projections, FLUX's single blocks whose
down projection is shared with attention), never rewritten.

The rewrite replaces the down projection's node by `ditopt::moe_ffn` on the up projection's
input; the up projection and activation then have no users and are removed. The split's weights
are new buffers of the new segment module; the user's model's weights are only read.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditopt.graph import DiTGraph, Segment, attribute, segment_with_buffers

LINEAR = torch.ops.aten.linear.default
_ACTIVATION = {torch.ops.aten.gelu.default: "gelu", torch.ops.aten.silu.default: "silu", torch.ops.aten.relu.default: "relu"}


def _attr(node) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


@dataclass(frozen=True)
class FFN:
    segment: str
    block: int
    name: str  # module path of the FFN, e.g. transformer_blocks.3.ff
    up: str  # node names in the segment graph
    act: str
    down: str
    activation: str  # gelu | gelu_tanh | silu | relu (kernels.moe)
    w1: str  # attribute targets
    b1: str | None
    w2: str
    b2: str | None
    width: int
    hidden: int

    @property
    def parameters(self) -> int:
        return 2 * self.width * self.hidden


def _module_path(target: str) -> str:
    """transformer_blocks.3.ff.net.0.proj.weight -> transformer_blocks.3.ff"""
    parts = target.split(".")
    for marker in ("ff", "ff_context", "mlp", "ffn", "feed_forward"):
        if marker in parts:
            return ".".join(parts[: parts.index(marker) + 1])
    return ".".join(parts[:-2]) or target


def find_ffns(graph: DiTGraph) -> tuple[list[FFN], dict[str, str]]:
    """(the splittable FFNs, {FFN: why not} for the others)."""
    found: list[FFN] = []
    skipped: dict[str, str] = {}
    for info in graph.blocks:
        seg = graph.segment_for_block(info.index)
        nodes = {n.name: n for n in seg.module.graph.nodes}
        for site in info.ffn:
            label = f"block {info.index} {site.activation}"
            if len(site.up) != 1:
                skipped[label] = f"{len(site.up)} up projections (a gated FFN): not split"
                continue
            up, act = nodes.get(site.up[0]), nodes.get(site.activation)
            down = nodes.get(site.down) if site.down else None
            if up is None or act is None or down is None:
                skipped[label] = "no down projection in the block"
                continue
            if act.args[0] is not up or len(up.users) != 1 or len(act.users) != 1 or down.target is not LINEAR \
                    or down.args[0] is not act:
                skipped[label] = ("the activation's output feeds more than the down projection (e.g. concatenated "
                                  "with attention, FLUX single blocks): not split")
                continue
            w1, w2 = _attr(up.args[1]), _attr(down.args[1])
            b1 = _attr(up.args[2]) if len(up.args) > 2 and up.args[2] is not None else None
            b2 = _attr(down.args[2]) if len(down.args) > 2 and down.args[2] is not None else None
            if w1 is None or w2 is None or (len(up.args) > 2 and up.args[2] is not None and b1 is None):
                skipped[label] = "weights are not parameters of the model: not split"
                continue
            kind = _ACTIVATION.get(act.target)
            if kind == "gelu" and act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none") == "tanh":
                kind = "gelu_tanh"
            if kind is None:
                skipped[label] = f"activation {act.target} is not one the expert kernel runs"
                continue
            weight = attribute(seg.module, w1)
            found.append(FFN(seg.name, info.index, _module_path(w1), up.name, act.name, down.name, kind, w1, b1, w2, b2,
                             int(weight.shape[1]), int(weight.shape[0])))
    return found, skipped


def kept(ffn: FFN, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(ffn.name, p) for p in patterns)


def has_routed_experts(graph: DiTGraph) -> str | None:
    """The first block whose graph already routes tokens (top-k selection, or a ditopt MoE op)."""
    routed = {torch.ops.aten.topk.default, torch.ops.aten.sort.default, torch.ops.aten.argsort.default}
    moe = getattr(torch.ops.ditopt, "moe_ffn", None)
    for seg in graph.block_segments:
        for node in seg.module.graph.nodes:
            if node.op == "call_function" and (node.target in routed or (moe is not None and node.target is moe.default)):
                return f"block {seg.block} ({node.target})"
    return None


@dataclass
class ExpertWeights:
    """One FFN split into experts (kernels.moe layout)."""

    w1: torch.Tensor  # [H, D] permuted rows: shared, then expert 0, 1, ...
    b1: torch.Tensor  # [H]
    w2t: torch.Tensor  # [H, D]
    b2: torch.Tensor  # [D] the dense bias plus sum_e offsets[e]
    offsets: torch.Tensor  # [E, D] what a skipped expert counts as (its mean output)
    router_w: torch.Tensor  # [E, D]
    router_b: torch.Tensor  # [E]
    shared: int
    experts: int


def rewrite_segment(seg: Segment, splits: dict[str, tuple[FFN, ExpertWeights, int]]) -> Segment:
    """`seg` with each FFN whose down node is a key of `splits` routed at its top_k."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    buffers: dict[str, torch.Tensor] = {}

    def buffer(name: str, value: torch.Tensor) -> fx.Node:
        buffers[name] = value
        return graph.get_attr(name)

    by_name = {n.name: n for n in seg.module.graph.nodes}
    for node in seg.module.graph.nodes:
        if node.name not in splits:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        ffn, w, top_k = splits[node.name]
        tag = "_moe_" + ffn.name.replace(".", "_")
        x = env[by_name[ffn.up].args[0]]
        args = (x, buffer(tag + "_w1", w.w1), buffer(tag + "_b1", w.b1), buffer(tag + "_w2t", w.w2t),
                buffer(tag + "_b2", w.b2), buffer(tag + "_offsets", w.offsets),
                buffer(tag + "_router_w", w.router_w), buffer(tag + "_router_b", w.router_b),
                w.shared, w.experts, top_k, ffn.activation)
        out = graph.call_function(torch.ops.ditopt.moe_ffn.default, args)
        out.meta = dict(node.meta)
        env[node] = out
    return segment_with_buffers(seg, graph, buffers)
