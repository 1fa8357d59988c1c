"""Distillation of a pruned block stack on calibration activations (`layer_prune`'s
`distill_steps`): the original model is the teacher, the data is what calibration recorded.

`scope = "adjacent"` (the default): block-wise, one fit per removed interval. The student is the pruned stretch of the stack:
the kept block just before the interval (when no earlier fit has it), the interval's bridge
(or its pass-through), and the kept block just after it; for an interval at the end of the
stack, the epilogue in place of that block, so that the last fit trains toward the model's own
output. Its input is the original stretch's input as the original blocks compute it on the
recorded rows (`CalibrationReplay.block_io`), its target the original stretch's output.

What trains: the bridge's weights (per stream a, b, bias: the part the pass introduced) and the
weights of the kept neighbours. Only the neighbours: the other kept blocks read and produce the
values the original computes, so block-wise they have nothing to learn (their error is zero on
their own inputs); the neighbours are where the removal's error can be absorbed, a block's
capacity (attention, MLP, modulation) beside the bridge's affine map. A neighbour that another
pass gave an early-steps version stays frozen (its two versions would disagree), and with
`full_steps` the epilogue stays frozen (the early steps run the original blocks into it); the
neighbours that train run their original version on the early steps too.

`scope = "all"`: one fit of the whole block stack (every bridge, every kept block, the epilogue)
on the stack's recorded input toward the model's output: more capacity, and the kept blocks far
from a removal adapt too, at the cost of a backward pass through the whole stack per step.

The trainer is the shared one (ditopt.distill: Adam on copies, best held-out state kept, the
first quarter of the batches held out, deterministic under the seed, out of inference mode).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ditopt.calibration.replay import CalibrationReplay
from ditopt.distill import distill, plain_copy, relative_error
from ditopt.graph import DiTGraph, Segment, attribute

from .rewrite import StreamBridge, bridge_module, bridge_streams

EPILOGUE = "epilogue"


@dataclass
class Distilled:
    """What distillation changed, for one removal set: per interval its bridges, per kept block
    and for the epilogue the trained tensors (get_attr target -> value)."""

    removed: frozenset[int]
    bridges: dict[tuple[int, ...], dict[str, StreamBridge | None]] = field(default_factory=dict)
    blocks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    epilogue: dict[str, torch.Tensor] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)


def _weights(module: torch.nn.Module) -> list[str]:
    """The floating-point tensors a segment's graph reads (get_attr targets)."""
    return sorted({str(n.target) for n in module.graph.nodes if n.op == "get_attr"
                   and isinstance(attribute(module, str(n.target)), torch.Tensor)
                   and attribute(module, str(n.target)).is_floating_point()})


