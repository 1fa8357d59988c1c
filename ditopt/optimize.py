"""`ditopt.optimize`: capture, (calibrate,) apply the profile's passes with verification, and
return the drop-in runtime module."""

from __future__ import annotations

import json
import platform
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from . import __version__
from .capture import capture, normalize_call
from .errors import CalibrationError, DitoptError, QualityGateError, QualityGateWarning
from .graph import DiTGraph
from .inputs import synthesize_inputs
from .profiles import Profile, load_profile
from .registry import PassContext, get_pass
from .runtime import OptimizedDiT
from .verify import Verification, psnr, verify_end_to_end, verify_per_call


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
    retries: list[dict[str, Any]] = field(default_factory=list)  # end-to-end checks that missed; details[-1] says what the retry changed

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
            "retries": self.retries,
            "structure": self.structure,
            "environment": self.environment,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)


def describe_retry(attempt: dict[str, Any]) -> str:
    """One line for a held-out check that missed (an entry of `report["retries"]`): what it
    measured and what the next attempt changed."""
    bound, mean = attempt.get("psnr_lower_db"), attempt.get("psnr_db")
    line = (f"held-out check missed: mean {mean:.2f} dB, lower bound {bound:.2f} dB"
            if isinstance(mean, (int, float)) and isinstance(bound, (int, float)) else "held-out check missed")
    step = next((d for d in reversed(attempt.get("details", [])) if "next" in d), {})
    if step.get("next") == "relax":
        change = ", ".join(f"{k}={v}" for k, v in step.items() if k not in ("next", "pass"))
        return f"{line}; retried with {step.get('pass')} {change}"
    if step.get("next") == "tighten":
        return f"{line}; retried with the search target raised by {step['psnr_tighten_db']:.2f} dB in all"
    return line


def describe_gate_failure(report: dict[str, Any]) -> str | None:
    """What missed and what to change, for a report whose quality gate failed (None if it
    passed): the message of `QualityGateError`, the warning, and the CLI's last line."""
    failed = [v for v in report.get("verification", []) if not v.get("passed", True)]
    if not failed:
        return None
    lines = []
    for v in failed:
        budget = v.get("budget") or {}
        if v.get("kind") == "end-to-end":
            spread = next((d for d in v.get("details", []) if "samples" in d), {})
            attempts = len(report.get("retries", [])) + 1
            text = (f"quality gate failed: over {spread.get('samples', '?')} held-out samples the "
                    f"{budget.get('confidence', 0.5):.0%} lower bound of the mean PSNR is {format_db(v.get('psnr_lower_db'))} "
                    f"(mean {format_db(v.get('psnr_db'))}), under the {budget.get('min_psnr_db')} dB budget, after "
                    f"{attempts} attempt{'s' if attempts > 1 else ''}.")
            predicted = [p["report"]["predicted_psnr_db"] for p in report.get("passes", [])
                         if p.get("applied") and isinstance(p.get("report", {}).get("predicted_psnr_db"), (int, float))]
            mean = v.get("psnr_db")
            if predicted and isinstance(mean, (int, float)) and max(predicted) > mean:
                # The usual cause: the search judged plans on samples that flatter them.
                text += (f" The search judged the plan on the calibration samples, which read {max(predicted) - mean:.1f} dB "
                         "above the held-out ones.")
            text += (" To fix: calibrate on more, or more varied, samples; validate on more held-out samples (a tighter "
                     f"bound); allow more retries (max_retries={attempts}); or lower budget.min_psnr_db.")
        else:
            text = (f"quality gate failed: one denoiser call differs from the original by relative error "
                    f"{v.get('max_rel_err')}, over budget.max_rel_err = {budget.get('max_rel_err')}; raise it, or drop the "
                    "pass that changes single calls.")
        lines.append(text)
    return " ".join(lines)


