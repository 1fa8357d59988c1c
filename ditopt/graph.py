"""The staged graph every pass reads and rewrites.

A captured model is one torch.fx graph cut into *segments*: the prologue (patch, timestep and
condition embeddings), one segment per transformer block, and the epilogue (final norm,
projection, unpatchify). Values flow between segments through a flat environment keyed by the
name of the node that produced them in the captured graph. Segments never mutate the
environment themselves; `Segment.run` does, which keeps them pure and exportable.

Annotations refer to nodes *by name*, so they stay valid when a pass copies a segment's graph.

Segment modules read the user's weights through aliases (ditopt.capture: own tensor objects on
the user's storage, no copy). A DiTGraph is read-only: nothing may write into a segment's
tensors in place. The runtime (ditopt.runtime.OptimizedDiT) copies a graph's modules before it
runs or hands them out, and gives itself private copies of the weights before anything could
write them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class AttentionSite:
    """One attention op inside a block, with its projections and token layout."""

    node: str  # the scaled_dot_product_attention node
    module: str  # module path, e.g. "transformer_blocks.3.attn"
    kind: str  # "self" (image only), "joint" (text + image, MMDiT), "cross" (image queries, text keys)
    heads: int
    head_dim: int
    query_tokens: int
    key_tokens: int
    image_tokens: int
    text_tokens: int
    q: tuple[str, ...]  # linear nodes producing the queries (two for joint attention)
    k: tuple[str, ...]
    v: tuple[str, ...]
    out: tuple[str, ...]  # output projection(s) fed by the attention result
    text_first: bool = True  # in joint attention, text tokens precede image tokens


@dataclass(frozen=True)
class FFNSite:
    """A feed-forward sub-network: up projection(s), activation, down projection."""

    up: tuple[str, ...]
    activation: str
    activation_kind: str  # aten op name, e.g. "gelu"
    down: str | None
    hidden_features: int
    in_features: int


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block as recovered from the graph."""

    index: int  # position in the model's execution order, across all block lists
    module: str  # e.g. "transformer_blocks.3" or "single_transformer_blocks.0"
    module_type: str  # class name of the block module
    stream: str  # "single" (one token stream) or "dual" (separate text and image streams)
    attention: tuple[AttentionSite, ...]
    ffn: tuple[FFNSite, ...]
    modulation: tuple[str, ...]  # adaLN modulation linears (per-sample conditioning -> shift/scale/gate)
    parameters: int


@dataclass(frozen=True)
class Segment:
    """A pure piece of the graph: `outputs = module(*inputs)` over the value environment."""

    name: str
    kind: str  # "prologue" | "block" | "epilogue" | "variant"
    block: int | None
    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def run(self, env: dict[str, Any]) -> None:
        results = self.module(*[env[name] for name in self.inputs])
        env.update(zip(self.outputs, results))

    def replace_module(self, module: fx.GraphModule) -> "Segment":
        return dataclasses.replace(self, module=module)


def attribute(module: torch.nn.Module, target: str) -> Any:
    """What a get_attr node's dotted target names on `module`."""
    for part in target.split("."):
        module = getattr(module, part)
    return module


def example_args(seg: Segment) -> tuple[torch.Tensor, ...]:
    """Zeros of a segment's captured input shapes and strides: a block's stream can arrive in a
    transposed layout (PlainDiT's, FLUX's), and a replacement traced on contiguous inputs would
    `view` it where the layout does not allow."""
    vals = [n.meta.get("val") for n in seg.module.graph.nodes if n.op == "placeholder"]
    return tuple(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).zero_() for v in vals)


def _schema(node: fx.Node):
    target = node.target if node.op == "call_function" else None
    return target._schema if isinstance(target, torch._ops.OpOverload) else None


def _is_mutation(node: fx.Node) -> bool:
    schema = _schema(node)
    return schema is not None and schema.is_mutable


