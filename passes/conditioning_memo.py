"""Timestep memo: compute what depends on the timestep alone once per distinct timestep.

A DiT turns the diffusion timestep into an embedding (sinusoid, then an MLP) on every call, and
several architectures do it more than once per call: diffusers' DiT gives every block its own
`AdaLayerNormZero` embedder, and its final layer recomputes the first one. Those ops depend on
nothing but the timestep and the weights, and a sampler calls the model with the same few
timesteps in every generation, so their results can be kept.

The pass finds, in each segment that reads the timestep input, the subgraph whose values depend
on the timestep and on nothing else but weights and constants, moves it into a submodule
(`TimestepMemo`) and replaces its uses by that submodule's outputs. The memo is keyed on the
timestep tensor's bytes, dtype, shape and device (so CFG rows with different timesteps, or a
new schedule, simply miss), and falls back to computing when tracing or exporting, so an
exported segment is the original computation. At the zoo models' width the per-step small ops
are a visible share of a skipped cache step (docs/design.md, "Skipped-step overhead"); at
FLUX or DiT-XL width they are not, and the pass changes little there.

Results are bitwise the original's: the same ops run on the same inputs, only less often.
Weights are assumed frozen (inference): the memo is cleared by `.to()`/`.half()` and by
`clear()`, not by an in-place weight update.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
from pydantic import Field
from torch import nn

from ditopt.graph import DiTGraph
from ditopt.registry import PassConfig, PassContext, PassResult, register_pass

MEMO_MODULE = "timestep_memo"

# Ops that only move metadata or check it; they do not count towards `min_ops`.
_NON_COMPUTE_OPS = {"getitem", "view", "reshape", "unsqueeze", "squeeze", "expand", "slice", "select", "t",
             "transpose", "permute", "_assert_tensor_metadata", "to", "alias", "detach"}


class TimestepMemoConfig(PassConfig):
    min_ops: int = Field(4, ge=1, description="hoist a segment's timestep-only subgraph only when it has at least this many compute ops (views and checks not counted)")
    max_entries: int = Field(1024, ge=1, description="distinct timestep tensors remembered per segment; the least recently used is dropped")


class TimestepMemo(nn.Module):
    """`head(timestep)`, remembered per distinct timestep tensor."""

    def __init__(self, head: fx.GraphModule, max_entries: int) -> None:
        super().__init__()
        self.head = head
        self.max_entries = max_entries
        self._memo: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Forget every remembered timestep (and zero the hit/miss counters)."""
        self._memo.clear()
        self.hits = self.misses = 0

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "TimestepMemo":
        # .to()/.half()/.cuda(): remembered values have the old dtype/device.
        self.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, timestep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if _tracing() or (torch.is_grad_enabled() and any(p.requires_grad for p in self.head.parameters())):
            # An exported graph must compute the embedding; with trainable weights under
            # autograd a remembered tensor would carry the graph of an earlier call.
            return tuple(self.head(timestep))
        key = timestep_key(timestep)
        found = self._memo.get(key)
        if found is not None:
            self._memo.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        values = tuple(self.head(timestep))
        self._memo[key] = values
        if len(self._memo) > self.max_entries:
            self._memo.popitem(last=False)
        return values


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def timestep_key(t: torch.Tensor) -> tuple:
    """Exact identity of a timestep tensor: its bytes (read on the host, like the runtime's own
    timestep read), dtype, shape and device."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    raw = flat.view(torch.uint8) if flat.numel() else flat
    return (str(t.dtype), tuple(t.shape), str(t.device), raw.numpy().tobytes() if flat.numel() else b"")


def _op_name(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _repeatable(node: fx.Node) -> bool:
    """Whether a call gives the same value for the same inputs without side effects: random
    ops (a remembered draw would be reused) and in-place ops stay where they are."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded not in target.tags and not target._schema.is_mutable
    return target is operator.getitem