def format_db(value: Any) -> str:
    """A PSNR for people: "31.27 dB"; a report's "inf" as is, a missing value as "? dB"."""
    if isinstance(value, (int, float)):
        return f"{value:.2f} dB"
    return "? dB" if value is None else str(value)


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
    resolved: dict[int, tuple[str, Any]] | None = None,
) -> tuple[DiTGraph, set[int]]:
    """Apply the profile's passes in order. With `verify_with`, node-level passes are checked
    per call against the original and rolled back when over budget; returns the rolled-back
    pass positions so that replays on new shapes skip them too."""
    rolled_back: set[int] = set()
    for i, entry in enumerate(profile.passes):
        if i in skip:
            continue
        name, config = resolved.get(i, (entry.name, entry.config)) if resolved is not None else (entry.name, entry.config)
        spec = get_pass(name)
        result = spec.apply(graph, config, ctx)
        if result.replay is not None and resolved is not None and i not in resolved:
            resolved[i] = result.replay
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
                    name=name,
                    config=config.model_dump(mode="json"),
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
    validation: Callable[[nn.Module], Any] | None = None,
    stats: Any = None,
    num_steps: int | None = None,
    progress: bool = False,
    max_retries: int = 2,
    on_gate_miss: Literal["raise", "warn", "return"] = "raise",
) -> OptimizedDiT:
    """Optimize `model` with `profile` and return a drop-in module.

    `example_inputs` (keyword arguments of one forward call) are required for non-diffusers
    models. `calibration(model)` runs the user's own sampling loop with the model it is given
    and returns the final samples; it is needed when the profile's passes read calibration
    statistics (or pass `stats` from an earlier run). `validation(model)` samples held-out
    seeds for the end-to-end check (default: the calibration function); the budget counts as
    met when the lower confidence bound on their mean PSNR (`budget.psnr_confidence`, default
    0.9) reaches it, so more held-out samples give a tighter bound and a faster result. The
    user's model is never modified.

    When the quality gate still fails after `max_retries` retries, `on_gate_miss` decides:
    "raise" (default) raises `QualityGateError` saying what missed and what to change, with the
    flagged model on its `.optimized`; "warn" returns that model with a `QualityGateWarning`;
    "return" returns it silently (check `optimized.report.passed`).
    """
    if on_gate_miss not in ("raise", "warn", "return"):
        raise DitoptError(f"on_gate_miss={on_gate_miss!r}: use 'raise', 'warn' or 'return'")
    prof = load_profile(profile)
    kwargs = dict(example_inputs) if example_inputs is not None else synthesize_inputs(model)
    kwargs = normalize_call(model, (), kwargs)
    graph = capture(model, kwargs)

    needs = sorted({n for e in prof.passes for n in get_pass(e.name).needs})
    if stats is not None:
        stats.check_graph(graph)
    elif needs:
        if calibration is None:
            raise CalibrationError(
                f"profile {prof.name!r} has passes that need calibration statistics ({', '.join(needs)}); "
                "pass calibration=fn where fn(model) runs your sampling loop with the model it is given "
                "and returns the samples, or stats=... from an earlier calibration"
            )
        from .calibration import calibrate

        stats = calibrate(model, graph, needs, calibration, progress=progress)
    if stats is not None and num_steps is None:
        num_steps = stats.num_steps

    ctx = PassContext(model=model, stats=stats, budget=prof.budget, num_steps=num_steps)
    reference = getattr(stats, "reference_samples", None)
    if calibration is not None and reference is None and prof.budget.min_psnr_db is not None:
        with torch.no_grad():
            reference = calibration(model)
    if calibration is not None and isinstance(reference, torch.Tensor):
        ctx.extras["evaluate"] = _evaluator(model, calibration, reference, num_steps)

    plan_level = any(get_pass(e.name).level == "plan" for e in prof.passes)
    check_end_to_end = plan_level and prof.budget.min_psnr_db is not None and (validation or calibration) is not None
    validation_fn = validation or calibration
    validation_reference = None
    if check_end_to_end:
        with torch.no_grad():
            validation_reference = validation_fn(model) if validation is not None else reference

    attempts: list[dict[str, Any]] = []
    for attempt in range(max_retries + 1):
        records: list[PassRecord] = []
        resolved: dict[int, tuple[str, Any]] = {}
        optimized_graph, rolled_back = apply_passes(
            graph, prof, ctx, verify_with=(model, kwargs), records=records, resolved=resolved
        )
        optimized = _runtime(model, prof, ctx, kwargs, optimized_graph, rolled_back, resolved, num_steps)
        if not check_end_to_end:
            break
        with torch.no_grad():
            end_to_end = verify_end_to_end(validation_fn, validation_reference, optimized, prof.budget.min_psnr_db,
                                           prof.budget.psnr_confidence)
        end_to_end.details.append({"attempt": attempt, "held_out": validation is not None})
        attempts.append(end_to_end.to_dict())
        if end_to_end.passed or attempt == max_retries:
            break
        relaxed = _relax_on_miss(prof, records)
        if relaxed is not None:
            # Missed: first drop the option a pass marked as the one the calibration judges worst.
            prof, change = relaxed
            attempts[-1]["details"].append({"next": "relax", **change})
            continue
        # Missed on held-out inputs: ask the search for the shortfall plus a margin more, and at
        # least for more than the rejected plan measured on the calibration inputs, so that the
        # retry cannot spend a held-out run on that plan again.
        shortfall = prof.budget.min_psnr_db - (end_to_end.psnr_lower_db or 0.0)
        headroom = _search_headroom(records)
        tighten = ctx.extras.get("psnr_tighten_db", 0.0)
        ctx.extras["psnr_tighten_db"] = max(tighten + shortfall + prof.budget.retry_margin_db, tighten + headroom + 1e-3)
        attempts[-1]["details"].append({"next": "tighten", "headroom_db": headroom, "psnr_tighten_db": ctx.extras["psnr_tighten_db"]})

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
    if attempts:
        report.verification.append(attempts[-1])
        report.retries = attempts[:-1]
    optimized.report = report
    optimized.stats = stats
    if not report.passed and on_gate_miss != "return":
        message = describe_gate_failure(report.to_dict())  # a str: the report has a failed check
        if on_gate_miss == "raise":
            raise QualityGateError(message, optimized=optimized)
        warnings.warn(message, QualityGateWarning, stacklevel=2)
    return optimized


