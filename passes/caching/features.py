"""TaylorSeer-style forecasting of pre-gate branch features, with the adaLN gate recomputed.

A block's *features* are the outputs of its attention output projections and FFN down
projections (roles `attn*.out`, `ffn*.down` from capture): what the block adds to its streams
before the adaLN gate scales it. Each block gets two variant segments:

* `block.i:record`: the block as captured, also returning its features;
* `block.i:forecast`: the features are inputs instead; dead-code elimination then drops the
  attention and FFN, leaving the modulation (gate, shift, scale from the timestep embedding),
  the gate multiply and the residual adds. The gate therefore follows the current timestep
  exactly while the features are Taylor-forecast.

Where every block's forecast variant is *additive*, ``out = in + sum_f gate_f * feature_f``
with gates that depend on the conditioning only (DiT, PixArt: adaLN-Zero), a skipped step does
not run the blocks' forecast variants one by one. The cache holds all blocks' features stacked
channel-major (``[batch, channels, features, tokens]``), and the whole stack's output is one
batched matrix product per Taylor term over that stack, with the gates and Taylor coefficients
as weights. The arithmetic is the same; the memory traffic is about a third of eight
elementwise passes per block, which at the zoo models' width were most of a skipped step.
A third variant per block, `block.i:gates`, computes just the gates. Blocks of any other form
(FLUX's two streams, ungated outputs that feed a norm) keep the per-block path.
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
_ADD = torch.ops.aten.add.Tensor
_MUL = torch.ops.aten.mul.Tensor


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
    _prune(graph)
    return _variant(segment, f"{segment.name}:forecast", graph, segment.outputs)


def _variant(base: Segment, name: str, graph: fx.Graph, outputs: tuple[str, ...]) -> Segment:
    """A variant segment `name` (block:suffix) of `base`'s block, reading what `graph`'s placeholders name."""
    inputs = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    module = fx.GraphModule(base.module, graph, class_name=f"{type(base.module).__name__}_{name.rsplit(':', 1)[1]}")
    return Segment(name, "variant", base.block, module, inputs, outputs)


def _prune(graph: fx.Graph) -> None:
    # FX's eliminate_dead_code keeps ops tagged nondeterministic (sdpa and dropout carry a
    # dropout RNG); in eval graphs they are pure, so drop every unused node ourselves.
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr", "placeholder") and not node.users:
            graph.erase_node(node)


@dataclass(frozen=True)
class AdditiveForm:
    """A forecast variant that computes ``stream_out = stream_in + sum_f gate_f * feature_f``:
    `gates` holds, per feature (in the stage's feature order), the output name of the block's
    `:gates` variant that scales it, or None where nothing does."""

    stream_in: str
    stream_out: str
    gates: tuple[str | None, ...]


def _val(node: fx.Node) -> Any:
    return node.meta.get("val")


def _depends_on(node: fx.Node, targets: set[fx.Node]) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in targets:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def additive_form(forecast: Segment, features: list[str]) -> tuple[AdditiveForm, Segment | None] | None:
    """The additive form of a block's forecast variant and its `:gates` variant (None when no
    feature is gated), or None when the variant is not of that form. Checked on the graph: a
    chain of adds from one stream input to the single output, each adding one feature or one
    feature times a gate that reads neither the stream nor any feature, nothing else using the
    partial sums, and every feature, gate and the stream of one dtype, the features of the
    stream's [batch, tokens, channels] shape and the gates constant over tokens."""
    graph = forecast.module.graph
    by_name = {n.name: n for n in graph.nodes}
    placeholders = {by_name.get(f + FORECAST_SUFFIX): f for f in features}
    if None in placeholders or len(forecast.outputs) != 1:
        return None
    (result,) = next(n for n in graph.nodes if n.op == "output").args[0]
    gate_of: dict[str, fx.Node | None] = {}
    node = result
    while isinstance(node, fx.Node) and node.op != "placeholder":
        if node.op != "call_function" or node.target != _ADD or node.kwargs or len(node.args) != 2 or len(node.users) != 1:
            return None
        terms = [_term(a, placeholders) for a in node.args]
        pick = 0 if terms[0] is not None else 1
        if terms[pick] is None or terms[pick][0] in gate_of:
            return None
        feature, gate = terms[pick]
        gate_of[feature] = gate
        node = node.args[1 - pick]
    if not isinstance(node, fx.Node) or node in placeholders or set(gate_of) != set(features):
        return None
    stream = _val(node)
    if not isinstance(stream, torch.Tensor) or stream.dim() != 3:
        return None
    blocked = set(placeholders) | {node}
    for feature in features:
        value = _val(by_name[feature + FORECAST_SUFFIX])
        gate = gate_of[feature]
        if not isinstance(value, torch.Tensor) or value.shape != stream.shape or value.dtype != stream.dtype:
            return None
        if gate is not None:
            g = _val(gate)
            if not isinstance(g, torch.Tensor) or g.dtype != stream.dtype or _depends_on(gate, blocked):
                return None
            shape = (1,) * (3 - g.dim()) + tuple(g.shape)
            if g.dim() > 3 or shape[1] != 1 or shape[0] not in (1, stream.shape[0]) or shape[2] not in (1, stream.shape[2]):
                return None
    gated = [gate_of[f] for f in features if gate_of[f] is not None]
    form = AdditiveForm(node.name, forecast.outputs[0], tuple(g.name if g is not None else None for g in (gate_of[f] for f in features)))
    if not gated:
        return form, None
    gates_graph = copy.deepcopy(graph)
    copied = {n.name: n for n in gates_graph.nodes}
    out = next(n for n in gates_graph.nodes if n.op == "output")
    out.args = (tuple(copied[g.name] for g in gated),)
    _prune(gates_graph)
    name = forecast.name.rsplit(":", 1)[0] + ":gates"
    return form, _variant(forecast, name, gates_graph, tuple(g.name for g in gated))


