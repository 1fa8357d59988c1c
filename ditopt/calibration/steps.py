"""The core step recorder: what every calibration records, whatever its collectors.

Per model call: the generation, step, CFG branch and timestep (StepContext), the rows of the
call (the blocks' image stream, or the latent input where the blocks pair no stream) and whether
CFG was batched into it (equal latent halves). From these the trajectory: the step count, the
timesteps, and the layout of trajectories (generation, CFG branch, rows) that every per-trajectory
tensor of a collector follows and that `CalibStats.restricted_to_samples` matches to samples.
What a pass family measures on the blocks (caching's residual sketches, attention masses, block
inputs) is a collector of its own (`ditopt.registry.register_collector`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CalibrationError
from ..graph import DiTGraph, latent_halves_equal
from ..plan import Stage, StepContext
from .streams import span_io


@dataclass(frozen=True)
class Call:
    generation: int
    step: int
    branch: int
    timestep: float | None
    rows: int
    batched_cfg: bool


class StepRecorder(Stage):
    """Records each call after the rest of the plan ran (results unchanged); runs no segment."""

    kind = "calibration-steps"

    def __init__(self, log: "StepLog", rows_from: str) -> None:
        self.log, self.rows_from = log, rows_from

    def segment_names(self) -> tuple[str, ...]:
        return ()

    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        value = env.get(self.rows_from)
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise CalibrationError(
                f"calibration cannot tell the rows of a call: {self.rows_from or '(no value)'!r} is not a batched tensor")
        self.log.calls.append(Call(ctx.generation, ctx.step, ctx.branch, ctx.timestep, int(value.shape[0]),
                                   latent_halves_equal(graph, env)))


class StepLog:
    """The calls of one calibration run, in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def instrument(self, g: DiTGraph) -> DiTGraph:
        blocks = tuple(s.name for s in g.block_segments)
        stream = span_io(g, blocks).primary_input if blocks else ""
        return g.evolve(plan=tuple(g.plan) + (StepRecorder(self, stream or (g.latent_input or "")),))

    def trajectory(self) -> tuple[int, list[float], list[list[int]] | None, int]:
        """(steps, timesteps per step (NaN where the sampler gave none), layout, trajectories).

        A trajectory is one (generation, CFG branch, row); complete ones ran every step and are
        the ones collectors stack, in the order their (generation, branch) first called. The
        layout lists [generation, branch, rows] of each complete group, and is None unless every
        group is complete (then rows can be matched to returned samples)."""
        calls = self.calls
        if not calls:
            raise CalibrationError("the calibration function never called the model it was given; it must sample with that model")
        steps = max(c.step for c in calls) + 1
        groups: dict[tuple[int, int], dict[int, Call]] = {}
        timesteps: dict[int, float] = {}
        for c in calls:
            groups.setdefault((c.generation, c.branch), {})[c.step] = c
            if c.timestep is not None:
                timesteps.setdefault(c.step, c.timestep)
        complete = {key: g for key, g in groups.items() if len(g) == steps}
        if not complete:
            raise CalibrationError("no complete sampling trajectory was recorded: the calibration function must run whole generations")
        layout = [[gen, branch, next(iter(g.values())).rows] for (gen, branch), g in complete.items()]
        count = sum(row[2] for row in layout)
        return steps, [timesteps.get(s, float("nan")) for s in range(steps)], (layout if len(complete) == len(groups) else None), count

    def batched_cfg(self) -> bool:
        """Every call had equal latent halves: CFG batched into one call (rows of the first half
        unconditional)."""
        return all(c.batched_cfg for c in self.calls)