def with_weights(seg: Segment, state: dict[str, torch.Tensor]) -> Segment:
    """`seg` reading `state`'s tensors in place of its own (a new module; `seg`'s is untouched)."""
    module = fx.GraphModule(seg.module, copy.deepcopy(seg.module.graph))
    for target, value in state.items():
        *path, last = target.split(".")
        parent = attribute(module, ".".join(path)) if path else module
        setattr(parent, last, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    return seg.replace_module(module)


def trainable_block(graph: DiTGraph, block: int) -> bool:
    return graph.early_rule(block) is None and bool(_weights(graph.segment_for_block(block).module))


def has_epilogue(graph: DiTGraph) -> bool:
    return any(s.kind == "epilogue" for s in graph.segments) and bool(_weights(graph.epilogue.module))


def spans(graph: DiTGraph, runs: list[tuple[int, ...]], full_steps: int, scope: str = "adjacent") -> list[dict[str, Any]]:
    """The fits: per interval ("adjacent"), the kept block before it it trains (or None) and
    after it (a block index, EPILOGUE, or None); or ("all") one fit of the whole stack, every
    bridge and every kept block, toward the model's output (the block stack end to end)."""
    blocks = sorted(b.index for b in graph.blocks)
    removed = {b for r in runs for b in r}
    if scope == "all":
        epilogue = not full_steps and has_epilogue(graph)
        return [{"intervals": list(runs), "before": None, "after": EPILOGUE if epilogue else None,
                 "blocks": blocks}]
    claimed: set[int] = set()
    out = []
    for run in runs:
        before, after = run[0] - 1, run[-1] + 1
        lo = before if (before in blocks and before not in removed and before not in claimed
                        and trainable_block(graph, before)) else None
        if after in blocks and after not in removed:
            hi: int | str | None = after if trainable_block(graph, after) else None
        else:
            hi = EPILOGUE if (run[-1] == blocks[-1] and not full_steps and has_epilogue(graph)) else None
        claimed |= {b for b in (lo, hi) if isinstance(b, int)}
        first = lo if lo is not None else run[0]
        last = blocks[-1] if hi == EPILOGUE else (hi if hi is not None else run[-1])
        out.append({"intervals": [run], "before": lo, "after": hi, "blocks": list(range(first, last + 1))})
    return out


def distill_pruned(graph: DiTGraph, pruned: DiTGraph, replay: CalibrationReplay, runs: list[tuple[int, ...]],
                   bridges: dict[tuple[int, ...], dict[str, StreamBridge | None]], *, steps: int, lr: float, seed: int,
                   full_steps: int, scope: str = "adjacent") -> Distilled:
    """Distil every interval's stretch of `pruned` (the graph with the removal, bridges
    `bridges`) toward the same stretch of `graph` (the original) on `replay`'s rows."""
    removed = frozenset(b for r in runs for b in r)
    result = Distilled(removed, bridges={r: dict(bridges.get(r, {})) for r in runs})
    plan = spans(graph, runs, full_steps, scope)
    wanted = {b for s in plan for b in s["blocks"]}
    io = replay.block_io(wanted)
    fits = []
    for i, s in enumerate(plan):
        fits.append(_fit(graph, pruned, io, s, result, steps=steps, lr=lr, seed=seed + i))
    result.log = {"scope": scope, "steps": steps, "lr": lr, "seed": seed, "rows": replay.rows, "batches": len(next(iter(io.values()))),
                  "seconds": round(sum(f.get("seconds", 0.0) for f in fits), 2), "fits": fits}
    return result


def _fit(graph: DiTGraph, pruned: DiTGraph, io: dict[int, list], s: dict[str, Any], result: Distilled, *,
         steps: int, lr: float, seed: int) -> dict[str, Any]:
    runs: list[tuple[int, ...]] = s["intervals"]
    run_of = {b: r for r in runs for b in r}
    span_blocks: list[int] = s["blocks"]
    # The student's parts, in order: (key prefix or None, module, inputs, outputs, trainable targets).
    with torch.inference_mode(False):
        parts: list[tuple[str | None, torch.nn.Module, tuple[str, ...], tuple[str, ...], list[str]]] = []
        for b in span_blocks:
            seg = pruned.segment_for_block(b)
            run = run_of.get(b)
            if run is None:
                module = plain_copy(seg.module)
                targets = _weights(module) if trainable_block(graph, b) else []
                parts.append((f"block{b}:", module, seg.inputs, seg.outputs, targets))
            elif b == run[0] and any(x is not None for x in result.bridges[run].values()):
                module = plain_copy(bridge_module(graph, graph.segment_for_block(b), result.bridges[run]))
                names = [n for n, _ in module.named_buffers() if "." not in n]  # a{j}, b{j}, bias{j}
                parts.append((f"bridge{b}:", module, seg.inputs, seg.outputs, sorted(names)))
            else:
                parts.append((None, seg.module, seg.inputs, seg.outputs, []))
        if s["after"] == EPILOGUE:
            epi = graph.epilogue
            module = plain_copy(epi.module)
            parts.append(("epilogue:", module, epi.inputs, epi.outputs, _weights(module)))
        params = {prefix + t: attribute(module, t).detach().clone()
                  for prefix, module, _, _, targets in parts if prefix for t in targets}
        trained = [p[0].rstrip(":") for p in parts if p[0] and p[4]]
        entry: dict[str, Any] = {"intervals": [list(r) for r in runs], "trained": trained,
                                 "parameters": int(sum(v.numel() for v in params.values()))}
        if not params:
            entry["skipped"] = "nothing to train (no bridge and no kept neighbour)"
            return entry
        produced = {o for _, _, _, outs, _ in parts for o in outs}
        data = []  # per batch: (the student's starting values, the teacher's outputs)
        for k in range(len(io[span_blocks[0]])):
            env: dict[str, Any] = {}
            for b in span_blocks:
                args, outs = io[b][k]
                seg = graph.segment_for_block(b)
                env.update({n: v for n, v in zip(seg.inputs, args) if n not in env})
                env.update(zip(seg.outputs, outs))
            if s["after"] == EPILOGUE:
                with torch.no_grad():
                    want = dict(zip(graph.epilogue.outputs, graph.epilogue.module(*[env[n] for n in graph.epilogue.inputs])))
            else:
                want = {n: env[n] for n in graph.segment_for_block(span_blocks[-1]).outputs}
            start = {n: _clone(v) for n, v in env.items() if n not in produced}
            data.append((start, {n: _clone(v) for n, v in want.items()
                                 if n in parts[-1][3] and isinstance(v, torch.Tensor) and v.is_floating_point()}))
    held = max(1, len(data) // 4) if len(data) > 1 else 0
    train, judge = data[held:] or data, data[:held] or data

    def forward(live: dict[str, torch.Tensor], start: dict[str, Any]) -> dict[str, Any]:
        env = dict(start)
        for prefix, module, inputs, outputs, targets in parts:
            args = tuple(env[n] for n in inputs)
            if prefix and targets:
                out = torch.func.functional_call(module, {t: live[prefix + t] for t in targets}, args)
            else:
                out = module(*args)
            env.update(zip(outputs, out))
        return env

    def error(live: dict[str, torch.Tensor], batch: tuple) -> torch.Tensor:
        start, want = batch
        got = forward(live, start)
        return sum(relative_error(got[n], w) for n, w in want.items())

    def held_out(live: dict[str, torch.Tensor]) -> float:
        return float(sum(float(error(live, b)) for b in judge) / len(judge))

    state, log = distill(params, lambda live, i: error(live, train[i]), held_out, steps, len(train), lr, seed)
    entry.update(log)
    entry["held_out_batches"] = len(judge)
    if log["held_out_after"] >= log["held_out_before"]:
        entry["note"] = "no step improved the held-out error: the fit keeps its starting tensors"
        return entry
    for prefix, module, _, _, targets in parts:
        if not prefix or not targets:
            continue
        values = {t: state[prefix + t] for t in targets}
        if prefix.startswith("bridge"):
            run = run_of[int(prefix[len("bridge"):-1])]
            streams = bridge_streams(graph, graph.segment_for_block(run[0]))
            new = {}
            for j, name in enumerate(streams):
                old = result.bridges[run].get(name)
                new[name] = None if old is None else StreamBridge(
                    values[f"a{j}"].contiguous(), values[f"b{j}"].contiguous() if f"b{j}" in values else None,
                    values[f"bias{j}"].contiguous())
            result.bridges[run] = new
        elif prefix == "epilogue:":
            result.epilogue = values
        else:
            result.blocks[int(prefix[len("block"):-1])] = values
    return entry


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x
