"""Conditioning memo: compute what depends on the conditioning alone once per distinct value.

A DiT turns its conditioning (the diffusion timestep, a class label, pooled text, position ids)
into embeddings and modulation on every call, and several architectures do it more than once
per call: diffusers' DiT gives every block its own `AdaLayerNormZero` embedder (timestep MLP +
class embedding + the block's shift/scale/gate linear), its final layer recomputes the first
one, and FLUX-style models rebuild the rotary tables from the position ids every call. None of
that reads the noisy sample, and a sampler calls the model with the same conditioning on every
step and the same few timesteps in every generation, so those results can be kept.

The pass finds, in each segment, the ops whose values depend on conditioning inputs (every call
input except the latent, up to `max_key_numel` elements) and on nothing else but weights and
constants, and moves them into submodules (`ConditioningMemo`), one per set of inputs they read:
the rotary tables, keyed on the ids alone, hit on every call, while the timestep embedding,
keyed on the timestep, hits once per distinct timestep. A memo is keyed on its inputs' bytes,
dtypes, shapes and devices (so CFG rows with other timesteps, another prompt or a new schedule
simply miss), and computes normally when tracing or exporting, so an exported segment is the
original computation. At the zoo models' width these small per-step ops are a visible share
of a skipped cache step (docs/design.md, "Skipped-step overhead"); at FLUX or DiT-XL width
they are not, and the pass changes little there.

Results are bitwise the original's: the same ops run on the same inputs, only less often.
They stay so when the weights change: every call compares the version counter and storage
address of each weight the memo's ops read (a LoRA fuse or hot swap written in place, an
optimizer step, `load_state_dict`, `.to()` / `.half()`) and forgets what it remembered when one
moved. A write through `.data` moves neither (it bypasses autograd's version counter): after
one, call `OptimizedDiT.reset()`, which drops every memo's values (as `clear()` does).
"""

from __future__ import annotations

import copy
import math
import operator
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
from pydantic import Field
from torch import nn

from ditopt.graph import DiTGraph
from ditopt.registry import PassConfig, PassContext, PassResult, register_pass

MEMO_MODULE = "conditioning_memo"

# Ops that only move metadata or check it; they do not count towards `min_ops`.
_NON_COMPUTE_OPS = {"getitem", "view", "reshape", "unsqueeze", "squeeze", "expand", "slice", "select", "t",
                    "transpose", "permute", "_assert_tensor_metadata", "to", "alias", "detach"}


class ConditioningMemoConfig(PassConfig):
    min_ops: int = Field(4, ge=1, description="hoist a segment's conditioning-only ops only when they are at least this many compute ops (views and checks not counted)")
    max_entries: int = Field(1024, ge=1, description="distinct input values remembered per memo; the least recently used is dropped")
    max_bytes: int = Field(64 << 20, ge=0, description="bytes (keys + remembered outputs) one memo may hold; the least recently used entries are dropped beyond it (a server that sees a new prompt per request must not grow)")
    max_key_numel: int = Field(1 << 16, ge=1, description="a call input is a memo key only up to this many elements (hashing a larger one, e.g. a full text encoding, costs more than it saves)")


