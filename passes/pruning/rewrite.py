"""Structural rewrites of the block stack, shared by the pruning passes.

A removed block keeps its segment (so that later passes and calibration statistics still see
one segment per block) but the segment carries each stream it updated through unchanged: no
weights, no multiply-adds. A bridged interval's first segment computes, per stream, the affine
map fitted on calibration activations (`LinearBridge`), reading the block's adaLN modulation
where the block had one; the interval's other segments pass through.

Segments are built with `make_fx` at the graph's own shapes, so they carry the value metadata
export and the runtime expect, and a rewrite replays on a graph captured at any other shape.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from ditopt.calibration.streams import span_io
from ditopt.graph import DiTGraph, Segment, attribute, example_args, remove_unused


def block_pairs(graph: DiTGraph, seg: Segment) -> tuple[tuple[str, str], ...]:
    """(input, output) of every stream the block updates."""
    return span_io(graph, (seg.name,)).pairs


def removable(graph: DiTGraph, seg: Segment) -> str | None:
    """Why the block cannot be passed through, or None: every output read after it must be an
    updated input stream."""
    io = span_io(graph, (seg.name,))
    if io.unpaired:
        return f"{seg.name} produces {', '.join(io.unpaired)}, which is not an updated input stream"
    return None


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def conditioning_module(seg: Segment, modulation: tuple[str, ...], streams: set[str]) -> tuple[fx.GraphModule, tuple[int, ...]] | None:
    """The part of a block segment that computes its adaLN modulation (per-sample vectors
    [batch, d]) from inputs other than the token streams, as a module of those inputs, with
    the positions of the segment inputs it reads; None when there is none, or when it reads a
    stream."""
    if not modulation:
        return None
    graph = copy.deepcopy(seg.module.graph)
    nodes = {n.name: n for n in graph.nodes}
    outs = [nodes[m] for m in modulation if m in nodes]
    if not outs or any(not isinstance(o.meta.get("val"), torch.Tensor) or o.meta["val"].dim() != 2 for o in outs):
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(outs),)
    # export's `_assert_tensor_metadata` checks are not kept: they would keep the whole block
    # (stream reads included) alive.
    remove_unused(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    positions = [i for i, n in enumerate(_placeholders(seg.module))]
    used = [(i, n) for i, n in zip(positions, placeholders) if n.users]
    if any(seg.inputs[i] in streams for i, _ in used):
        return None
    for i, n in zip(positions, placeholders):
        if not n.users:
            graph.erase_node(n)
    gm = fx.GraphModule(seg.module, graph)
    return gm, tuple(i for i, _ in used)


@dataclass(frozen=True)
class StreamBridge:
    """out = x + x @ a + m @ b + bias, per token; m: the modulation vector (or none)."""

    a: torch.Tensor  # [d, d]
    b: torch.Tensor | None  # [dm, d]
    bias: torch.Tensor  # [d]

    @property
    def parameters(self) -> int:
        return self.a.numel() + self.bias.numel() + (self.b.numel() if self.b is not None else 0)


class LinearBridge(nn.Module):
    """One block segment's stand-in for a removed interval: per updated stream the fitted
    affine map of the stream and the conditioning; streams without a fit pass through."""

    def __init__(self, pairs: list[int], bridges: list[StreamBridge | None], cond: fx.GraphModule | None,
                 cond_inputs: tuple[int, ...]) -> None:
        super().__init__()
        self.pairs, self.cond, self.cond_inputs = pairs, cond, cond_inputs
        self.fitted = [b is not None for b in bridges]
        for j, br in enumerate(bridges):
            if br is None:
                continue
            self.register_buffer(f"a{j}", br.a.clone())
            self.register_buffer(f"bias{j}", br.bias.clone())
            if br.b is not None:
                self.register_buffer(f"b{j}", br.b.clone())

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = None
        if self.cond is not None:
            parts = self.cond(*[inputs[i] for i in self.cond_inputs])
            m = torch.cat(list(parts), -1)
        outs = []
        for j, i in enumerate(self.pairs):
            x = inputs[i]
            if not self.fitted[j]:
                outs.append(x)
                continue
            y = x + x @ getattr(self, f"a{j}") + getattr(self, f"bias{j}")
            if hasattr(self, f"b{j}") and m is not None:
                y = y + (m @ getattr(self, f"b{j}")).unsqueeze(1)
            outs.append(y)
        return tuple(outs)


class _PassThrough(nn.Module):
    def __init__(self, positions: list[int]) -> None:
        super().__init__()
        self.positions = positions

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(inputs[i] for i in self.positions)


def _traced(seg: Segment, module: nn.Module) -> fx.GraphModule:
    with torch.no_grad():
        return make_fx(module)(*example_args(seg))


def pass_through_segment(graph: DiTGraph, seg: Segment) -> Segment:
    pairs = block_pairs(graph, seg)
    positions = [seg.inputs.index(i) for i, _ in pairs]
    module = _traced(seg, _PassThrough(positions))
    return dataclasses.replace(seg, module=module, inputs=seg.inputs, outputs=tuple(o for _, o in pairs))


def bridge_module(graph: DiTGraph, seg: Segment, bridges: dict[str, StreamBridge | None]) -> LinearBridge:
    """The (untraced) bridge module for block segment `seg`: what `bridge_segment` traces, and
    what distillation trains (its buffers a{j}, b{j}, bias{j}, j the position in `bridge_streams`)."""
    pairs = block_pairs(graph, seg)
    positions = [seg.inputs.index(i) for i, _ in pairs]
    needs_cond = any(b is not None and b.b is not None for b in bridges.values())
    info = next(b for b in graph.blocks if b.index == seg.block)
    cond = conditioning_module(seg, info.modulation, {i for i, _ in pairs}) if needs_cond else None
    return LinearBridge(positions, [bridges.get(i) for i, _ in pairs], cond[0] if cond else None, cond[1] if cond else ())


def bridge_streams(graph: DiTGraph, seg: Segment) -> tuple[str, ...]:
    """The updated streams of the block (input names), in the bridge module's order."""
    return tuple(i for i, _ in block_pairs(graph, seg))


def bridge_segment(graph: DiTGraph, seg: Segment, bridges: dict[str, StreamBridge | None]) -> Segment:
    """`bridges`: per updated stream of the block (its input name), the fitted map or None."""
    module = bridge_module(graph, seg, bridges)
    return dataclasses.replace(seg, module=_traced(seg, module), outputs=tuple(o for _, o in block_pairs(graph, seg)))


def segment_parameters(seg: Segment) -> int:
    """Floating-point weights the segment's graph reads (parameters, buffers, constants)."""
    seen, total = set(), 0
    for node in seg.module.graph.nodes:
        if node.op != "get_attr":
            continue
        t = attribute(seg.module, str(node.target))
        if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total
