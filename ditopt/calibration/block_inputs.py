"""Calibration collector "block_inputs": what the blocks read from before them (the prologue's
outputs and the call inputs the blocks and the epilogue take), recorded on a subset of steps of
every calibration trajectory, so that a pass (layer pruning, quantization) can replay the stack on real activations:
measure the final-output error of a candidate removal per step, and fit a bridge on the
original model's streams.

Values with a batch dimension are stored per trajectory, in the core's trajectory order
(generation, CFG branch, row), so that `CalibStats.restricted_to_samples` keeps only the
search's samples; values shared by every row (rotary tables) are stored once.
"""

from __future__ import annotations

from typing import Any

import torch

from .streams import span_io
from ..graph import DiTGraph
from ..plan import Stage, StepContext
from ..registry import register_collector

STEP_STRIDE = 4  # record steps 0, 4, 8, ...: enough steps per noise level to rank blocks on
PREFIX = "block_inputs."


def recorded_names(graph: DiTGraph) -> tuple[str, ...]:
    """The values the blocks and the epilogue read from the prologue or the call."""
    names = tuple(s.name for s in graph.block_segments) + (graph.epilogue.name,)
    return span_io(graph, names).inputs


class _Recorder(Stage):
    kind = "calibration-block-inputs"

    def __init__(self, sink: "BlockInputsCollector") -> None:
        self.sink = sink

    def segment_names(self) -> tuple[str, ...]:
        return ()

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        if ctx.step % STEP_STRIDE == 0:
            latent = env.get(graph.latent_input) if graph.latent_input else None
            batch = int(latent.shape[0]) if isinstance(latent, torch.Tensor) and latent.dim() else None
            self.sink.add(ctx, {n: env[n] for n in self.sink.names}, batch)


@register_collector("block_inputs")
class BlockInputsCollector:
    name = "block_inputs"

    def __init__(self, graph: DiTGraph) -> None:
        self.names = recorded_names(graph)
        self.calls: list[tuple[int, int, int, dict[str, Any]]] = []
        self.batches: list[int | None] = []  # per call: the latent's rows

    def instrument(self, g: DiTGraph) -> DiTGraph:
        # Recorded after the prologue ran: the first stage of the plan is the prologue's.
        plan = tuple(g.plan)
        return g.evolve(plan=plan[:1] + (_Recorder(self),) + plan[1:])

    def add(self, ctx: StepContext, values: dict[str, Any], batch: int | None = None) -> None:
        self.batches.append(batch)
        kept = {n: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for n, v in values.items()}
        self.calls.append((ctx.generation, ctx.branch, ctx.step, kept))

    def summarise(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not self.calls:
            return {}, {"names": [], "steps": []}
        steps = sorted({c[2] for c in self.calls})
        first = self.calls[0][3]
        tensors_of = {n: v for n, v in first.items() if isinstance(v, torch.Tensor)}
        # Per-sample values have the call's batch (the latent's rows) as dim 0 and are stored per
        # trajectory; the others (rotary tables, whose dim 0 is the token count) once. A value
        # without a batch dimension that changes between calls cannot be replayed. (A shared
        # table whose leading size happens to equal the batch would be misread as per sample.)
        varying = [n for n, v in tensors_of.items()
                   if any(not torch.equal(c[3][n], v) for c in self.calls[1:] if isinstance(c[3].get(n), torch.Tensor))]
        if all(b is not None for b in self.batches):
            batched = [n for n, v in tensors_of.items()
                       if all(isinstance(c[3].get(n), torch.Tensor) and c[3][n].dim() and c[3][n].shape[0] == b
                              for c, b in zip(self.calls, self.batches))]
        else:  # no latent input named: the largest leading size among the values that change
            batch = max((v.shape[0] for n, v in tensors_of.items() if n in varying and v.dim()), default=0)
            batched = [n for n, v in tensors_of.items() if v.dim() and v.shape[0] == batch]
        unreplayable = [n for n in varying if n not in batched]
        groups: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}
        for generation, branch, step, values in self.calls:
            groups.setdefault((generation, branch), {})[step] = values
        complete = [g for g in groups.values() if sorted(g) == steps]
        tensors: dict[str, torch.Tensor] = {}
        for n in batched:
            # [trajectories, recorded steps, *row]
            tensors[PREFIX + n] = torch.cat([torch.stack([g[s][n] for s in steps], 1) for g in complete], 0)
        shared = [n for n in tensors_of if n not in batched]
        for n in shared:
            tensors[PREFIX + n] = self.calls[0][3][n]
        meta = {
            "names": list(self.names),
            "batched": batched,
            "shared": shared,
            "unreplayable": unreplayable,  # change between calls without a batch dimension
            "steps": steps,
            "complete": len(complete) == len(groups),
            # restricted_to_samples subsets these along dim 0 with the trajectory sketches.
            "per_trajectory": [PREFIX + n for n in batched] if len(complete) == len(groups) else [],
        }
        return tensors, meta
