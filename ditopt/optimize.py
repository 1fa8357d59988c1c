"""`ditopt.optimize`: capture, (calibrate,) apply the profile's passes with verification, and
return the drop-in runtime module."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .capture import capture, normalize_call
from .errors import CalibrationError
from .graph import DiTGraph
from .inputs import synthesize_inputs
from .profiles import Profile, load_profile
from .registry import PassContext, get_pass
from .runtime import OptimizedDiT
from .verify import Verification, verify_per_call


@dataclass
class PassRecord:
    name: str
    config: dict[str, Any]
    modified: bool
    applied: bool  # False when rolled back
    report: dict[str, Any]
    verification: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class OptimizationReport:
    profile: dict[str, Any]
    model_class: str
    graph_hash: str
    structure: dict[str, Any]
    passes: list[PassRecord] = field(default_factory=list)
    verification: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v.get("passed", True) for v in self.verification)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ditopt_version": __version__,
            "passed": self.passed,
            "profile": self.profile,
            "model_class": self.model_class,
            "graph_hash": self.graph_hash,
            "passes": [p.to_dict() for p in self.passes],
            "verification": self.verification,
            "structure": self.structure,
            "environment": self.environment,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


def apply_passes(
    graph: DiTGraph,
    profile: Profile,
    ctx: PassContext,
    *,
    verify_with: tuple[nn.Module, dict[str, Any]] | None = None,
    records: list[PassRecord] | None = None,
    skip: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[DiTGraph, set[int]]:
    """Apply the profile's passes in order. With `verify_with`, node-level passes are checked
    per call against the original and rolled back when over budget; returns the rolled-back
    pass positions so that replays on new shapes skip them too."""
    rolled_back: set[int] = set()
    for i, entry in enumerate(profile.passes):
        if i in skip:
            continue
        spec = get_pass(entry.name)
        result = spec.apply(graph, entry.config, ctx)
        verification: Verification | None = None
        applied = True
        if verify_with is not None and result.modified and spec.level == "node" and profile.verify.enabled:
            model, kwargs = verify_with
            verification = verify_per_call(
                model, result.graph, kwargs, max_rel_err=profile.budget.max_rel_err,
                timesteps=profile.verify.timesteps, seed=profile.verify.seed,
            )
            applied = verification.passed
        if applied:
            graph = result.graph.evolve(notes=result.graph.notes + (entry.name,))
        else:
            rolled_back.add(i)
        if records is not None:
            records.append(
                PassRecord(
                    name=entry.name,
                    config=entry.config.model_dump(mode="json"),
                    modified=result.modified,
                    applied=applied,
                    report=result.report,
                    verification=verification.to_dict() if verification else None,
                )
            )
    return graph, rolled_back


def optimize(
    model: nn.Module,
    profile: Profile | str | Any = "identity",
    *,
    example_inputs: dict[str, Any] | None = None,
    calibration: Callable[[nn.Module], Any] | None = None,
    stats: Any = None,
    num_steps: int | None = None,
) -> OptimizedDiT:
    """Optimize `model` with `profile` and return a drop-in module.

    `example_inputs` (keyword arguments of one forward call) are required for non-diffusers
    models. `calibration(model)` runs the user's own sampling loop with the model it is given;
    it is needed when the profile's passes read calibration statistics (or pass `stats`).
    The user's model is never modified.
    """
    prof = load_profile(profile)
    kwargs = dict(example_inputs) if example_inputs is not None else synthesize_inputs(model)
    kwargs = normalize_call(model, (), kwargs)
    graph = capture(model, kwargs)

    needs = sorted({n for e in prof.passes for n in get_pass(e.name).needs})
    if needs and stats is None:
        if calibration is None:
            raise CalibrationError(
                f"profile {prof.name!r} has passes that need calibration statistics ({', '.join(needs)}); "
                "pass calibration=fn where fn(model) runs your sampling loop with the model it is given, "
                "or stats=... from an earlier calibration"
            )
        from .calibration import calibrate

        stats = calibrate(model, graph, needs, calibration)
    if stats is not None and num_steps is None:
        num_steps = getattr(stats, "num_steps", None)

    ctx = PassContext(model=model, stats=stats, budget=prof.budget, num_steps=num_steps)
    records: list[PassRecord] = []
    optimized_graph, rolled_back = apply_passes(graph, prof, ctx, verify_with=(model, kwargs), records=records)

    report = OptimizationReport(
        profile=prof.dump(),
        model_class=graph.model_class,
        graph_hash=graph.structure_hash(),
        structure=optimized_graph.summary(),
        passes=records,
        environment=environment(),
    )
    if prof.verify.enabled:
        final = verify_per_call(
            model, optimized_graph, kwargs, max_rel_err=prof.budget.max_rel_err,
            timesteps=prof.verify.timesteps, seed=prof.verify.seed,
        )
        report.verification.append(final.to_dict())

    def build(call_kwargs: dict[str, Any]) -> DiTGraph:
        fresh = capture(model, call_kwargs)
        replayed, _ = apply_passes(fresh, prof, ctx, skip=rolled_back)
        return replayed

    return OptimizedDiT(model, build, first=(kwargs, optimized_graph), num_steps=num_steps, report=report)