def _is_view(node: fx.Node) -> bool:
    """An op whose output aliases its first argument (slice, view, select, ...), not a write."""
    schema = _schema(node)
    return (schema is not None and not schema.is_mutable and bool(schema.returns)
            and schema.returns[0].alias_info is not None)


def _is_read(base: Any) -> bool:
    """Whether anything other than views of `base` and writes into them reads `base`: a graph
    input or attribute always counts (writing into it is visible outside the graph)."""
    if not isinstance(base, fx.Node) or base.op in ("placeholder", "get_attr"):
        return True
    stack, seen = [base], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_view(user) and user.args and user.args[0] is node:
                stack.append(user)
            elif not (_is_mutation(user) and user.args and user.args[0] is node):
                return True
    return False


_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default


def remove_unused(graph: fx.Graph, keep: Any = None) -> None:
    """Dead-code elimination that understands in-place writes: a write (`copy_` into a slice of an
    `empty_like`, as Wan's rotary embedding does) stays while the tensor it writes into is still
    read, and goes with it; fx's own pass, told that no node is impure, would drop the write and
    leave the reader an uninitialised buffer. Any other node without users goes (fx would keep
    e.g. attention, flagged as seeded-random for its dropout); `keep(node)` names nodes to keep."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users or (keep is not None and keep(node)):
                continue
            if _is_mutation(node):
                base = node.args[0] if node.args else None
                while isinstance(base, fx.Node) and _is_view(base):
                    base = base.args[0]
                if _is_read(base):
                    continue
            graph.erase_node(node)
            changed = True


def segment_with_buffers(seg: Segment, graph: fx.Graph, buffers: dict[str, torch.Tensor]) -> Segment:
    """`seg` running the rewritten `graph`: its unused nodes removed (export's metadata asserts
    kept), its get_attr nodes reading the segment's own attributes (shared, read only) or the
    new `buffers`, which become buffers of the new module. The original module is not touched."""
    remove_unused(graph, keep=lambda n: n.target is _ASSERT_METADATA)
    targets = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    root = {t: buffers[t] if t in buffers else attribute(seg.module, t) for t in targets}
    module = fx.GraphModule(root, graph)
    for name, value in buffers.items():
        delattr(module, name)
        module.register_buffer(name, value.contiguous())
    return dataclasses.replace(seg, module=module)


@dataclass(frozen=True)
class CallSignature:
    """How a call's (args, kwargs) flatten into graph inputs and how outputs fold back."""

    input_names: tuple[str, ...]  # placeholder name per flattened leaf
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    outputs: tuple[Any, ...]  # per flattened output leaf: an env name (str) or a constant wrapped in Constant
    key: tuple  # shapes/dtypes/constants of the leaves this graph was captured for


@dataclass(frozen=True)
class Constant:
    value: Any