class ConditioningMemo(nn.Module):
    """`head(*keys, *values)`, remembered per distinct key tensors. The extra values are
    results of memos on fewer keys (functions of these keys), so the keys decide the result."""

    def __init__(self, head: fx.GraphModule, keys: tuple[str, ...], max_entries: int, max_bytes: int) -> None:
        super().__init__()
        self.head = head
        self.keys = keys  # the call inputs this memo is keyed on (for reports and tests)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._memo: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self._weights_seen: tuple | None = None  # (version, address) of each weight when the values were computed
        self.nbytes = 0  # keys + remembered outputs now held
        self.hits = 0
        self.misses = 0
        self.weight_changes = 0  # times the weights moved and the remembered values were dropped

    def clear(self) -> None:
        """Forget every remembered value (and zero the hit/miss counters)."""
        self.drop_remembered()
        self.hits = self.misses = self.weight_changes = 0

    def drop_remembered(self) -> None:
        """Forget every remembered value; counters are kept (OptimizedDiT.reset calls this)."""
        self._memo.clear()
        self._sizes.clear()
        self.nbytes = 0

    def _weight_slots(self) -> list[tuple[dict, str]]:
        # Where the head's tensors are held, looked up once per head (a copied memo has its own).
        cached = self.__dict__.get("_slots_of")
        if cached is None or cached[0] is not self.head:
            slots = [(store, name) for m in self.head.modules() for store in (m._parameters, m._buffers) for name in store]
            cached = self.__dict__["_slots_of"] = (self.head, slots)
        return cached[1]

    def weights_state(self) -> tuple:
        """The version counter and storage address of every weight the memo's ops read: an
        in-place write (also into the user's tensors this storage is shared with) bumps the
        first, a replaced tensor changes the second."""
        state = []
        for store, name in self._weight_slots():
            t = store.get(name)
            if t is None:
                continue
            try:
                version = t._version
            except RuntimeError:  # inference-mode tensors keep no version counter
                version = None
            state.append((version, t.data_ptr()))
        return tuple(state)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ConditioningMemo":
        # .to()/.half()/.cuda(): remembered values have the old dtype/device.
        self.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if _tracing() or (torch.is_grad_enabled() and any(p.requires_grad for p in self.head.parameters())):
            # An exported graph must compute the embedding; with trainable weights under
            # autograd a remembered tensor would carry the graph of an earlier call.
            return tuple(self.head(*inputs))
        weights = self.weights_state()
        if weights != self.__dict__.get("_weights_seen"):
            if self._memo:
                self.weight_changes += 1
            self.drop_remembered()
            self._weights_seen = weights
        key = tuple(value_key(x) for x in inputs[: len(self.keys)])
        found = self._memo.get(key)
        if found is not None:
            self._memo.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        values = tuple(self.head(*inputs))
        size = sum(len(k[-1]) for k in key if isinstance(k[-1], bytes))
        size += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
        if size > self.max_bytes:
            return values  # too big to keep at all
        self._memo[key], self._sizes[key] = values, size
        self.nbytes += size
        while len(self._memo) > self.max_entries or self.nbytes > self.max_bytes:
            old, _ = self._memo.popitem(last=False)
            self.nbytes -= self._sizes.pop(old)
        return values


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def value_key(x: Any) -> tuple:
    """Exact identity of an input's value (ditopt.graph.tensor_key is only its shape): a
    tensor's bytes (read on the host, like the runtime's own timestep read), dtype, shape and
    device; anything else as itself."""
    if not isinstance(x, torch.Tensor):
        return (type(x).__name__, x)
    flat = x.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 1 and flat.stride(0) != 1:
        # A one-element view of an expanded tensor keeps stride 0 (size-1 dims count as
        # contiguous), and viewing it as bytes fails; copy only then (this runs every call).
        flat = flat.clone(memory_format=torch.contiguous_format)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return (str(x.dtype), tuple(x.shape), str(x.device), raw)


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


def conditioning_subgraph(gm: fx.GraphModule, key_indices: set[int]) -> dict[frozenset[fx.Node], list[fx.Node]]:
    """The call nodes computed from the placeholders at `key_indices`, weights and constants
    only, grouped by the set of those placeholders each one reads (graph order within a group)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reads: dict[fx.Node, frozenset[fx.Node]] = {placeholders[i]: frozenset({placeholders[i]}) for i in key_indices}
    groups: dict[frozenset[fx.Node], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            reads[node] = frozenset()
        elif node.op == "call_function" and _repeatable(node):
            ins = node.all_input_nodes
            if all(i in reads for i in ins):
                reads[node] = frozenset().union(*(reads[i] for i in ins))
                if reads[node]:
                    groups.setdefault(reads[node], []).append(node)
    return groups


def _merge_private_groups(gm: fx.GraphModule, groups: dict[frozenset[fx.Node], list[fx.Node]]) -> dict[frozenset[fx.Node], list[fx.Node]]:
    """Fold a group whose values only one other group reads into that group: diffusers' DiT
    embeds the timestep and the class label apart and adds them; one memo on both inputs then
    hits as often as the sum would, without two more lookups per call."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = dict(groups)
    while True:
        group_of = {n: keys for keys, nodes in groups.items() for n in nodes}
        for keys, nodes in groups.items():
            readers = {group_of.get(u) for n in nodes for u in n.users if group_of.get(u) != keys}
            if len(readers) == 1 and None not in readers:
                (into,) = readers
                groups[into] = sorted(groups[into] + nodes, key=position.__getitem__)
                del groups[keys]
                break
        else:
            return groups


