"""Width pruning: remove FFN hidden neurons and attention heads, structurally.

Importance is measured on calibration activations (collector "block_inputs", replayed with
`CalibrationReplay.node_inputs`): FFN neuron i scores mean_tokens |a_i| * ||W2[:, i]|| (a the
activation feeding the down projection), attention head h scores
mean_tokens ||o_h W_o[:, h]^T|| (o_h the head's attention output, W_o[:, h] its columns of the
output projection). The least important units go: the up projection loses rows, the down
projection columns; q/k/v lose the head's rows, the output projection its columns, and the
view/reshape nodes between them get the new head count. The matrices are smaller, never masked.

With `correction = "least_squares"` the projection after the cut (the FFN's down projection,
attention's output projection) is refitted, weight and bias, by ridge least squares in float64
from the kept units' activations to the original projection's output on the calibration tokens,
so that what the removed units contributed on average (and what the kept ones can stand in for)
is not lost.

How much: `ffn_ratio` / `head_ratio` apply to every layer as written; `layers` ({layer: units
removed}) is what a search resolves to. A ratio left unset is searched: each layer's replayed
output error is measured alone at every level (eighths of the FFN width, single heads, up to
`max_ratio`), a ladder of plans is built from every layer at its largest level towards dense by
giving back, one level at a time, the level whose error falls most per multiply-add it costs,
and the one budget search (ditopt.search) bisects over the ladder; the held-out check judges
the choice end to end.

Heads are pruned only where the graph's shapes can be rewritten and checked: one head removed
must equal the original segment with that head's output-projection columns zeroed on random
inputs. Sites that fail (a norm over all heads' features, GQA, a fused output shared with the
MLP as in FLUX's single blocks) keep their heads and are listed with the reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator

from ditopt.calibration.replay import CalibrationReplay
from ditopt.costs import segment_macs
from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.fit import bias_features, ridge_solve
from ditopt.graph import AttentionSite, DiTGraph, Segment, attribute, example_args, segment_with_buffers
from ditopt.passes.moe.rewrite import FFN, LINEAR, find_ffns  # the FFN finder moe_split splits with
from ditopt.profiles.fields import Float, Int
from ditopt.registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, register_pass
from ditopt.search import BudgetSearch

from .rewrite import segment_parameters

PREFIX = "_width_"  # buffer names of pruned weights: a second application sees them and leaves the layer be
FFN_LEVELS = 8  # the search cuts FFNs in eighths of their width
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


class WidthPruneConfig(PassConfig):
    """Remove FFN neurons and attention heads: ratios as written, or per layer by the budget."""

    ffn_ratio: Float | None = Field(None, ge=0, lt=1, description="fraction of every FFN's hidden neurons removed "
                                    "(0: none); unset: searched per FFN against the budget")
    head_ratio: Float | None = Field(None, ge=0, lt=1, description="fraction of every attention's heads removed "
                                     "(0: none); unset: searched per attention against the budget")
    layers: dict[str, Int] | None = Field(None, description="units removed per layer by module path (FFN: neurons, "
                                          "attention: heads); what the search resolves to; layers not named stay whole")
    correction: Literal["least_squares", "none"] = Field(
        "least_squares", description="refit the projection after the cut (FFN down, attention out) on calibration "
                                     "activations towards the original output, or keep its remaining weights")
    max_ratio: Float = Field(0.75, gt=0, lt=1, description="the search removes at most this fraction of a layer")
    keep: tuple[str, ...] = Field((), description="layer module path patterns (fnmatch) left whole")
    ridge: Float = Field(1e-4, ge=0, le=1, description="least-squares damping, relative to the mean diagonal of the "
                         "normal matrix (the bias undamped)")
    margin_db: Float = Field(0.5, ge=0, description="PSNR margin over the pass's share of the budget on the search's samples")
    rows: Int = Field(64, ge=2, le=4096, description="calibration (trajectory, step) rows importance and fits read")
    tokens_per_row: Int = Field(32, ge=1, le=65536, description="tokens of each calibration row importance and fits read")

    def searched(self) -> bool:
        return self.layers is None and (self.ffn_ratio is None or self.head_ratio is None)

    def needs_calibration(self) -> bool:
        """Importance is measured on calibration activations, whatever the amounts."""
        return True

    @model_validator(mode="after")
    def _valid(self) -> "WidthPruneConfig":
        if self.layers is not None and (self.ffn_ratio is not None or self.head_ratio is not None):
            raise ValueError("width_prune: give layers (per layer) or ffn_ratio / head_ratio (every layer), not both")
        for name, n in (self.layers or {}).items():
            if n < 0:
                raise ValueError(f"width_prune layers[{name!r}] = {n}: the units removed are 0 or more")
        return self


# -- the layers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """One prunable FFN or attention of a block: `units` neurons or heads, each costing
    `unit_macs` multiply-adds per call (at the pass's capture)."""

    kind: Literal["ffn", "heads"]
    name: str  # module path: "blocks.0.mlp", "transformer_blocks.2.attn1"
    segment: str
    block: int
    units: int
    unit_macs: int
    ffn: FFN | None = None
    site: AttentionSite | None = None

    def watch(self) -> dict[str, str]:
        """{node: key}: the nodes whose first argument the importance and the fit read."""
        if self.kind == "ffn":
            return {self.ffn.down: f"{self.name}:{self.ffn.down}"}
        return {o: f"{self.name}:{o}" for o in self.site.out}


def _attr(node: Any) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _tokens(node: fx.Node) -> int:
    val = node.meta.get("val")
    return int(val.numel() // val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else 1


def _linear_parts(module: fx.GraphModule, node: fx.Node) -> tuple[str, str | None] | None:
    """(weight target, bias target or None) of an aten.linear whose weights are attributes."""
    if node.target is not LINEAR or len(node.args) < 2 or _attr(node.args[1]) is None:
        return None
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None and _attr(bias) is None:
        return None
    return _attr(node.args[1]), _attr(bias)


def _head_layer(seg: Segment, block: int, site: AttentionSite) -> tuple[Layer | None, str | None]:
    """The attention site as a prunable layer, or why not (before the numeric check)."""
    nodes = {n.name: n for n in seg.module.graph.nodes}
    pruned = [n for n in site.q + site.k + site.v + site.out if n in nodes
              and any(str(a.target).startswith(PREFIX) for a in nodes[n].all_input_nodes if a.op == "get_attr")]
    if pruned:
        return None, "already width-pruned"
    if site.heads < 2:
        return None, "a single head"
    if not site.out:
        return None, "no output projection fed by the attention alone (e.g. concatenated with the MLP)"
    proj = dict.fromkeys(site.q + site.k + site.v)
    width = site.heads * site.head_dim
    sdpa = nodes[site.node].meta.get("val") if site.node in nodes else None
    # Per head removed: its q.k and p.v products, its projection rows and its output columns.
    macs = 2 * (sdpa.numel() // width) * site.key_tokens * site.head_dim if isinstance(sdpa, torch.Tensor) else 0
    for name in list(proj) + list(site.out):
        node = nodes.get(name)
        parts = _linear_parts(seg.module, node) if node is not None else None
        if parts is None:
            return None, f"{name} is not a linear with the model's weights"
        w = attribute(seg.module, parts[0])
        if name in site.out:
            if w.shape[1] != width:
                return None, f"the output projection reads {w.shape[1]} features, not heads x head_dim = {width}"
            macs += _tokens(node.args[0]) * site.head_dim * w.shape[0]
        else:
            if w.shape[0] % width:
                return None, f"{name} has {w.shape[0]} outputs, not a multiple of heads x head_dim = {width}"
            macs += _tokens(node.args[0]) * (w.shape[0] // site.heads) * w.shape[1]
    return Layer("heads", site.module, seg.name, block, site.heads, int(macs), site=site), None


def find_layers(graph: DiTGraph) -> tuple[list[Layer], dict[str, str]]:
    """(the prunable FFNs and attentions in block order, {layer: why not} for the others)."""
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    ffns, not_ffns = find_ffns(graph)
    skipped.update({k: v.replace("not split", "not pruned") for k, v in not_ffns.items() if "expert kernel" not in v})
    by_block: dict[int, list[Layer]] = {}
    for f in ffns:
        if f.w1.startswith(PREFIX):
            skipped[f"block {f.block} ffn"] = "already width-pruned"
            continue
        seg = graph.segment(f.segment)
        down = next(n for n in seg.module.graph.nodes if n.name == f.down)
        by_block.setdefault(f.block, []).append(
            Layer("ffn", f.name, f.segment, f.block, f.hidden, 2 * f.width * _tokens(down.args[0]), ffn=f))
    for info in graph.blocks:
        seg = graph.segment_for_block(info.index)
        for site in info.attention:
            layer, why = _head_layer(seg, info.index, site)
            if layer is None:
                skipped[site.module] = f"heads kept: {why}"
            else:
                by_block.setdefault(info.index, []).append(layer)
    for b in sorted(by_block):
        layers += sorted(by_block[b], key=lambda l: (l.kind != "heads", l.name))
    return layers, skipped


# -- the cut and its fit -----------------------------------------------------------------------
def ridge_fit(x: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares [x, 1] -> target in float64, the bias undamped: ([d_out, d_in], [d_out])."""
    # lstsq (gelsd) rather than solve: with ridge 0 and fewer tokens than units the system is singular.
    w = ridge_solve(bias_features(x), target, ridge, singular_ok=True)
    return w[:-1].T.float().contiguous(), w[-1].float().contiguous()


def _rows(heads: tuple[int, ...], total: int, head_dim: int, features: int) -> torch.Tensor:
    """Rows of a projection producing `features` = chunks x total x head_dim (q, k, v fused or not)
    that belong to the kept `heads`, chunk by chunk."""
    chunks = features // (total * head_dim)
    h = torch.tensor(heads)
    per = (h[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return (torch.arange(chunks)[:, None] * total * head_dim + per).reshape(-1)


@dataclass(frozen=True)
class Cut:
    """One layer at one amount: the kept units and the new weights by original attribute target."""

    kept: tuple[int, ...]
    weights: dict[str, torch.Tensor]  # attribute target -> replacement (a None bias refitted: key target-of-weight + ':bias')
    residual: float  # relative squared error of the projection's output on the calibration tokens


class Pruner:
    """Importance per layer (once), cuts per (layer, amount) (once), graphs for any plan."""

    def __init__(self, graph: DiTGraph, layers: list[Layer], config: WidthPruneConfig,
                 inputs: dict[str, torch.Tensor]) -> None:
        self.graph, self.config, self.inputs = graph, config, inputs
        self.layers = {l.name: l for l in layers}
        self.order: dict[str, list[int]] = {}  # units, least important first
        self.importance: dict[str, torch.Tensor] = {}
        self._cuts: dict[tuple[str, int, str], Cut] = {}
        for layer in layers:
            score = self._importance(layer)
            self.importance[layer.name] = score
            self.order[layer.name] = sorted(range(layer.units), key=lambda i: (float(score[i]), i))

    def _w(self, layer: Layer, target: str | None) -> torch.Tensor | None:
        return attribute(self.graph.segment(layer.segment).module, target).detach().float() if target else None

    def _outs(self, layer: Layer) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, str, str | None]]:
        """Per projection after the cut: (node, its calibration input, weight, bias, targets)."""
        module = self.graph.segment(layer.segment).module
        nodes = {n.name: n for n in module.graph.nodes}
        outs = []
        for node, key in layer.watch().items():
            w_t, b_t = _linear_parts(module, nodes[node])
            outs.append((node, self.inputs[key], self._w(layer, w_t), self._w(layer, b_t), w_t, b_t))
        return outs

    def _importance(self, layer: Layer) -> torch.Tensor:
        score = torch.zeros(layer.units, dtype=torch.float64)
        for _, x, w, _, _, _ in self._outs(layer):
            if layer.kind == "ffn":
                score += (x.abs().double().mean(0) * w.double().norm(dim=0))
            else:
                d = layer.site.head_dim
                for h in range(layer.units):
                    sl = slice(h * d, (h + 1) * d)
                    score[h] += (x[:, sl].double() @ w[:, sl].double().T).norm(dim=1).mean()
        return score

    def cut(self, name: str, amount: int, correction: str | None = None) -> Cut:
        correction = correction or self.config.correction
        key = (name, amount, correction)
        if key not in self._cuts:
            self._cuts[key] = self._cut(self.layers[name], amount, correction)
        return self._cuts[key]

    def _cut(self, layer: Layer, amount: int, correction: str) -> Cut:
        kept = tuple(sorted(self.order[layer.name][amount:]))
        module = self.graph.segment(layer.segment).module
        weights: dict[str, torch.Tensor] = {}
        if layer.kind == "ffn":
            f = layer.ffn
            idx = torch.tensor(kept)
            weights[f.w1] = self._w(layer, f.w1)[idx]
            if f.b1:
                weights[f.b1] = self._w(layer, f.b1)[idx]
            cols = idx
        else:
            s = layer.site
            nodes = {n.name: n for n in module.graph.nodes}
            for name in dict.fromkeys(s.q + s.k + s.v):
                w_t, b_t = _linear_parts(module, nodes[name])
                w = self._w(layer, w_t)
                rows = _rows(kept, s.heads, s.head_dim, w.shape[0])
                weights[w_t] = w[rows]
                if b_t:
                    weights[b_t] = self._w(layer, b_t)[rows]
            cols = _rows(kept, s.heads, s.head_dim, s.heads * s.head_dim)
        num = den = 0.0
        for node, x, w, b, w_t, b_t in self._outs(layer):
            y = x @ w.T + (b if b is not None else 0)
            if correction == "least_squares":
                w2, b2 = ridge_fit(x[:, cols], y, self.config.ridge)
                weights[w_t] = w2
                weights[b_t or f"{w_t}:bias"] = b2
            else:
                w2, b2 = w[:, cols].contiguous(), b
                weights[w_t] = w2
            got = x[:, cols] @ w2.T + (b2 if b2 is not None else 0)
            num += float((got - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
        # The fits run in float32/64; the segment keeps the model's dtype.
        dtype = {t: attribute(module, t.split(":")[0]).dtype for t in weights}
        return Cut(kept, {t: w.to(dtype[t]).contiguous() for t, w in weights.items()}, num / max(den, 1e-30))

    def release(self, amounts: dict[str, int]) -> None:
        """Keep only the cuts `build(amounts, graph)` uses; the calibration tokens go."""
        self.inputs = {}
        self._cuts = {k: c for k, c in self._cuts.items() if amounts.get(k[0]) == k[1] and k[2] == self.config.correction}

    def build(self, amounts: dict[str, int], graph: DiTGraph | None = None,
              correction: str | None = None) -> DiTGraph:
        """`graph` (default: the pass's; another capture of the same model at any shape) with
        each named layer cut by its amount."""
        g = graph if graph is not None else self.graph
        by_segment: dict[str, list[tuple[Layer, Cut]]] = {}
        for name, amount in amounts.items():
            if amount:
                layer = self.layers[name]
                by_segment.setdefault(layer.segment, []).append((layer, self.cut(name, amount, correction)))
        for seg_name, cuts in by_segment.items():
            g = _with_cuts(g, g.segment(seg_name), cuts)
        return g


# -- the rewrite -------------------------------------------------------------------------------
def _between(starts: list[fx.Node], end: fx.Node) -> list[fx.Node]:
    """Nodes on a path from any of `starts` (excluded) to `end` (excluded), in graph order."""
    down, stack = set(), list(starts)
    while stack:
        for u in stack.pop().users:
            if u not in down:
                down.add(u)
                stack.append(u)
    up, stack = set(), [end]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in up:
                up.add(a)
                stack.append(a)
    return [n for n in end.graph.nodes if n in down and n in up]


def _head_shape(node: fx.Node, heads: int, head_dim: int, kept: int) -> list:
    """A view's shape argument with the head count `kept`: the axis of `heads` followed by
    axes that make up one head ([.., heads, head_dim], FLUX's rotary [.., heads, head_dim / 2, 2]),
    or a last axis of heads * head_dim; other views are left as they are."""
    shape = list(node.args[1])
    val = node.meta.get("val")
    sizes = list(val.shape) if isinstance(val, torch.Tensor) and len(val.shape) == len(shape) else shape
    for i, size in enumerate(sizes):
        rest = 1
        for r in sizes[i + 1:]:
            rest *= int(r)
        if size == heads and rest == head_dim and i < len(sizes) - 1:
            if shape[i] != -1:
                shape[i] = kept
            return shape
    if sizes and sizes[-1] == heads * head_dim and shape[-1] != -1:
        shape[-1] = kept * head_dim
    return shape


def _buffer_name(target: str) -> str:
    return PREFIX + target.replace(".", "_").replace(":", "_")


def _with_cuts(g: DiTGraph, seg: Segment, cuts: list[tuple[Layer, Cut]]) -> DiTGraph:
    """`g` with `seg` rewritten for the cuts, and its block info updated (heads, FFN width)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in seg.module.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    nodes = {n.name: env[n] for n in seg.module.graph.nodes}
    weights = {t: w for _, cut in cuts for t, w in cut.weights.items()}
    buffers: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not LINEAR or _attr(node.args[1]) not in weights:
            continue
        w_t = _attr(node.args[1])
        b_t = _attr(node.args[2]) if len(node.args) > 2 else None
        args = list(node.args) + [None] * (3 - len(node.args))
        with graph.inserting_before(node):
            buffers[_buffer_name(w_t)] = weights[w_t]
            args[1] = graph.get_attr(_buffer_name(w_t))
            bias = weights.get(b_t) if b_t else weights.get(f"{w_t}:bias")
            if bias is not None:
                name = _buffer_name(b_t or f"{w_t}:bias")
                buffers[name] = bias
                args[2] = graph.get_attr(name)
        node.args = tuple(args)
    infos = {b.index: b for b in g.blocks}
    info = infos[seg.block]
    sites, ffn_sites = list(info.attention), list(info.ffn)
    removed_params = 0
    for layer, cut in cuts:
        removed_params += sum(attribute(seg.module, t).numel() - w.numel() if ":" not in t else -w.numel()
                              for t, w in cut.weights.items())
        if layer.kind == "ffn":
            ffn_sites = [dataclasses.replace(f, hidden_features=len(cut.kept)) if f.down == layer.ffn.down else f
                         for f in ffn_sites]
            continue
        s, h = layer.site, len(cut.kept)
        sdpa = nodes[s.node]
        region = _between([nodes[n] for n in dict.fromkeys(s.q + s.k + s.v)], sdpa)
        region += [n for o in s.out for n in _between([sdpa], nodes[o])]
        for node in dict.fromkeys(region):
            if node.target in _VIEWS:
                node.args = (node.args[0], _head_shape(node, s.heads, s.head_dim, h), *node.args[2:])
        sites = [dataclasses.replace(a, heads=h) if a.node == s.node else a for a in sites]
    new = segment_with_buffers(seg, graph, buffers)
    _refresh_meta(new)
    info = dataclasses.replace(info, attention=tuple(sites), ffn=tuple(ffn_sites), parameters=info.parameters - removed_params)
    return g.with_segment(new).evolve(blocks=tuple(info if b.index == seg.block else b for b in g.blocks))


def _refresh_meta(seg: Segment) -> None:
    """Recompute the value metadata of the rewritten graph (shapes changed) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = [mode.from_tensor(a) for a in example_args(seg)]
    FakeTensorProp(seg.module, mode).propagate_dont_convert_inputs(*args)


def check_heads(pruner: Pruner, layer: Layer) -> str | None:
    """Why removing a head of `layer` is not the masked original, or None: the segment with its
    least important head cut (no correction) must equal the segment whose output projection
    reads zeros for that head, on random inputs."""
    g = pruner.graph
    seg = g.segment(layer.segment)
    try:
        pruned = pruner.build({layer.name: 1}, correction="none").segment(seg.name)
    except Exception as e:  # noqa: BLE001 (any failure to rewrite the shapes is a reason to keep the heads)
        return f"the head count could not be rewritten ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    s = layer.site
    dropped = pruner.order[layer.name][0]
    cols = torch.arange(dropped * s.head_dim, (dropped + 1) * s.head_dim)
    module = seg.module
    nodes = {n.name: n for n in module.graph.nodes}
    masked = {}
    for o in s.out:
        w_t, _ = _linear_parts(module, nodes[o])
        w = attribute(module, w_t).detach().clone()
        w[:, cols] = 0
        masked[w_t] = w
    reference = _with_weights(seg, masked)
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(a.shape, generator=gen, dtype=a.dtype) if a.is_floating_point() else a
            for a in example_args(seg)]
    try:
        with torch.no_grad():
            got, want = pruned.module(*args), reference.module(*args)
    except Exception as e:  # noqa: BLE001
        return f"the rewritten segment does not run ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor) and b.is_floating_point() and (
                a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max().clamp_min(1)))):
            return ("removing a head is not the original with that head's output zeroed (heads are mixed before "
                    "the output projection, e.g. a norm over all heads' features)")
    return None


def _with_weights(seg: Segment, weights: dict[str, torch.Tensor]) -> Segment:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    buffers = {}
    for node in seg.module.graph.nodes:
        if node.op == "get_attr" and str(node.target) in weights:
            name = _buffer_name(str(node.target))
            buffers[name] = weights[str(node.target)]
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return segment_with_buffers(seg, graph, buffers)


# -- the search --------------------------------------------------------------------------------
def levels(layer: Layer, max_ratio: float) -> list[int]:
    """Units removed at each search level (0 first): eighths of an FFN, single heads."""
    if layer.kind == "ffn":
        steps = [round(layer.units * j / FFN_LEVELS) for j in range(FFN_LEVELS)]
    else:
        steps = list(range(layer.units))
    top = int(max_ratio * layer.units + 1e-9)
    return sorted({s for s in steps if s <= min(top, layer.units - 1)})


def ladder(layers: list[Layer], grid: dict[str, list[int]], errors: dict[str, list[float]],
           fixed: dict[str, int]) -> list[dict[str, int]]:
    """Plans from every searched layer at its largest level towards dense, cheapest first: each
    step gives back the level whose measured error falls most per multiply-add it costs. The
    plan with every searched layer whole is left out unless `fixed` layers still cut."""
    at = {l.name: len(grid[l.name]) - 1 for l in layers}
    unit = {l.name: l.unit_macs for l in layers}

    def plan() -> dict[str, int]:
        return {**fixed, **{n: grid[n][i] for n, i in at.items() if grid[n][i]}}

    plans = [plan()]
    while any(at.values()):
        def gain(n: str) -> float:
            i = at[n]
            return (errors[n][i] - errors[n][i - 1]) / max(1, unit[n] * (grid[n][i] - grid[n][i - 1]))

        best = max((n for n in at if at[n]), key=lambda n: (gain(n), n))
        at[best] -= 1
        plans.append(plan())
    if not fixed or not any(fixed.values()):
        plans.pop()  # the dense plan
    return [p for p in plans if p]


def _costs(graph: DiTGraph) -> tuple[int, int]:
    return (sum(segment_macs(s) for s in graph.main_segments),
            sum(segment_parameters(s) for s in graph.main_segments))


def _amount(layer: Layer, ratio: float | None) -> int | None:
    return None if ratio is None else min(layer.units - 1, round(ratio * layer.units))


@register_pass("width_prune", WidthPruneConfig, needs=("block_inputs",), level=PassLevel.NODE, lossy=True,
               example={"ffn_ratio": 0.25, "head_ratio": 0.5})
def width_prune(graph: DiTGraph, config: WidthPruneConfig, ctx: PassContext) -> PassResult:
    """Width pruning: the least important FFN neurons and attention heads removed, as many as the budget allows."""
    found, skipped = find_layers(graph)
    names = {l.name for l in found}
    unmatched = [p for p in config.keep if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise InvalidProfileError(f"width_prune keep = {list(config.keep)}: {unmatched[0]!r} names no prunable layer of "
                                  f"this model (those are e.g. {', '.join(sorted(names)[:4]) or 'none'})")
    if config.layers is not None:
        unknown = sorted(set(config.layers) - names)
        if unknown:
            why = f" ({skipped[unknown[0]]})" if unknown[0] in skipped else ""
            raise InvalidProfileError(f"width_prune layers names {unknown[0]!r}, which is not a prunable layer of this "
                                      f"model{why} (those are e.g. {', '.join(sorted(names)[:4]) or 'none'})")
        by_name = {l.name: l for l in found}
        for n, k in config.layers.items():
            if k >= by_name[n].units:
                raise InvalidProfileError(f"width_prune layers[{n!r}] = {k}: {n} has {by_name[n].units} "
                                          f"{'neurons' if by_name[n].kind == 'ffn' else 'heads'}; keep at least one")
    layers = [l for l in found if not any(fnmatch.fnmatchcase(l.name, p) for p in config.keep)]
    for l in found:
        if l not in layers:
            skipped[l.name] = "kept whole (keep patterns)"
    report: dict[str, Any] = {"correction": config.correction}
    if not layers:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the blocks have no FFN or attention"
        return PassResult(graph, False, {**report, "skipped": f"no prunable FFN or attention ({why})",
                                         "not_pruned": skipped})
    if not CalibrationReplay.recorded(ctx.stats):
        raise CalibrationError("width_prune ranks neurons and heads on calibration activations: pass calibration=fn "
                               "(a function that samples with the model)")
    replay = CalibrationReplay(graph, ctx.stats, config.rows)
    watch: dict[str, dict[str, str]] = {}
    for l in layers:
        watch.setdefault(l.segment, {}).update(l.watch())
    inputs = replay.node_inputs(watch, per_row=config.tokens_per_row)
    for l in [l for l in layers if any(k not in inputs for k in l.watch().values())]:
        skipped[l.name] = "no calibration activations reach it (not a [batch, tokens, features] input)"
        layers.remove(l)
    pruner = Pruner(graph, layers, config, inputs)
    for l in [l for l in layers if l.kind == "heads"]:
        why = check_heads(pruner, l)
        if why is not None:
            skipped[l.name] = f"heads kept: {why}"
            layers.remove(l)
            del pruner.layers[l.name]
    if skipped:
        report["not_pruned"] = skipped
    if not layers:
        return PassResult(graph, False, {**report, "skipped": "no prunable FFN or attention"})

    search = None
    if config.layers is not None:
        amounts = {n: k for n, k in config.layers.items() if k and n in pruner.layers}
    else:
        ratio = {"ffn": config.ffn_ratio, "heads": config.head_ratio}
        fixed = {l.name: a for l in layers if (a := _amount(l, ratio[l.kind]))}
        free = [l for l in layers if ratio[l.kind] is None]
        if not free:
            amounts = fixed
        else:
            grid = {l.name: levels(l, config.max_ratio) for l in free}
            free = [l for l in free if len(grid[l.name]) > 1]
            errors = {l.name: [0.0] + [replay.error(pruner.build({l.name: k})).total for k in grid[l.name][1:]]
                      for l in free}
            report["sensitivity"] = {n: {str(k): e for k, e in zip(grid[n], errs)} for n, errs in errors.items()}
            plans = ladder(free, grid, errors, fixed)
            if not plans:
                return PassResult(graph, False, {**report, "skipped": "no layer has a unit to spare within max_ratio"})

            def key(i: int) -> tuple:
                return ("width_prune", config.correction, config.ridge, config.rows, config.tokens_per_row,
                        tuple(sorted(plans[i].items())))

            search = BudgetSearch.start(ctx, "width_prune", config.margin_db, what="without ffn_ratio and head_ratio")
            chosen = search.cheapest(list(range(len(plans))), key=key,
                                     build=lambda i: (lambda g: pruner.build(plans[i], g)),
                                     describe=lambda i: {"removed": dict(plans[i])})
            report["trials"] = search.trials
            report["target_psnr_db"] = search.target_psnr_db
            if chosen is None:
                report["skipped"] = (f"even the gentlest plan ({plans[-1]}) misses the target of "
                                     f"{search.target_psnr_db:.2f} dB on the search's samples; nothing removed")
                return PassResult(graph, False, report)
            amounts = plans[chosen]
            report["predicted_psnr_db"] = search.memo[key(chosen)]
    amounts = {n: k for n, k in amounts.items() if k}
    if not amounts:
        return PassResult(graph, False, {**report, "skipped": "the amounts remove no neuron and no head "
                                                              "(ratios round to zero units)"})
    pruned = pruner.build(amounts)
    macs0, params0 = _costs(graph)
    macs1, params1 = _costs(pruned)
    per_layer = {}
    for n, k in amounts.items():
        l = pruner.layers[n]
        cut = pruner.cut(n, k)
        unit = "neurons" if l.kind == "ffn" else "heads"
        per_layer[n] = {"block": l.block, f"{unit}_before": l.units, f"{unit}_removed": k,
                        "fit_rel_sq_err": cut.residual}
        if config.correction == "least_squares":
            per_layer[n]["fit_rel_sq_err_uncorrected"] = pruner.cut(n, k, "none").residual
    report.update({
        "layers": per_layer,
        "neurons_removed": sum(k for n, k in amounts.items() if pruner.layers[n].kind == "ffn"),
        "heads_removed": sum(k for n, k in amounts.items() if pruner.layers[n].kind == "heads"),
        "macs_before": macs0, "macs_after": macs1, "parameters_before": params0, "parameters_after": params1,
        "replayed_error": replay.error(pruned).to_dict(), "replayed_rows": replay.rows,
        "fitted_on_tokens": int(next(iter(inputs.values())).shape[0]),
    })
    resolved = config.model_copy(update={"layers": dict(sorted(amounts.items())), "ffn_ratio": None, "head_ratio": None})
    outcome = None
    if search is not None:
        outcome = PassOutcome(predicted_psnr_db=report["predicted_psnr_db"], target_psnr_db=search.target_psnr_db,
                              saving=1.0 - macs1 / macs0 if macs0 else None)
    # Replays at other call shapes reuse these cuts and refits (fitted once, on the rows verified);
    # the calibration tokens and the unchosen cuts are not kept alive by the optimized module.
    pruner.release(amounts)
    return PassResult(pruned, True, report, replay=("width_prune", resolved), outcome=outcome,
                      rewrite=lambda g: pruner.build(amounts, g))


__all__ = ["WidthPruneConfig", "width_prune"]