@dataclass
class DiTGraph:
    """A captured DiT: segments in execution order plus the recovered structure.

    Treated as immutable by passes: a pass builds a new DiTGraph with `evolve` and replaces
    only the segments it rewrites, so the others (and their parameters) are shared. Never
    write into a segment's tensors: they share the user's storage.
    """

    model_class: str
    signature: CallSignature
    segments: tuple[Segment, ...]
    blocks: tuple[BlockInfo, ...]
    image_tokens: int
    text_tokens: int
    grid: tuple[int, ...] | None  # patch grid of the image tokens, (h, w) or (f, h, w), when known
    timestep_input: str | None  # placeholder carrying the diffusion timestep
    param_count: int
    plan: tuple[Any, ...] = ()  # Stage objects (ditopt.plan); one RunSegments per segment by default
    notes: tuple[str, ...] = ()  # what the passes did, in order
    meta: dict[str, Any] = field(default_factory=dict)
    early_steps: tuple[Any, ...] = ()  # EarlySteps rules (ditopt.plan): blocks that run a variant on the first steps
    latent_input: str | None = None  # placeholder carrying the noisy sample (changes every step)

    def __post_init__(self) -> None:
        if not self.plan:
            from .plan import default_plan

            self.plan = default_plan(self)

    # -- access -----------------------------------------------------------------------------
    @property
    def prologue(self) -> Segment:
        return next(s for s in self.segments if s.kind == "prologue")

    @property
    def epilogue(self) -> Segment:
        return next(s for s in self.segments if s.kind == "epilogue")

    @property
    def main_segments(self) -> tuple[Segment, ...]:
        """Prologue, blocks, epilogue: one full forward. Passes may add `variant` segments
        (alternative versions of a block that a stage runs instead, e.g. a forecast step)."""
        return tuple(s for s in self.segments if s.kind != "variant")

    def with_variant(self, new: Segment) -> "DiTGraph":
        """Add or replace a variant segment."""
        kept = tuple(s for s in self.segments if s.name != new.name)
        return self.evolve(segments=kept + (new,))._derive_early((new.name,))

    @property
    def block_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.kind == "block")

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment named {name!r}")

    def segment_for_block(self, index: int) -> Segment:
        for seg in self.segments:
            if seg.kind == "block" and seg.block == index:
                return seg
        raise KeyError(f"no segment for block {index}")

    def evolve(self, **changes: Any) -> "DiTGraph":
        return dataclasses.replace(self, **changes)

    def with_segment(self, new: Segment) -> "DiTGraph":
        segments = tuple(new if s.name == new.name else s for s in self.segments)
        return self.evolve(segments=segments)._derive_early((new.name,))

    # -- early steps (plan.EarlySteps) ------------------------------------------------------
    def early_rule(self, block: int | None) -> Any:
        return next((r for r in self.early_steps if r.block == block), None) if block is not None else None

    def is_early_variant(self, seg: Segment) -> bool:
        """Whether `seg` is the early-step version of another segment of this graph."""
        rule = self.early_rule(seg.block)
        tail = f":{rule.suffix}" if rule is not None else None
        if tail is None or seg.kind != "variant" or not seg.name.endswith(tail):
            return False
        base = seg.name[: -len(tail)]
        return any(s.name == base for s in self.segments)

    def with_early_steps(self, rule: Any) -> "DiTGraph":
        """Add an EarlySteps rule (one per block; the larger step count wins) and derive the
        early variants of the block's segments."""
        old = self.early_rule(rule.block)
        if old is not None:
            rule = dataclasses.replace(rule, steps=max(rule.steps, old.steps))
            stale = {f"{s.name}:{old.suffix}" for s in self.segments if s.block == rule.block}
            graph = self.evolve(segments=tuple(s for s in self.segments if s.name not in stale))
        else:
            graph = self
        graph = graph.evolve(early_steps=tuple(r for r in graph.early_steps if r.block != rule.block) + (rule,))
        return graph._derive_early(tuple(s.name for s in graph.segments if s.block == rule.block))

    def _derive_early(self, names: Iterable[str]) -> "DiTGraph":
        graph = self
        for name in names:
            seg = graph.segment(name)
            rule = graph.early_rule(seg.block)
            if rule is None or graph.is_early_variant(seg):
                continue
            variant = f"{name}:{rule.suffix}"
            module = rule.derive(seg)
            kept = tuple(s for s in graph.segments if s.name != variant)
            if module is not None:
                kept += (Segment(variant, "variant", seg.block, module, seg.inputs, seg.outputs),)
            graph = graph.evolve(segments=kept)
        return graph

    def early_rules_at(self, step: int) -> tuple[Any, ...]:
        """The EarlySteps rules in force on `step` of a generation."""
        return tuple(r for r in self.early_steps if step < r.steps)

    def at_step(self, step: int) -> "DiTGraph":
        """The graph as it runs on `step` of a generation: each segment that has an early
        variant for this step is that variant, under the segment's own name (so every stage
        that runs it by name gets it). Itself when no rule applies; memoised per rule set."""
        active = self.early_rules_at(step)
        if not active:
            return self
        views = self.__dict__.setdefault("_step_views", {})
        key = tuple(r.block for r in active)
        if key not in views:
            by_name = {s.name: s for s in self.segments}
            swapped = []
            for seg in self.segments:
                rule = next((r for r in active if r.block == seg.block), None)
                early = by_name.get(f"{seg.name}:{rule.suffix}") if rule is not None and not self.is_early_variant(seg) else None
                swapped.append(dataclasses.replace(early, name=seg.name, kind=seg.kind) if early is not None else seg)
            views[key] = self.evolve(segments=tuple(swapped), early_steps=())
        return views[key]

    # -- execution --------------------------------------------------------------------------
    def bind(self, leaves: Iterable[Any]) -> dict[str, Any]:
        return dict(zip(self.signature.input_names, leaves))

    def collect_outputs(self, env: dict[str, Any]) -> Any:
        flat = [o.value if isinstance(o, Constant) else env[o] for o in self.signature.outputs]
        return pytree.tree_unflatten(flat, self.signature.out_spec)

    def run_segments(self, env: dict[str, Any]) -> dict[str, Any]:
        """Run every main segment once, ignoring the plan (a full, uncached forward)."""
        for seg in self.main_segments:
            seg.run(env)
        return env

    # -- identity ---------------------------------------------------------------------------
    def structure_hash(self) -> str:
        """Hash of the graph code of every segment: changes when any pass changes the graph."""
        h = hashlib.sha256()
        h.update(self.model_class.encode())
        h.update(repr(self.signature.key).encode())
        for seg in self.segments:
            h.update(seg.name.encode())
            h.update(seg.module.code.encode())
        for stage in self.plan:
            h.update(repr(stage.describe()).encode())
        for rule in self.early_steps:
            h.update(repr(rule.describe()).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (the `inspect` table)."""
        early = {"early_steps": [r.describe() for r in self.early_steps]} if self.early_steps else {}
        return {
            "model_class": self.model_class,
            "parameters": self.param_count,
            "image_tokens": self.image_tokens,
            "text_tokens": self.text_tokens,
            "grid": list(self.grid) if self.grid else None,
            "segments": [s.name for s in self.segments],
            "plan": [stage.describe() for stage in self.plan],
            "blocks": [
                {
                    "index": b.index,
                    "module": b.module,
                    "type": b.module_type,
                    "stream": b.stream,
                    "parameters": b.parameters,
                    "attention": [
                        {
                            "module": a.module,
                            "kind": a.kind,
                            "heads": a.heads,
                            "head_dim": a.head_dim,
                            "query_tokens": a.query_tokens,
                            "key_tokens": a.key_tokens,
                            "image_tokens": a.image_tokens,
                            "text_tokens": a.text_tokens,
                        }
                        for a in b.attention
                    ],
                    "ffn": [
                        {"in_features": f.in_features, "hidden_features": f.hidden_features, "activation": f.activation_kind}
                        for f in b.ffn
                    ],
                    "modulation": len(b.modulation) > 0,
                }
                for b in self.blocks
            ],
            **early,
        }


def tensor_key(leaf: Any) -> tuple:
    """What a captured graph is specialised on for one input leaf."""
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), str(leaf.dtype), leaf.device.type)
    return ("const", repr(leaf))


def latent_halves_equal(graph: DiTGraph, env: dict[str, Any]) -> bool:
    """Whether a call is batched CFG as pipelines build it: the two halves of the latent input's
    rows hold the same values (``torch.cat([latents] * 2)``)."""
    latent = env.get(graph.latent_input) if graph.latent_input else None
    if not isinstance(latent, torch.Tensor) or latent.dim() == 0 or latent.shape[0] % 2:
        return False
    rows = latent.shape[0] // 2
    return torch.equal(latent[:rows], latent[rows:])
