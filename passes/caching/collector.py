"""Calibration collector "trajectory": a fixed random sketch of every block's residual on the
image stream, per call, and its norm; what the calibrated caching passes (calibrated_schedule,
delta_cache) read to place computed steps and fit forecasts.

The step count, the timesteps, the CFG batch layout and the reference samples are the core's
(ditopt.calibration.steps), recorded on every calibration; this collector adds, per complete
trajectory in the core's order (generation, CFG branch, row):

- `block_residual_sketch` [trajectories, steps, blocks, sketch] (fp16) and `block_residual_norm`
  [trajectories, steps, blocks]: declared per trajectory, so that a restriction to some samples
  subsets them;
- `sketch_index`: which element of a batch row each sketch column is (a flat index into the
  meta's `stream_shape`), so a pass can fit per-channel quantities from the sketch;

and its meta (`stats.meta["trajectory"]`): `blocks`, `sketch` (columns), `stream_shape` (one
batch row of the image stream).
"""

from __future__ import annotations

from typing import Any

import torch

from ditopt.calibration import CalibStats
from ditopt.calibration.streams import SpanIO, span_io
from ditopt.errors import CalibrationError
from ditopt.graph import DiTGraph
from ditopt.plan import RunSegments, Stage, StepContext
from ditopt.registry import register_collector

NAME = "trajectory"
SKETCH_SIZE = 2048  # residual elements kept per block and step: enough to estimate norms of differences
PER_TRAJECTORY = ("block_residual_sketch", "block_residual_norm")


class ResidualRecorder(Stage):
    """Runs the blocks one by one (in place of their plain stages) and keeps, per call, the
    sketch of each block's residual on the image stream."""

    kind = "calibration-recorder"

    def __init__(self, io: SpanIO, block_names: tuple[str, ...], sink: "ResidualCollector") -> None:
        self.io, self.block_names, self.sink = io, block_names, sink

    def segment_names(self) -> tuple[str, ...]:
        return self.block_names

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        stream_in = self.io.primary_input
        residuals = []
        for name in self.block_names:
            seg = graph.segment(name)
            before = env[stream_in] if stream_in in env else None
            seg.run(env)
            # The primary stream's name changes block to block: follow the block's own pairing.
            out_name = self.sink.block_stream[name]
            after = env[out_name]
            residuals.append(self.sink.sketch(after - before) if before is not None else None)
            stream_in = out_name
        self.sink.add(ctx, residuals)
        ctx.record.setdefault("computed", []).extend(self.block_names)


@register_collector(NAME)
class ResidualCollector:
    name = NAME

    def __init__(self, graph: DiTGraph, seed: int = 0) -> None:
        self.block_stream = {seg.name: span_io(graph, (seg.name,)).primary_output for seg in graph.block_segments}
        self.seed = seed
        self.index: torch.Tensor | None = None
        self.row_shape: tuple[int, ...] = ()  # one batch row of the first sketched stream
        self.calls: list[tuple[int, int, int, torch.Tensor]] = []  # (generation, branch, step, [rows, blocks, sketch])

    def instrument(self, g: DiTGraph) -> DiTGraph:
        """The blocks' plain stages (one RunSegments per block, in order, as captured) become one
        recorder that runs them the same way."""
        blocks = tuple(s.name for s in g.block_segments)
        plan = list(g.plan)
        runs = [i for i, s in enumerate(plan) if isinstance(s, RunSegments) and s.names and set(s.names) <= set(blocks)]
        if not runs or tuple(n for i in runs for n in plan[i].names) != blocks or runs != list(range(runs[0], runs[-1] + 1)):
            raise CalibrationError(f"collector {NAME!r} records the blocks one by one and needs them run in order by plain "
                                   "stages; instrument the captured graph, before any pass rewrote its plan")
        recorder = ResidualRecorder(span_io(g, blocks), blocks, self)
        return g.evolve(plan=tuple(plan[: runs[0]]) + (recorder,) + tuple(plan[runs[-1] + 1 :]))

    def sketch(self, residual: torch.Tensor) -> torch.Tensor:
        flat = residual.detach().float().reshape(residual.shape[0], -1)
        if self.index is None:
            gen = torch.Generator().manual_seed(self.seed)
            k = min(SKETCH_SIZE, flat.shape[1])
            self.index = torch.randperm(flat.shape[1], generator=gen)[:k].sort().values
            self.row_shape = tuple(residual.shape[1:])
        return flat[:, self.index.to(flat.device)].cpu()

    def add(self, ctx: StepContext, residuals: list[torch.Tensor]) -> None:
        self.calls.append((ctx.generation, ctx.branch, ctx.step, torch.stack(residuals, 1)))

    def summarise(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # The core's trajectories: (generation, branch) groups that ran every step, in the order
        # they first called; the rows of a batched call are trajectories too.
        steps = max((c[2] for c in self.calls), default=-1) + 1
        groups: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        for generation, branch, step, res in self.calls:
            groups.setdefault((generation, branch), {})[step] = res
        complete = [g for g in groups.values() if len(g) == steps]
        if not complete:  # calibrate says why (no call, no whole generation)
            return {}, {"blocks": list(self.block_stream), "sketch": 0, "stream_shape": [], "per_trajectory": []}
        # [trajectories, steps, blocks, sketch]
        stacked = torch.cat([torch.stack([g[s] for s in range(steps)], 0).transpose(0, 1) for g in complete], 0)
        tensors = {"block_residual_sketch": stacked.half(), "block_residual_norm": stacked.norm(dim=-1)}
        if self.index is not None:
            tensors["sketch_index"] = self.index.clone()
        meta = {
            "blocks": list(self.block_stream),
            "sketch": int(stacked.shape[-1]),
            "stream_shape": list(self.row_shape),
            "per_trajectory": list(PER_TRAJECTORY),
        }
        return tensors, meta


def residual_meta(stats: CalibStats) -> dict[str, Any]:
    """This collector's meta in `stats` ({} when the stats were calibrated without it)."""
    return stats.meta.get(NAME) or {}