def timestep_subgraph(gm: fx.GraphModule, timestep_index: int) -> tuple[fx.Node, list[fx.Node], list[fx.Node]]:
    """(the timestep placeholder, hoisted nodes in graph order, frontier nodes): the call nodes
    computed from the `timestep_index`-th placeholder, weights and constants only; the frontier
    are those whose value is used outside that set."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    t = placeholders[timestep_index]
    free: set[fx.Node] = {t}  # depends on nothing but t, weights, constants
    depends: set[fx.Node] = {t}  # depends on t
    hoisted: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            free.add(node)
        elif node.op == "call_function" and _repeatable(node):
            ins = node.all_input_nodes
            if all(i in free for i in ins):
                free.add(node)
                if any(i in depends for i in ins):
                    depends.add(node)
                    hoisted.append(node)
    inside = set(hoisted)
    frontier = [n for n in hoisted if any(u not in inside for u in n.users)]
    return t, hoisted, frontier


def memoize_segment(gm: fx.GraphModule, timestep_index: int, config: TimestepMemoConfig) -> tuple[fx.GraphModule, int] | None:
    """A copy of `gm` whose timestep-only subgraph runs through a `TimestepMemo`, and the number
    of compute ops moved; None when there is nothing worth moving."""
    t, hoisted, frontier = timestep_subgraph(gm, timestep_index)
    compute = sum(1 for n in hoisted if _op_name(n) not in _NON_COMPUTE_OPS)
    if compute < config.min_ops or not frontier:
        return None
    hoisted_names = {n.name for n in hoisted}

    # The head: placeholder t, the hoisted nodes and the weights/constants they read.
    head_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {t: head_graph.placeholder("timestep")}
    needed: set[fx.Node] = set(hoisted)
    for node in reversed(list(gm.graph.nodes)):
        if node in needed:
            needed.update(i for i in node.all_input_nodes if i is not t)
    for node in gm.graph.nodes:
        if node in needed and node is not t:
            env[node] = head_graph.node_copy(node, lambda n: env[n])
    head_graph.output(tuple(env[n] for n in frontier))
    head = fx.GraphModule(gm, head_graph)
    head.graph.eliminate_dead_code()
    head.recompile()

    # The segment: one call of the memo, its outputs in place of the frontier values.
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    by_name = {n.name: n for n in new.graph.nodes}
    new_t = by_name[t.name]
    new.add_submodule(MEMO_MODULE, TimestepMemo(head, config.max_entries))
    first = by_name[hoisted[0].name]
    with new.graph.inserting_before(first):
        memo = new.graph.call_module(MEMO_MODULE, (new_t,))
        values = [new.graph.call_function(operator.getitem, (memo, i)) for i in range(len(frontier))]
    # Shapes recorded at capture stay readable on the new nodes (export and span analysis read them).
    memo.meta["val"] = tuple(n.meta.get("val") for n in frontier)
    for node, value in zip(frontier, values):
        value.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
    output = next(n for n in new.graph.nodes if n.op == "output")
    for node, value in zip(frontier, values):
        old = by_name[node.name]
        if old in output.all_input_nodes:
            # A segment output must never be the remembered tensor itself: callers may write to it.
            with new.graph.inserting_after(value):
                copied = new.graph.call_function(torch.ops.aten.clone.default, (value,))
            copied.meta.update(value.meta)
            value = copied
        old.replace_all_uses_with(value, delete_user_cb=lambda user: user.name not in hoisted_names)
    for node in reversed(hoisted):
        new.graph.erase_node(by_name[node.name])
    new.graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    new.recompile()
    return new, compute


@register_pass("timestep_memo", TimestepMemoConfig, level="node")
def timestep_memo(graph: DiTGraph, config: TimestepMemoConfig, ctx: PassContext) -> PassResult:
    """Compute each segment's timestep-only subgraph once per distinct timestep (exact)."""
    if graph.timestep_input is None:
        return PassResult(graph, False, {"reason": "the model has no timestep input"})
    moved: dict[str, int] = {}
    for seg in graph.segments:
        if graph.timestep_input not in seg.inputs:
            continue
        result = memoize_segment(seg.module, seg.inputs.index(graph.timestep_input), config)
        if result is None:
            continue
        module, ops = result
        graph = graph.with_segment(seg.replace_module(module))
        moved[seg.name] = ops
    if not moved:
        return PassResult(graph, False, {"reason": f"no segment computes >= {config.min_ops} ops from the timestep alone"})
    ops = sum(moved.values())
    summary = f"{ops} timestep-only ops in {len(moved)} segments, computed once per distinct timestep (exact)"
    return PassResult(graph, True, {"segments": moved, "ops_per_call": ops, "summary": summary})