def _term(node: Any, placeholders: dict) -> tuple[str, fx.Node | None] | None:
    """(feature, gate) when `node` is a feature placeholder or a gate times one, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node in placeholders:
        return placeholders[node], None
    if node.op == "call_function" and node.target == _MUL and not node.kwargs and len(node.args) == 2 and len(node.users) == 1:
        a, b = node.args
        if b in placeholders and isinstance(a, fx.Node) and a not in placeholders:
            return placeholders[b], a
        if a in placeholders and isinstance(b, fx.Node) and b not in placeholders:
            return placeholders[a], b
    return None


def add_feature_variants(graph: DiTGraph, blocks: tuple[str, ...]) -> tuple[DiTGraph, dict[str, list[str]], tuple[AdditiveForm, ...] | None]:
    """Record and forecast variants of every block, and, when all blocks are additive and chain
    one stream (each block adds to what the previous one returned), their additive forms with
    `:gates` variants; else None for the forms."""
    features: dict[str, list[str]] = {}
    forms: list[tuple[AdditiveForm, Segment | None] | None] = []
    for name in blocks:
        seg = graph.segment(name)
        feats = feature_nodes(seg)
        if not feats:
            raise NoFeaturesError(f"{name} has no attention-output or FFN-down projection to forecast")
        features[name] = feats
        forecast = forecast_variant(seg, feats)
        graph = graph.with_variant(record_variant(seg, feats)).with_variant(forecast)
        forms.append(additive_form(forecast, feats))
    if any(f is None for f in forms) or any(b[0].stream_in != a[0].stream_out for a, b in zip(forms, forms[1:])):
        return graph, features, None
    for _, gates in forms:
        if gates is not None:
            graph = graph.with_variant(gates)
    return graph, features, tuple(f[0] for f in forms)


@dataclass
class FeatureForecast(Stage):
    """Compute the blocks (recording their features) on scheduled steps; otherwise run the
    forecast variants with Taylor-forecast features."""

    blocks: tuple[str, ...]
    features: dict[str, tuple[str, ...]]
    policy: StaticSchedule
    order: int = 2
    key: str = "features"
    additive: tuple[AdditiveForm, ...] | None = None  # per block; set: skipped steps forecast the stack at once
    kind = "feature-forecast"
    exportable = True

    def segment_names(self) -> tuple[str, ...]:
        return self.blocks

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "segments": list(self.blocks), "order": self.order,
                "stacked_forecast": self.additive is not None, **self.policy.describe()}

    def spec(self) -> StageSpec:
        policy, tensors = policy_spec(self.policy, f"{self.key}.")
        additive = None if self.additive is None else [
            {"stream_in": f.stream_in, "stream_out": f.stream_out, "gates": list(f.gates)} for f in self.additive]
        return {"kind": self.kind, "blocks": list(self.blocks), "features": {b: list(f) for b, f in self.features.items()},
                "order": self.order, "key": self.key, "policy": policy, "additive": additive}, tensors

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        # One Taylor cache per block, or one over all blocks' stacked features (additive blocks).
        caches = {"stack": TaylorCache(self.order)} if self.additive is not None else {b: TaylorCache(self.order) for b in self.blocks}
        state = ctx.state.setdefault(self.key, {"taylor": caches, "history": [], "cached_run": 0})
        caches = state["taylor"]
        t = ctx.timestep if ctx.timestep is not None else float(ctx.step)
        compute = next(iter(caches.values())).t is None or static_decision(self.policy, ctx, state)
        if compute:
            self._record(graph, env, caches, t)
            state["history"].append(t)
            ctx.record.setdefault("computed", []).extend(self.blocks)
        elif self.additive is not None:
            self._forecast_stack(graph, env, caches["stack"], t)
            ctx.record.setdefault("cached", []).extend(self.blocks)
        else:
            for name in self.blocks:
                for f, value in zip(self.features[name], caches[name].predict(t)):
                    env[f + FORECAST_SUFFIX] = value
                graph.segment(f"{name}:forecast").run(env)
            ctx.record.setdefault("cached", []).extend(self.blocks)

    def _record(self, graph: DiTGraph, env: dict[str, Any], caches: dict[str, TaylorCache], t: float) -> None:
        """Compute the blocks and cache their features: per block, or stacked channel-major
        (``[batch, channels, features, tokens]``) for the stacked forecast."""
        stacked = []
        for name in self.blocks:
            graph.segment(f"{name}:record").run(env)
            values = [env[f] for f in self.features[name]]
            if self.additive is None:
                caches[name].update(values, t)
            else:
                stacked.extend(v.transpose(1, 2) for v in values)
        if self.additive is not None:
            caches["stack"].update([torch.stack(stacked, dim=2)], t)

    def _forecast_stack(self, graph: DiTGraph, env: dict[str, Any], cache: TaylorCache, t: float) -> None:
        """The per-block forecast's arithmetic over all blocks at once (see the module docstring)."""
        assert self.additive is not None
        stream = env[self.additive[0].stream_in]
        b, n, c = stream.shape
        gates = []
        for name, form in zip(self.blocks, self.additive):
            if any(g is not None for g in form.gates):
                graph.segment(f"{name}:gates").run(env)
            gates.extend(stream.new_ones(b, c) if g is None else env[g].expand(b, 1, c).reshape(b, c) for g in form.gates)
        env[self.additive[-1].stream_out] = stream + stacked_forecast(cache, t, torch.stack(gates, dim=-1)).transpose(1, 2)


