"""Capture a DiT into a staged graph with torch.export and recover its structure.

Structure comes from the graph itself: `nn_module_stack` names the module every node ran in,
so blocks are the elements of the model's top-level ModuleLists whose nodes contain attention;
attention projections, FFNs and adaLN modulation are found by following data flow from the
attention and activation ops. No per-model attribute lists.

Segments never hold the user's own tensor objects: right after the export, every parameter,
buffer or tensor constant of the user's model that the graph reads is replaced by an *alias*, a
tensor object of its own that shares the user's storage (no copy) and remembers, by weak
reference, the tensor it stands for (`source_of`). `.half()`, `.to()` or `requires_grad_()` on
a segment therefore change the alias, never the user's tensor. An in-place write through an
alias would still reach the user's storage: a DiTGraph is read-only, and the runtime
(`ditopt.runtime.OptimizedDiT`) gives itself private copies before anything can write them.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
import weakref
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import CaptureError, MissingInputsError, UnsupportedModelError
from .graph import AttentionSite, BlockInfo, CallSignature, Constant, DiTGraph, FFNSite, Segment, tensor_key
from .inputs import synthesize_inputs

aten = torch.ops.aten
SDPA_OPS = {aten.scaled_dot_product_attention.default}
LINEAR_OPS = {aten.linear.default}
ACTIVATION_OPS = {
    aten.gelu.default: "gelu",
    aten.silu.default: "silu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
}
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
# The noisy sample a sampler feeds back every step (diffusers: hidden_states; DiT reference: x).
LATENT_NAMES = ("hidden_states", "x", "sample", "latents", "latent_model_input")


# --------------------------------------------------------------------------------------------
# Call normalisation
# --------------------------------------------------------------------------------------------
def normalize_call(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn a forward call into keyword form, so every capture and lookup sees one layout."""
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"arguments do not match {type(model).__name__}.forward: {exc}") from exc
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = inspect.signature(model.forward).parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise CaptureError(f"{type(model).__name__}.forward takes *{name}; call it with keyword arguments")
        else:
            out[name] = value
    return out


def call_key(kwargs: dict[str, Any]) -> tuple:
    leaves, spec = pytree.tree_flatten(((), kwargs))
    return (str(spec), tuple(tensor_key(leaf) for leaf in leaves))


# --------------------------------------------------------------------------------------------
# Node helpers
# --------------------------------------------------------------------------------------------
_CALL_SUFFIX = re.compile(r"@\d+$")


def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _CALL_SUFFIX.sub("", path)


def module_paths(node: fx.Node) -> list[tuple[str, Any]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(_CALL_SUFFIX.sub("", p), t) for p, t in stack.values()]


def val_of(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    val = val_of(node)
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _type_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).rsplit(".", 1)[-1].strip("'>")


def _trace(start: fx.Node, stop_ops: set, within: set[fx.Node], neighbours, limit: int) -> list[fx.Node]:
    """Breadth-first walk from `start` over `neighbours(node)` inside `within`, collecting the
    nodes of `stop_ops` it reaches without walking past them."""
    found: list[fx.Node] = []
    seen = {start}
    frontier = [start]
    while frontier and len(seen) < limit * 8:
        node = frontier.pop(0)
        if node is not start and node.op == "call_function" and node.target in stop_ops:
            found.append(node)
            continue
        for nxt in neighbours(node):
            if nxt not in seen and nxt in within:
                seen.add(nxt)
                frontier.append(nxt)
    return found


def backtrace(start: fx.Node, stop_ops: set, within: set[fx.Node], limit: int = 64) -> list[fx.Node]:
    """Nodes of `stop_ops` reached walking inputs backwards from `start`, not crossing them."""
    return _trace(start, stop_ops, within, lambda n: [i for i in n.all_input_nodes if i.op == "call_function"], limit)


def forwardtrace(start: fx.Node, stop_ops: set, within: set[fx.Node], limit: int = 64) -> list[fx.Node]:
    """Nodes of `stop_ops` reached walking users forwards from `start`, not crossing them."""
    return _trace(start, stop_ops, within, lambda n: n.users, limit)


