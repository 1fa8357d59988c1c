"""TaylorSeer-style forecasting of pre-gate branch features, with the adaLN gate recomputed.

A block's *features* are the outputs of its attention output projections and FFN down
projections (roles `attn*.out`, `ffn*.down` from capture): what the block adds to its streams
before the adaLN gate scales it. Each block gets two variant segments:

* `block.i:record`: the block as captured, also returning its features;
* `block.i:forecast`: the features are inputs instead; dead-code elimination then drops the
  attention and FFN, leaving the modulation (gate, shift, scale from the timestep embedding),
  the gate multiply and the residual adds. The gate therefore follows the current timestep
  exactly while the features are Taylor-forecast.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ditopt.graph import DiTGraph, Segment
from ditopt.plan import Stage, StageSpec, StepContext, register_stage_loader

from .stage import StaticSchedule, TaylorCache, policy_from_spec, policy_spec, static_decision

FORECAST_SUFFIX = "__forecast"
_CHECK_OPS = {torch.ops.aten._assert_tensor_metadata.default}


class NoFeaturesError(ValueError):
    """A block has no attention-output or FFN-down projection to forecast."""


def feature_nodes(segment: Segment) -> list[str]:
    names = []
    for node in segment.module.graph.nodes:
        role = (node.meta.get("ditopt") or {}).get("role") or ""
        if node.op == "call_function" and (role.endswith(".out") or role.endswith(".down")) and node.name not in names:
            names.append(node.name)
    return names


def _copy_graph(segment: Segment) -> fx.Graph:
    return copy.deepcopy(segment.module.graph)


def record_variant(segment: Segment, features: list[str]) -> Segment:
    graph = _copy_graph(segment)
    by_name = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) + tuple(by_name[f] for f in features),)
    module = fx.GraphModule(segment.module, graph, class_name=f"{type(segment.module).__name__}_record")
    return Segment(f"{segment.name}:record", "variant", segment.block, module, segment.inputs, segment.outputs + tuple(features))


def forecast_variant(segment: Segment, features: list[str]) -> Segment:
    graph = _copy_graph(segment)
    by_name = {n.name: n for n in graph.nodes}
    first = next(iter(graph.nodes))
    for f in features:
        with graph.inserting_before(first):
            ph = graph.placeholder(f + FORECAST_SUFFIX)
        ph.meta = dict(by_name[f].meta)
        by_name[f].replace_all_uses_with(ph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _CHECK_OPS:
            graph.erase_node(node)  # shape checks would keep the dropped branches alive
    # FX's eliminate_dead_code keeps ops tagged nondeterministic (sdpa and dropout carry a
    # dropout RNG); in eval graphs they are pure, so drop every unused node ourselves.
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr", "placeholder") and not node.users:
            graph.erase_node(node)
    inputs = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    module = fx.GraphModule(segment.module, graph, class_name=f"{type(segment.module).__name__}_forecast")
    return Segment(f"{segment.name}:forecast", "variant", segment.block, module, inputs, segment.outputs)


def add_feature_variants(graph: DiTGraph, blocks: tuple[str, ...]) -> tuple[DiTGraph, dict[str, list[str]]]:
    features: dict[str, list[str]] = {}
    for name in blocks:
        seg = graph.segment(name)
        feats = feature_nodes(seg)
        if not feats:
            raise NoFeaturesError(f"{name} has no attention-output or FFN-down projection to forecast")
        features[name] = feats
        graph = graph.with_variant(record_variant(seg, feats)).with_variant(forecast_variant(seg, feats))
    return graph, features


@dataclass
class FeatureForecast(Stage):
    """Compute the blocks (recording their features) on scheduled steps; otherwise run the
    forecast variants with Taylor-forecast features."""

    blocks: tuple[str, ...]
    features: dict[str, tuple[str, ...]]
    policy: StaticSchedule
    order: int = 2
    key: str = "features"
    kind = "feature-forecast"
    exportable = True

    def segment_names(self) -> tuple[str, ...]:
        return self.blocks

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "segments": list(self.blocks), "order": self.order, **self.policy.describe()}

    def spec(self) -> StageSpec:
        policy, tensors = policy_spec(self.policy, f"{self.key}.")
        return {"kind": self.kind, "blocks": list(self.blocks), "features": {b: list(f) for b, f in self.features.items()},
                "order": self.order, "key": self.key, "policy": policy}, tensors

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        state = ctx.state.setdefault(self.key, {"taylor": {b: TaylorCache(self.order) for b in self.blocks}, "history": [], "cached_run": 0})
        t = ctx.timestep if ctx.timestep is not None else float(ctx.step)
        first = state["taylor"][self.blocks[0]]
        compute = first.t is None or static_decision(self.policy, ctx, state)
        for name in self.blocks:
            taylor = state["taylor"][name]
            if compute:
                graph.segment(f"{name}:record").run(env)
                taylor.update([env[f] for f in self.features[name]], t)
            else:
                for f, value in zip(self.features[name], taylor.predict(t)):
                    env[f + FORECAST_SUFFIX] = value
                graph.segment(f"{name}:forecast").run(env)
        if compute:
            state["history"].append(t)
            ctx.record.setdefault("computed", []).extend(self.blocks)
        else:
            ctx.record.setdefault("cached", []).extend(self.blocks)


register_stage_loader(FeatureForecast.kind, lambda spec, tensors: FeatureForecast(
    tuple(spec["blocks"]), {b: tuple(f) for b, f in spec["features"].items()}, policy_from_spec(spec["policy"], tensors),
    int(spec["order"]), spec["key"]))