def stacked_forecast(cache: TaylorCache, t: float, gates: torch.Tensor) -> torch.Tensor:
    """``sum_p gates[..., p] * forecast_p(t)`` over the stacked features: `cache` holds
    ``[batch, channels, P, tokens]`` terms, `gates` is ``[batch, channels, P]``; returns
    ``[batch, channels, tokens]``. One batched (1 x P) @ (P x tokens) product per Taylor term."""
    b, c, p = gates.shape
    out = None
    for coef, (term,) in zip(cache.coefficients(t), cache.diffs):
        weights = (gates * coef).view(b * c, 1, p)
        terms = term.view(b * c, p, -1)
        out = torch.bmm(weights, terms) if out is None else torch.baddbmm(out, weights, terms)
    assert out is not None
    return out.view(b, c, -1)


def _additive_from_spec(spec: Any) -> tuple[AdditiveForm, ...] | None:
    if spec is None:
        return None
    return tuple(AdditiveForm(f["stream_in"], f["stream_out"], tuple(f["gates"])) for f in spec)


register_stage_loader(FeatureForecast.kind, lambda spec, tensors: FeatureForecast(
    tuple(spec["blocks"]), {b: tuple(f) for b, f in spec["features"].items()}, policy_from_spec(spec["policy"], tensors),
    int(spec["order"]), spec["key"], _additive_from_spec(spec.get("additive"))))
