"""Execution plan: the host-side schedule over a DiTGraph's segments.

Node-level passes (attention substitution, quantization) rewrite a segment's graph. Step-level
passes (caching, forecasting) rewrite the *plan*: they replace a run of block stages with a
stage that decides, on the host and between segments, whether to compute or reuse. Stages name
segments instead of holding them, so the two kinds of pass compose in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .graph import DiTGraph


@dataclass
class StepContext:
    """What a stage knows about the current call."""

    step: int  # denoising step within the current generation, from 0
    branch: int  # CFG branch slot: 0, or 1 for the second call of a step when CFG is split
    timestep: float | None
    generation: int  # increases on every detected or explicit reset
    state: dict[str, Any]  # this branch's state, shared by the stages; cleared per generation
    num_steps: int | None = None  # steps the plan was calibrated for, when known
    record: dict[str, Any] = field(default_factory=dict)  # what this call did (computed blocks, ...)


class Stage:
    """One step of the plan. Subclasses keep every cross-step value in `ctx.state`."""

    kind = "stage"

    def segment_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def run(self, graph: "DiTGraph", env: dict[str, Any], ctx: StepContext) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON description for reports and export manifests."""
        return {"kind": self.kind, "segments": list(self.segment_names())}


@dataclass(frozen=True)
class RunSegments(Stage):
    """Run the named segments, unconditionally, in order."""

    names: tuple[str, ...]
    kind = "run"

    def segment_names(self) -> tuple[str, ...]:
        return self.names

    def run(self, graph: "DiTGraph", env: dict[str, Any], ctx: StepContext) -> None:
        for name in self.names:
            graph.segment(name).run(env)
        computed = ctx.record.setdefault("computed", [])
        computed.extend(self.names)


def default_plan(graph: "DiTGraph") -> tuple[Stage, ...]:
    return tuple(RunSegments((seg.name,)) for seg in graph.main_segments)