def _search_headroom(records: list[PassRecord]) -> float:
    """How far above its PSNR target a budget search's chosen plan measured on the calibration
    inputs (the largest over the applied passes that report both), 0 when none did."""
    gaps = [r.report["predicted_psnr_db"] - r.report["target_psnr_db"] for r in records
            if r.applied and isinstance(r.report.get("predicted_psnr_db"), (int, float))
            and isinstance(r.report.get("target_psnr_db"), (int, float))]
    return max([0.0, *gaps])


def _relax_on_miss(prof: Profile, records: list[PassRecord]) -> tuple[Profile, dict[str, Any]] | None:
    """The profile with the first config change a pass proposed for a held-out miss
    (`report["on_miss"]`, e.g. calibrated_schedule dropping conditional-only steps), or None.
    `records` parallels `prof.passes` (the main apply skips none)."""
    for i, (entry, record) in enumerate(zip(prof.passes, records)):
        change = record.report.get("on_miss") if record.applied else None
        if not change or all(getattr(entry.config, k, None) == v for k, v in change.items()):
            continue
        config = type(entry.config).model_validate({**entry.config.model_dump(), **change})
        passes = list(prof.passes)
        passes[i] = entry.model_copy(update={"config": config})
        return prof.model_copy(update={"passes": tuple(passes)}), {"pass": entry.name, **change}
    return None


def _runtime(model, prof, ctx, kwargs, graph, rolled_back, resolved, num_steps) -> OptimizedDiT:
    def build(call_kwargs: dict[str, Any]) -> DiTGraph:
        replayed, _ = apply_passes(capture(model, call_kwargs), prof, ctx, skip=rolled_back, resolved=dict(resolved))
        return replayed

    return OptimizedDiT(model, build, first=(kwargs, graph), num_steps=num_steps)


def _evaluator(model: nn.Module, sample_fn: Callable, reference: torch.Tensor, num_steps: int | None) -> Callable[[DiTGraph], float]:
    """PSNR of `sample_fn` run with a candidate graph's plan against the reference samples.
    The candidate's plan is moved onto graphs captured at the sampling shape (same segment
    names), so one capture per shape serves every candidate."""
    captured: dict[tuple, DiTGraph] = {}

    def evaluate(candidate: DiTGraph) -> float:
        from .capture import call_key

        def build(call_kwargs: dict[str, Any]) -> DiTGraph:
            key = call_key(call_kwargs)
            if key not in captured:
                captured[key] = capture(model, call_kwargs)
            base = captured[key]
            return base.evolve(plan=candidate.plan)

        runner = OptimizedDiT(model, build, num_steps=num_steps)
        with torch.no_grad():
            samples = sample_fn(runner)
        return psnr(samples, reference)

    return evaluate
