"""What the caching passes share: the step-schedule capability they all claim, the config base,
plan surgery (the block stages replaced by cached spans), the saving report, and the probe-gated
plans with their threshold search."""

from __future__ import annotations

from typing import Any, Literal

from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.graph import DiTGraph
from ditopt.plan import RunSegments, Stage
from ditopt.registry import PassConfig, PassContext, PassOutcome, PassResult
from ditopt.search import BudgetSearch

from .features import FeatureForecast, add_feature_variants
from .stage import CachedSpan, GatedPolicy, SpanPolicy

# Every caching pass owns the step schedule of the whole block stack: one per profile.
STEP_SCHEDULE = ("step_schedule",)

Auto = Literal["auto"]


class CachingConfig(PassConfig):
    """Base of the caching passes' configs. Each pass rewrites the whole block stack's step
    schedule, so each declares that it ensures and conflicts with STEP_SCHEDULE (one per profile)."""


def block_names(graph: DiTGraph) -> list[str]:
    return [s.name for s in graph.block_segments]


def plan_blocks_are_plain(graph: DiTGraph) -> bool:
    names = set(block_names(graph))
    for stage in graph.plan:
        if names & set(stage.segment_names()) and not isinstance(stage, RunSegments):
            return False
    return True


def replace_blocks(graph: DiTGraph, stages: list[Stage]) -> DiTGraph:
    """New plan: prologue stages, `stages` in place of all block stages, epilogue stages."""
    names = set(block_names(graph))
    before, after, seen_block = [], [], False
    for stage in graph.plan:
        if names & set(stage.segment_names()):
            seen_block = True
            continue
        (after if seen_block else before).append(stage)
    return graph.evolve(plan=tuple(before) + tuple(stages) + tuple(after))


def require_plain(graph: DiTGraph, name: str) -> None:
    if not plan_blocks_are_plain(graph):
        raise InvalidProfileError(f"pass {name!r}: the blocks are already cached by an earlier pass; use one caching pass per profile")


def steps_and_times(ctx: PassContext, name: str) -> tuple[int, tuple[float, ...]]:
    stats = ctx.stats
    if stats is not None:
        return stats.num_steps, tuple(stats.timesteps)
    if ctx.num_steps is None:
        raise CalibrationError(f"pass {name!r} needs the number of sampling steps: pass num_steps=... or calibrate")
    return ctx.num_steps, ()


def block_span(graph: DiTGraph, start: int, end: int | None) -> tuple[str, ...]:
    names = block_names(graph)
    end = len(names) if end is None else end
    if not (0 <= start < end <= len(names)):
        raise InvalidProfileError(f"block span [{start}, {end}) is outside the model's {len(names)} blocks")
    return tuple(names[start:end])


def caching_report(stages: list[CachedSpan], graph: DiTGraph, steps: int) -> dict[str, Any]:
    """Predicted saving: block evaluations per generation, with and without caching."""
    total = len(block_names(graph)) * steps
    computed = total
    for st in stages:
        fixed = st.policy.computed_steps()  # None for gates: their saving depends on the run
        if fixed is not None:
            computed -= len(st.blocks) * (steps - fixed)
    return {
        "stages": [st.describe() for st in stages],
        "block_evaluations": computed,
        "block_evaluations_uncached": total,
        "predicted_block_saving": round(1 - computed / total, 4) if total else 0.0,
    }


def forecast_plan(graph: DiTGraph, policy: SpanPolicy, order: int, target: str) -> tuple[DiTGraph, Stage]:
    """All blocks under one static schedule, forecasting either the stack's residual or each
    block's pre-gate features."""
    blocks = tuple(block_names(graph))
    if target == "features":
        with_variants, features, additive = add_feature_variants(graph, blocks)
        stage: Stage = FeatureForecast(blocks, {k: tuple(v) for k, v in features.items()}, policy, order, additive=additive)
        return replace_blocks(with_variants, [stage]), stage
    stage = CachedSpan(blocks, policy, order, key="schedule")
    return replace_blocks(graph, [stage]), stage


def gated_plan(graph: DiTGraph, probe_blocks: int, policy: SpanPolicy, order: int, key: str) -> tuple[DiTGraph, CachedSpan]:
    names = block_names(graph)
    stage = CachedSpan(tuple(names[probe_blocks:]), policy, order, probe=tuple(names[:probe_blocks]), key=key)
    return replace_blocks(graph, [stage]), stage


def threshold_search(make_graph, ctx: PassContext, margin_db: float, name: str) -> tuple[float, dict[str, Any], PassOutcome]:
    """Largest threshold (on a log grid) whose sampled PSNR on the calibration inputs meets the budget."""
    search = BudgetSearch.start(ctx, name, margin_db, what="with threshold='auto'")
    grid = [0.005 * (2 ** (i / 2)) for i in range(13)]  # 0.005 .. 0.32
    # Cheapest first: the largest threshold skips the most.
    found = search.cheapest(grid[::-1], key=lambda t: t, build=make_graph, describe=lambda t: {"threshold": t})
    chosen = grid[0] if found is None else found
    predicted = search.memo.get(chosen)
    report = {"target_psnr_db": search.target_psnr_db, "trials": search.trials, "threshold_met_budget": found is not None}
    return chosen, report, PassOutcome(predicted, search.target_psnr_db)


def gated_cache(graph: DiTGraph, config: Any, ctx: PassContext, name: str, gate: type[GatedPolicy], probe_blocks: int,
                key: str) -> PassResult:
    """The probe-gated passes (probe_cache, confidence_forecast): blocks after the first
    `probe_blocks` under `gate`, its threshold given or ('auto') searched against the budget."""

    def make(threshold: float) -> DiTGraph:
        return gated_plan(graph, probe_blocks, gate(threshold, config.warmup, config.max_cached), config.order, key)[0]

    extra: dict[str, Any] = {}
    outcome = None
    threshold = config.threshold
    if threshold == "auto":
        threshold, extra, outcome = threshold_search(make, ctx, config.margin_db, name)
    new, stage = gated_plan(graph, probe_blocks, gate(float(threshold), config.warmup, config.max_cached), config.order, key)
    replay = config.model_copy(update={"threshold": float(threshold)})
    return PassResult(new, True, {"stages": [stage.describe()], **extra}, replay=(name, replay), outcome=outcome)
