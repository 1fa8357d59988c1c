"""The quantized linear layers in a segment graph.

A site is a linear layer of a block segment: every `aten.linear` node whose weight is a graph
attribute, named by the weight's module path (stable across captures at other shapes). A layer
plan says how to compute it: weight format, activation bits, and an orthogonal input transform
(smoothing scales s and a rotation R, `y = ((x / s) R) ((W s) R)^T + b = x W^T + b`). The rewrite
replaces the node by

* `ditopt::qdq_linear` (fake quantization, Q/DQ): the rotated weight's codes and scales as new
  buffers, decoded per call, the activation quantized-dequantized per token; the quality path,
  and how W4 runs here;
* `ditopt::int8_linear` (W8A8): int8 codes and scales as buffers, the integer GEMM on the
  activation quantized per token; the speed path.

New buffers live on the new segment module; the user's model's weights are only read.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx as fx

from ditopt.graph import DiTGraph, Segment, attribute, segment_with_buffers
from ditopt.kernels.quant import QuantizedWeight, quantize_weight

LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class Site:
    segment: str
    block: int | None
    target: str  # the weight's attribute path, e.g. transformer_blocks.3.attn1.to_q.weight
    nodes: tuple[str, ...]
    in_features: int
    out_features: int
    modulation: bool  # an adaLN modulation linear (kept by default)

    @property
    def name(self) -> str:
        """The layer's module path: what `keep` patterns and per-layer formats name."""
        return self.target[: -len(".weight")] if self.target.endswith(".weight") else self.target


@dataclass(frozen=True)
class LayerPlan:
    weights: str  # int8 | int4 | tlq4 | tlq3 | none
    activations: int  # bits, 0 for none
    rotation: str = "none"  # none | hadamard | smoothquant | outlier (smooth, then Hadamard)

    @property
    def is_float(self) -> bool:
        return self.weights == "none" and not self.activations and self.rotation == "none"

    def runs_int8_gemm(self, integer_w8a8: bool) -> bool:
        """W8A8 through `ditopt::int8_linear` (else Q/DQ)."""
        return integer_w8a8 and self.weights == "int8" and self.activations == 8

    @property
    def label(self) -> str:
        return f"{self.weights}/{'int%d' % self.activations if self.activations else 'none'}/{self.rotation}"

    @classmethod
    def parse(cls, text: str) -> "LayerPlan":
        parts = text.split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"layer format {text!r}: write 'weights/activations[/rotation]', e.g. 'tlq4/int8/hadamard'")
        acts = 0 if parts[1] == "none" else int(parts[1].removeprefix("int"))
        return cls(parts[0], acts, parts[2] if len(parts) == 3 else "none")


def weight_target(node: fx.Node) -> str | None:
    """The weight's attribute path of a linear node whose weight is a graph attribute, else None."""
    if node.op == "call_function" and node.target is LINEAR and isinstance(node.args[1], fx.Node) \
            and node.args[1].op == "get_attr":
        return str(node.args[1].target)
    return None


def linear_sites(graph: DiTGraph) -> list[Site]:
    sites = []
    for seg in graph.block_segments:
        info = next(b for b in graph.blocks if b.index == seg.block)
        by_target: dict[str, list[fx.Node]] = {}
        for node in seg.module.graph.nodes:
            if (target := weight_target(node)) is not None:
                by_target.setdefault(target, []).append(node)
        for target, nodes in by_target.items():
            w = attribute(seg.module, target)
            sites.append(Site(seg.name, seg.block, target, tuple(n.name for n in nodes), int(w.shape[1]),
                              int(w.shape[0]), any(n.name in info.modulation for n in nodes)))
    return sites


def kept(site: Site, patterns: tuple[str, ...], keep_modulation: bool) -> bool:
    return (keep_modulation and site.modulation) or any(fnmatch.fnmatchcase(site.name, p) for p in patterns)


@dataclass
class PreparedLayer:
    """A plan made concrete for one site: the transform and the quantized rotated weight."""

    plan: LayerPlan
    smooth: torch.Tensor | None  # [I]
    rotation: torch.Tensor | None  # [I, I]
    weight: QuantizedWeight | None
    dequantized: torch.Tensor  # [O, I] what the fake path multiplies by


def prepare(weight: torch.Tensor, plan: LayerPlan, smooth: torch.Tensor | None, rotation: torch.Tensor | None,
            group_size: int, importance: torch.Tensor | None = None) -> PreparedLayer:
    """`importance`: the transformed input's per-channel mean square, or None (uniform)."""
    w = weight.detach().float()
    if smooth is not None:
        w = w * smooth[None, :]
    if rotation is not None:
        w = w @ rotation
    if plan.weights == "none":
        return PreparedLayer(plan, smooth, rotation, None, w)
    q = quantize_weight(w, plan.weights, group_size, importance)
    return PreparedLayer(plan, smooth, rotation, q, q.dequantize())


def quantize_segment(seg: Segment, layers: dict[str, PreparedLayer], integer_w8a8: bool,
                     act_scales: dict[str, torch.Tensor] | None = None) -> Segment:
    """`seg` with each linear whose weight target is in `layers` replaced as its plan says;
    `act_scales` (weight target -> 0-d scale): static int8 activation scales for those layers."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    buffers: dict[str, torch.Tensor] = {}

    def buffer(name: str, value: torch.Tensor) -> fx.Node:
        buffers[name] = value
        return graph.get_attr(name)

    for node in seg.module.graph.nodes:
        target = weight_target(node)
        if target is None or target not in layers:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        layer = layers[target]
        tag = "_q_" + target.replace(".", "_")
        x = env[node.args[0]]
        bias = env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        if layer.smooth is not None:
            x = graph.call_function(torch.ops.aten.div.Tensor, (x, buffer(tag + "_smooth", layer.smooth)))
        if layer.rotation is not None:
            x = graph.call_function(torch.ops.aten.matmul.default, (x, buffer(tag + "_rot", layer.rotation)))
        plan = layer.plan
        static = (act_scales or {}).get(target) if plan.activations == 8 else None
        act_scale = buffer(tag + "_act_scale", static) if static is not None else None
        if plan.runs_int8_gemm(integer_w8a8):
            out = graph.call_function(torch.ops.ditopt.int8_linear.default,
                                      (x, buffer(tag + "_codes", layer.weight.codes), buffer(tag + "_scale", layer.weight.scale), bias,
                                       act_scale))
        else:
            # Codes and scales, not the dequantized weight: what the runtime holds and what the
            # ONNX export stores (int8 / uint4 initializers feeding DequantizeLinear).
            q = layer.weight
            if q is None:
                codes, scale, zero, fmt, group = buffer(tag + "_w", layer.dequantized), None, None, "none", 0
            else:
                codes, scale = buffer(tag + "_codes", q.codes), buffer(tag + "_scale", q.scale)
                zero = buffer(tag + "_zero", q.zero.to(torch.uint8)) if q.zero is not None else None
                fmt, group = q.fmt, q.group_size or 0
            out = graph.call_function(torch.ops.ditopt.qdq_linear.default,
                                      (x, codes, scale, zero, bias, fmt, group, plan.activations, act_scale))
        out.meta = dict(node.meta)
        env[node] = out
    return segment_with_buffers(seg, graph, buffers)