# --------------------------------------------------------------------------------------------
# Block discovery and segment assignment
# --------------------------------------------------------------------------------------------
def _find_blocks(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Module paths of the transformer blocks, in execution order.

    A block is an element of a top-level ModuleList whose every executed element contains an
    attention op and keeps the token count of its queries (UNet stages change it).
    """
    lists = {name for name, child in model.named_children() if isinstance(child, nn.ModuleList)}
    first_seen: dict[str, int] = {}
    has_attention: dict[str, set[int]] = defaultdict(set)
    for pos, node in enumerate(gm.graph.nodes):
        for path, _ in module_paths(node):
            parts = path.split(".")
            if len(parts) >= 2 and parts[0] in lists and parts[1].isdigit():
                block = f"{parts[0]}.{parts[1]}"
                first_seen.setdefault(block, pos)
                if node.op == "call_function" and node.target in SDPA_OPS:
                    q = shape_of(node.args[0])
                    has_attention[block].add(q[-2] if q else -1)
                break
    by_list: dict[str, list[str]] = defaultdict(list)
    for block in first_seen:
        by_list[block.split(".")[0]].append(block)
    blocks: list[str] = []
    for name, members in by_list.items():
        if not all(has_attention.get(m) for m in members):
            continue
        query_counts = {min(has_attention[m]) for m in members}
        if len(query_counts) > 1:  # resolution changes between elements: a UNet stage list
            continue
        blocks.extend(members)
    blocks.sort(key=lambda b: first_seen[b])
    return blocks


def _assign_segments(gm: fx.GraphModule, blocks: list[str]) -> dict[fx.Node, int]:
    """Segment index per call node: 0 prologue, 1..N blocks, N+1 epilogue.

    Nodes owned by a block go to that block while execution moves forward. Nodes owned by no
    block after the first block started, or by an earlier block called again later (DiT's
    epilogue reuses block 0's embedder), go to the next segment that starts, but never after
    their first consumer.
    """
    block_index = {b: i + 1 for i, b in enumerate(blocks)}
    epilogue = len(blocks) + 1
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]

    def owner(node: fx.Node) -> int | None:
        for path, _ in module_paths(node):
            parts = path.split(".")
            if len(parts) >= 2:
                idx = block_index.get(f"{parts[0]}.{parts[1]}")
                if idx is not None:
                    return idx
        return None

    assigned: dict[fx.Node, int] = {}
    deferred: list[fx.Node] = []
    current = 0
    for node in nodes:
        own = owner(node)
        if own is not None and own >= current:
            current = own
            for d in deferred:
                assigned[d] = current
            deferred.clear()
            assigned[node] = current
        elif current == 0:
            assigned[node] = 0
        else:
            deferred.append(node)
    for d in deferred:
        assigned[d] = epilogue
    # Never later than the first consumer (walk backwards so chains settle in one pass).
    for node in reversed(nodes):
        consumers = [assigned[u] for u in node.users if u in assigned]
        if consumers:
            assigned[node] = min(assigned[node], min(consumers))
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp in assigned and assigned[inp] > assigned[node]:
                raise CaptureError(
                    f"cannot cut the graph into segments: {node.name} (segment {assigned[node]}) "
                    f"uses {inp.name} from a later segment {assigned[inp]}"
                )
    return assigned


def _build_segment(root: fx.GraphModule, nodes: list[fx.Node], name: str, kind: str, block: int | None) -> Segment:
    members = set(nodes)
    graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def arg(n: fx.Node) -> fx.Node:
        if n not in remap:
            if n.op == "get_attr":
                new = graph.get_attr(n.target)
            else:
                new = graph.placeholder(n.name)
                inputs.append(n.name)
            new.meta = dict(n.meta)
            remap[n] = new
        return remap[n]

    for node in nodes:
        remap[node] = graph.node_copy(node, arg)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    graph.output(tuple(remap[n] for n in outputs))
    module = fx.GraphModule(root, graph, class_name=f"Segment_{name.replace('.', '_')}")
    return Segment(name=name, kind=kind, block=block, module=module, inputs=tuple(inputs), outputs=tuple(n.name for n in outputs))


# --------------------------------------------------------------------------------------------
# Structure recovery inside a block
# --------------------------------------------------------------------------------------------
def _linear_features(node: fx.Node) -> tuple[int, int]:
    weight = shape_of(node.args[1])
    return (weight[1], weight[0]) if weight else (0, 0)


def _attention_sites(nodes: list[fx.Node], image_tokens: int, text_tokens: int) -> list[AttentionSite]:
    within = set(nodes)
    sites = []
    for node in nodes:
        if node.target not in SDPA_OPS:
            continue
        q_shape, k_shape = shape_of(node.args[0]), shape_of(node.args[1])
        heads, lq, head_dim = q_shape[-3], q_shape[-2], q_shape[-1]
        lk = k_shape[-2]
        qs = backtrace(node.args[0], LINEAR_OPS, within)
        ks = backtrace(node.args[1], LINEAR_OPS, within)
        vs = backtrace(node.args[2], LINEAR_OPS, within)
        outs = forwardtrace(node, LINEAR_OPS, within)
        text_first = True
        if lq != lk:
            kind, img, txt = "cross", lq, lk
        elif image_tokens and lq == image_tokens:
            kind, img, txt = "self", lq, 0
        elif image_tokens and lq == image_tokens + text_tokens and text_tokens:
            kind, img, txt = "joint", image_tokens, text_tokens
            # The order of the concatenation that forms the joint sequence.
            cats = [n for n in backtrace(node.args[0], {aten.cat.default}, within)]
            for cat in cats:
                pieces = [shape_of(p) for p in cat.args[0]]
                dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
                if len(pieces) == 2 and all(pieces):
                    sizes = [p[dim] for p in pieces]
                    if sorted(sizes) == sorted([text_tokens, image_tokens]):
                        text_first = sizes[0] == text_tokens
                        break
        else:
            kind, img, txt = "self", lq, 0
        sites.append(
            AttentionSite(
                node=node.name,
                module=module_path(node) or "",
                kind=kind,
                heads=heads,
                head_dim=head_dim,
                query_tokens=lq,
                key_tokens=lk,
                image_tokens=img,
                text_tokens=txt,
                q=tuple(n.name for n in qs),
                k=tuple(n.name for n in ks),
                v=tuple(n.name for n in vs),
                out=tuple(n.name for n in outs),
                text_first=text_first,
            )
        )
    return sites


def _is_token_tensor(node: fx.Node) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) >= 3


def _ffn_sites(nodes: list[fx.Node], attention_linears: set[str]) -> list[FFNSite]:
    within = set(nodes)
    sites = []
    for node in nodes:
        kind = ACTIVATION_OPS.get(node.target)
        if kind is None or not _is_token_tensor(node):
            continue
        ups = [n for n in backtrace(node, LINEAR_OPS, within) if n.name not in attention_linears]
        # The down projection may be shared with attention (Flux single blocks: proj_out).
        downs = forwardtrace(node, LINEAR_OPS, within)
        if not ups:
            continue
        in_f, hidden = _linear_features(ups[0])
        sites.append(
            FFNSite(
                up=tuple(n.name for n in ups),
                activation=node.name,
                activation_kind=kind,
                down=downs[0].name if downs else None,
                hidden_features=hidden,
                in_features=in_f,
            )
        )
    return sites


def _modulation(nodes: list[fx.Node], segment: Segment) -> list[str]:
    """adaLN modulation: linears on per-sample conditioning vectors whose result leaves
    conditioning space; for blocks that only add a learned table to a conditioning vector
    computed outside (PixArt, Wan), the floating-point rank-2 inputs of the block."""
    cond_space = {n for n in nodes if (s := shape_of(n)) is None or len(s) <= 2}
    result = []
    for node in nodes:
        if node.target not in LINEAR_OPS:
            continue
        inp = shape_of(node.args[0])
        if inp is None or len(inp) != 2:
            continue
        if not forwardtrace(node, LINEAR_OPS, cond_space):
            result.append(node.name)
    if not result:
        for ph in segment.module.graph.nodes:
            val = ph.meta.get("val")
            if ph.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() == 2 and val.is_floating_point():
                result.append(ph.name)
    return result


def _param_count(segment: Segment) -> int:
    seen: set[int] = set()
    total = 0
    for node in segment.module.graph.nodes:
        if node.op == "get_attr":
            t = segment.module.get_parameter(node.target) if _is_param(segment.module, node.target) else None
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def _is_param(module: nn.Module, target: str) -> bool:
    try:
        module.get_parameter(target)
        return True
    except AttributeError:
        return False


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------
def _image_tokens_and_grid(gm: fx.GraphModule, prologue: set[fx.Node], kwargs: dict[str, Any]) -> tuple[int, tuple[int, ...] | None]:
    for node in gm.graph.nodes:
        if node in prologue and node.target in (aten.conv2d.default, aten.conv3d.default, aten.convolution.default):
            shape = shape_of(node)
            if shape and len(shape) >= 4:
                grid = tuple(shape[2:])
                tokens = 1
                for s in grid:
                    tokens *= s
                return tokens, grid
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        tokens = hidden.shape[1]
        ids = kwargs.get("img_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[-1] == 3:
            ids2 = ids.reshape(-1, 3)
            h, w = int(ids2[:, 1].max().item()) + 1, int(ids2[:, 2].max().item()) + 1
            if h * w == tokens:
                return tokens, (h, w)
        return tokens, None
    return 0, None


def capture(
    model: nn.Module,
    example_inputs: dict[str, Any] | tuple | None = None,
    *,
    batch_size: int = 1,
    resolution: int | None = None,
) -> DiTGraph:
    """Capture `model` into a DiTGraph.

    `example_inputs` are the keyword arguments of one forward call (or `(args, kwargs)`); for
    diffusers models they are synthesised from the config when omitted. The graph is
    specialised to the shapes and non-tensor values of these inputs; the runtime captures again
    for a new shape signature.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        kwargs = synthesize_inputs(model, batch_size=batch_size, resolution=resolution)
    elif isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        kwargs = normalize_call(model, tuple(example_inputs[0]), example_inputs[1])
    elif isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
    else:
        raise MissingInputsError("example_inputs must be a dict of keyword arguments or an (args, kwargs) pair")
    return _capture_kwargs(model, kwargs)


def _is_identity(node: fx.Node) -> bool:
    """An op whose result equals its first argument bit for bit: x / 1, x * 1, eval-mode or p=0
    dropout, a cast to the dtype it already has. Only where the recorded result has the input's
    dtype and shape (x / 1 on an integer tensor is a float tensor, not x)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    args, target = node.args, node.target
    if target in (aten.div.Tensor, aten.mul.Tensor):
        identity = len(args) == 2 and not isinstance(args[1], (fx.Node, bool)) and isinstance(args[1], (int, float)) and args[1] == 1
    elif target is aten.dropout.default:
        identity = len(args) >= 3 and (args[2] is False or args[1] == 0)
    elif target is aten.to.dtype:
        identity = len(args) == 2 and not node.kwargs
    else:
        return False
    out, inp = node.meta.get("val"), args[0].meta.get("val")
    return (identity and isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)
            and out.dtype == inp.dtype and out.shape == inp.shape)


# alias -> weakref.ref to the user's tensor it stands for. A side table, not an attribute of the
# tensor: a tensor carrying a weak reference could no longer be pickled (torch.save) or copied.
_SOURCES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module tree holds: parameters, buffers and plain tensor attributes
    (which torch.export lifts as constants), tied ones once per holder."""
    found: list[torch.Tensor] = []
    for module in model.modules():
        found.extend(t for t in module._parameters.values() if t is not None)
        found.extend(t for t in module._buffers.values() if t is not None)
        found.extend(v for v in vars(module).values() if isinstance(v, torch.Tensor))
    return found


def alias(tensor: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor object sharing `tensor`'s storage (and its version counter), a Parameter
    if `tensor` is one, that remembers `source` (default: `tensor`) as what it stands for."""
    with torch.no_grad():
        new = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else tensor.detach()
    _SOURCES[new] = weakref.ref(source if source is not None else tensor)
    return new


def carry_source(new: torch.Tensor, old: torch.Tensor) -> None:
    """`new` replaces `old` (a conversion, a private copy): it stands for what `old` stood for."""
    ref = _SOURCES.get(old)
    if ref is not None and new is not old and new not in _SOURCES:
        _SOURCES[new] = ref


def source_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The user's tensor an alias stands for (following aliases of aliases), or None: not an
    alias, or the user's tensor no longer exists."""
    seen = 0
    while (ref := _SOURCES.get(tensor)) is not None and seen < 8:
        found = ref()
        if found is None:
            return None
        tensor, seen = found, seen + 1
    return tensor if seen else None


def alias_user_tensors(gm: nn.Module, model: nn.Module) -> int:
    """Replace, inside `gm`, every tensor object of `model` by an alias (one per tensor, so
    tied weights stay tied); returns how many tensors were aliased."""
    own = {id(t): t for t in module_tensors(model)}
    made: dict[int, torch.Tensor] = {}

    def swap(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or id(t) not in own:
            return t
        if id(t) not in made:
            made[id(t)] = alias(t)
        return made[id(t)]

    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                store[name] = swap(t)
        for name, v in list(vars(module).items()):
            if isinstance(v, torch.Tensor):
                module.__dict__[name] = swap(v)
    return len(made)


def drop_identity_ops(gm: fx.GraphModule) -> int:
    """Remove ops that return their input unchanged (see `_is_identity`); returns how many.

    diffusers' attention divides its output by `rescale_output_factor` (1.0) and keeps an
    eval-mode dropout after it: each is a full pass over the block's output that changes no
    value. At the zoo models' width such passes are a visible share of a cached step, where the
    forecast variants run little else (dit-digits: one of nine passes per forecast block)."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped


def _capture_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> DiTGraph:
    if not any(True for _ in model.parameters()):
        raise UnsupportedModelError(f"{type(model).__name__} has no parameters; it is not a diffusion transformer")
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode; ditopt captures an eval-mode copy "
            "(dropout off). Call model.eval() to avoid the copy.",
            stacklevel=3,
        )
        model = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(model, (), kwargs, strict=False)
    except Exception as exc:  # torch.export raises many types; report them as one
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {str(exc)[:500]}. "
            "Check that example inputs match the forward signature; for inputs ditopt cannot synthesise "
            "from the config, pass example_inputs={...}."
        ) from exc
    gm = exported.module()
    # The unlifted module holds the model's own Parameter objects: give the graph aliases.
    alias_user_tensors(gm, model)
    drop_identity_ops(gm)
    if any(n.target in SDPA_OPS for n in gm.graph.nodes if n.op == "call_function") is False:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no scaled_dot_product_attention op in its graph: it is not a "
            "diffusion transformer ditopt can optimize (ditopt expects attention through "
            "torch.nn.functional.scaled_dot_product_attention)."
        )
    blocks = _find_blocks(model, gm)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no transformer block list found. ditopt looks for a top-level "
            "nn.ModuleList whose elements each contain attention at a constant token count "
            "(UNets change resolution between stages and are not supported)."
        )
    assigned = _assign_segments(gm, blocks)
    n_seg = len(blocks) + 2
    members: list[list[fx.Node]] = [[] for _ in range(n_seg)]
    for node in gm.graph.nodes:
        if node.op == "call_function":
            members[assigned[node]].append(node)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    codegen = gm.graph._codegen
    in_spec = codegen.pytree_info.in_spec
    out_spec = codegen.pytree_info.out_spec
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat_out = output_node.args[0]
    flat_out = list(flat_out) if isinstance(flat_out, (list, tuple)) else [flat_out]
    outputs = tuple(o.name if isinstance(o, fx.Node) else Constant(o) for o in flat_out)
    key = call_key(kwargs)
    signature = CallSignature(
        input_names=tuple(p.name for p in placeholders), in_spec=in_spec, out_spec=out_spec, outputs=outputs, key=key
    )

    segments = [_build_segment(gm, members[0], "prologue", "prologue", None)]
    for i, path in enumerate(blocks):
        segments.append(_build_segment(gm, members[i + 1], f"block.{i}", "block", i))
    segments.append(_build_segment(gm, members[-1], "epilogue", "epilogue", None))

    image_tokens, grid = _image_tokens_and_grid(gm, set(members[0]), kwargs)
    enc = kwargs.get("encoder_hidden_states")
    text_tokens = int(enc.shape[1]) if isinstance(enc, torch.Tensor) and enc.dim() == 3 else 0

    infos = []
    for i, path in enumerate(blocks):
        nodes = members[i + 1]
        attn = _attention_sites(nodes, image_tokens, text_tokens)
        attn_linears = {n for a in attn for n in (*a.q, *a.k, *a.v, *a.out)}
        ffn = _ffn_sites(nodes, attn_linears)
        module_type = next(
            (_type_name(t) for n in nodes for p, t in module_paths(n) if p == path), type(model.get_submodule(path)).__name__
        )
        stream = "dual" if any(len(a.q) > 1 for a in attn) else "single"
        infos.append(
            BlockInfo(
                index=i,
                module=path,
                module_type=module_type,
                stream=stream,
                attention=tuple(attn),
                ffn=tuple(ffn),
                modulation=tuple(_modulation(nodes, segments[i + 1])),
                parameters=_param_count(segments[i + 1]),
            )
        )
    _annotate(segments, infos)

    timestep = next((n for n in TIMESTEP_NAMES if n in signature.input_names), None)
    latent = next((n for n in LATENT_NAMES if n in signature.input_names), None)
    graph = DiTGraph(
        model_class=type(model).__name__,
        signature=signature,
        segments=tuple(segments),
        blocks=tuple(infos),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        grid=grid,
        timestep_input=timestep,
        latent_input=latent,
        param_count=sum(p.numel() for p in model.parameters()),
        meta={"block_modules": tuple(blocks)},
    )
    graph.meta["capture_hash"] = graph.structure_hash()
    return graph


def _annotate(segments: list[Segment], infos: list[BlockInfo]) -> None:
    """Write `node.meta["ditopt"]` once: segment, block index and role of every node."""
    roles: dict[tuple[int, str], str] = {}
    for info in infos:
        for j, site in enumerate(info.attention):
            roles[(info.index, site.node)] = f"attn{j}.op"
            parts: dict[str, str] = {}
            for part in ("q", "k", "v", "out"):
                for name in getattr(site, part):
                    parts[name] = parts.get(name, "") + part  # a fused projection becomes "qkv"
            for name, joined in parts.items():
                roles[(info.index, name)] = f"attn{j}.{joined}"
        for j, ffn in enumerate(info.ffn):
            for name in ffn.up:
                roles.setdefault((info.index, name), f"ffn{j}.up")
            roles[(info.index, ffn.activation)] = f"ffn{j}.act"
            if ffn.down:
                roles.setdefault((info.index, ffn.down), f"ffn{j}.down")
        for name in info.modulation:
            roles[(info.index, name)] = "modulation"
    for seg in segments:
        for node in seg.module.graph.nodes:
            if node.op in ("call_function", "placeholder"):
                role = roles.get((seg.block, node.name)) if seg.block is not None else None
                node.meta["ditopt"] = {"segment": seg.name, "block": seg.block, "role": role}


def nodes_with_role(segment: Segment, prefix: str) -> list[fx.Node]:
    return [
        n for n in segment.module.graph.nodes
        if (n.meta.get("ditopt") or {}).get("role", None) and n.meta["ditopt"]["role"].startswith(prefix)
    ]