def memoize_segment(gm: fx.GraphModule, key_indices: set[int], config: ConditioningMemoConfig) -> tuple[fx.GraphModule, dict[str, int]] | None:
    """A copy of `gm` whose conditioning-only ops run through `ConditioningMemo`s (one per set
    of key inputs read), and the compute ops moved per memo (by its keys); None when there is
    nothing worth moving."""
    groups = _merge_private_groups(gm, conditioning_subgraph(gm, key_indices))
    # A group's ops read values of groups on fewer keys (a strict subset): memos run in that order.
    ordered = sorted(groups.items(), key=lambda kv: (len(kv[0]), min(n.name for n in kv[0])))
    hoisted = [n for _, nodes in ordered for n in nodes]
    compute = {keys: sum(1 for n in nodes if _op_name(n) not in _NON_COMPUTE_OPS) for keys, nodes in ordered}
    if sum(compute.values()) < config.min_ops:
        return None
    group_of = {n: keys for keys, nodes in ordered for n in nodes}
    placeholder_order = [n for n in gm.graph.nodes if n.op == "placeholder"]

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    by_name = {n.name: n for n in new.graph.nodes}
    hoisted_new = {by_name[h.name] for h in hoisted}
    # A memo goes right after the last of its key inputs (placeholders may sit between ops in
    # an exported graph), memos after the same input in `ordered` order. What reads a memo's
    # values reads all its keys, so it comes later; the memos it reads are on a subset of its
    # keys, so they sit no later.
    cursor: dict[fx.Node, fx.Node] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # old hoisted node -> its memo output in `new`
    moved: dict[str, int] = {}
    output = next(n for n in new.graph.nodes if n.op == "output")
    for index, (keys, nodes) in enumerate(ordered):
        inside = set(nodes)
        frontier = [n for n in nodes if any(u not in inside for u in n.users)]
        if not frontier:
            continue
        key_nodes = [p for p in placeholder_order if p in keys]
        # Values from memos on fewer keys that this group reads.
        extern = [i for n in nodes for i in n.all_input_nodes if i in group_of and group_of[i] != keys]
        extern = list(dict.fromkeys(extern))

        head_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {p: head_graph.placeholder(p.name) for p in key_nodes}
        env.update({e: head_graph.placeholder(e.name) for e in extern})
        # The group's ops and the weights and weight-only ops they read.
        needed = set(nodes)
        for node in reversed(list(gm.graph.nodes)):
            if node in needed:
                needed.update(i for i in node.all_input_nodes if i not in env)
        for node in gm.graph.nodes:
            if node in needed and node not in env:
                env[node] = head_graph.node_copy(node, lambda n: env[n])
        head_graph.output(tuple(env[n] for n in frontier))
        head = fx.GraphModule(gm, head_graph)
        head.graph.eliminate_dead_code()
        head.recompile()

        name = MEMO_MODULE if index == 0 else f"{MEMO_MODULE}_{index}"
        key_names = tuple(p.name for p in key_nodes)
        new.add_submodule(name, ConditioningMemo(head, key_names, config.max_entries, config.max_bytes))
        anchor = by_name[key_nodes[-1].name]
        with new.graph.inserting_after(cursor.get(anchor, anchor)):
            memo = new.graph.call_module(name, tuple(by_name[p.name] for p in key_nodes) + tuple(replaced[e] for e in extern))
        last = memo
        values = []
        for i in range(len(frontier)):
            with new.graph.inserting_after(last):
                last = new.graph.call_function(operator.getitem, (memo, i))
            values.append(last)
        # Shapes recorded at capture stay readable on the new nodes (export and span analysis read them).
        memo.meta["val"] = tuple(n.meta.get("val") for n in frontier)
        for node, value in zip(frontier, values):
            value.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
            replaced[node] = value
            old = by_name[node.name]
            if old in output.all_input_nodes:
                # A segment output must never be the remembered tensor itself: callers may write to it.
                with new.graph.inserting_after(last):
                    copied = last = new.graph.call_function(torch.ops.aten.clone.default, (value,))
                copied.meta.update(value.meta)
                value = copied
            old.replace_all_uses_with(value, delete_user_cb=lambda user: user not in hoisted_new)
        cursor[anchor] = last
        moved[",".join(key_names)] = compute[keys]
    for node in reversed(list(new.graph.nodes)):
        if node in hoisted_new:
            new.graph.erase_node(node)
    new.graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    new.recompile()
    return new, moved


def memo_keys(graph: DiTGraph, config: ConditioningMemoConfig) -> set[str]:
    """The call inputs a memo may be keyed on: the timestep, and, when the graph knows which
    input is the latent, every other tensor input up to `max_key_numel` elements."""
    keys = {graph.timestep_input} if graph.timestep_input else set()
    if graph.latent_input is None:
        return keys
    # The capture's call key has each input leaf's shape (ditopt.graph.tensor_key), in input order.
    for name, leaf in zip(graph.signature.input_names, graph.signature.key[1]):
        if name != graph.latent_input and leaf[0] == "tensor" and math.prod(leaf[1]) <= config.max_key_numel:
            keys.add(name)
    return keys


@register_pass("conditioning_memo", ConditioningMemoConfig, level="node", example={})
def conditioning_memo(graph: DiTGraph, config: ConditioningMemoConfig, ctx: PassContext) -> PassResult:
    """Compute each segment's conditioning-only ops once per distinct conditioning (exact)."""
    keys = memo_keys(graph, config)
    if not keys:
        return PassResult(graph, False, {"reason": "the model has no timestep or conditioning input"})
    moved: dict[str, dict[str, int]] = {}
    for seg in graph.segments:
        indices = {i for i, name in enumerate(seg.inputs) if name in keys}
        result = memoize_segment(seg.module, indices, config) if indices else None
        if result is None:
            continue
        module, ops = result
        graph = graph.with_segment(seg.replace_module(module))
        moved[seg.name] = ops
    if not moved:
        return PassResult(graph, False, {"reason": f"no segment computes >= {config.min_ops} ops from {sorted(keys)} alone"})
    total = sum(n for per in moved.values() for n in per.values())
    memos = sum(len(per) for per in moved.values())
    summary = f"{total} conditioning-only ops in {len(moved)} segments ({memos} memos), computed once per distinct input (exact)"
    return PassResult(graph, True, {"keys": sorted(keys), "segments": moved, "ops_per_call": total, "summary": summary})
