"""Execution plan: the host-side schedule over a DiTGraph's segments.

Node-level passes (attention substitution, quantization) rewrite a segment's graph. Step-level
passes (caching, forecasting) rewrite the *plan*: they replace a run of block stages with a
stage that decides, on the host and between segments, whether to compute or reuse. Stages name
segments instead of holding them, so the two kinds of pass compose in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    import torch.fx as fx

    from .graph import DiTGraph, Segment


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
    # The program for the second half of this call's batch rows (with batched CFG: the
    # conditional rows), captured on first use, or why there is none (str); None where the
    # runtime offers none.
    second_half: Callable[[], "DiTGraph | str"] | None = field(default=None, repr=False)


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

    def uses_second_half(self) -> bool:
        """Whether some steps run the half-batch program (`StepContext.second_half`)."""
        return False

    def spec(self) -> "StageSpec | None":
        """Every parameter the stage needs to run again outside this process: JSON plus named
        tensors (an export artifact stores them; `stage_from_spec` rebuilds the stage). None
        where the stage cannot be rebuilt from data (the artifact runner then refuses it)."""
        return None


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

    def spec(self) -> "StageSpec":
        return {"kind": self.kind, "names": list(self.names)}, {}


# A stage as data: (JSON-able parameters with "kind", tensors by name). Stages of pass families
# register a loader for their kind, so the export runner rebuilds them without importing passes.
StageSpec = tuple[dict[str, Any], dict[str, "torch.Tensor"]]
_STAGE_LOADERS: dict[str, Callable[[dict[str, Any], dict[str, "torch.Tensor"]], Stage]] = {}


def register_stage_loader(kind: str, loader: Callable[[dict[str, Any], dict[str, "torch.Tensor"]], Stage]) -> None:
    """Make stages of `kind` rebuildable from their `Stage.spec()` (see `stage_from_spec`)."""
    _STAGE_LOADERS[kind] = loader


def stage_from_spec(spec: dict[str, Any], tensors: dict[str, "torch.Tensor"]) -> Stage:
    """The stage a `Stage.spec()` describes; KeyError when no loader is registered for its kind."""
    from .registry import load_plugins  # pass families register their stage kinds on import

    load_plugins()
    kind = spec.get("kind")
    if kind not in _STAGE_LOADERS:
        raise KeyError(kind)
    return _STAGE_LOADERS[kind](spec, tensors)


register_stage_loader(RunSegments.kind, lambda spec, _: RunSegments(tuple(spec["names"])))


def default_plan(graph: "DiTGraph") -> tuple[Stage, ...]:
    return tuple(RunSegments((seg.name,)) for seg in graph.main_segments)


@dataclass(frozen=True)
class EarlySteps:
    """On steps 0..steps-1 of every generation, `block` runs another version of its segments
    (e.g. the dense attention an attention substitution replaced).

    This is held by the graph (`DiTGraph.early_steps`) and resolved by the runtime per call
    (`DiTGraph.at_step`), not by a plan stage: step-level passes (caching) replace the block
    stages with their own and run segments by name through `graph.segment(name)`, so a switch
    kept in a stage would be dropped or bypassed by them, whereas a graph that answers
    `segment(name)` with the step's version composes with any stage, in any pass order. The
    per-call verification (one call from a fresh state, plan run on the graph itself) measures
    the later steps' version, the one that differs from the original.

    `derive(segment)` builds the early version of one of the block's segments (a module with the
    same inputs and outputs), or None when that segment needs none. The graph keeps it as the
    variant segment f"{name}:{suffix}" and derives it again whenever a pass replaces or adds a
    segment of the block, so variants made by later passes (feature forecasting's `:record`)
    switch too. One rule per block: a second rule for the block keeps the larger step count.
    """

    block: int
    steps: int
    derive: Callable[["Segment"], "fx.GraphModule | None"] = field(compare=False, repr=False)
    suffix: str = "dense"
    reason: str = ""

    def describe(self) -> dict[str, Any]:
        return {"block": self.block, "steps": self.steps, "variant_suffix": self.suffix, "reason": self.reason}
