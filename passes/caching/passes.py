"""The caching passes: each rewrites the plan, replacing block stages with CachedSpan stages."""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Field, model_validator

from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.profiles.fields import Bool, Float, Int, Step, check_steps, check_unique
from ditopt.graph import DiTGraph
from ditopt.plan import RunSegments, Stage
from ditopt.registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, register_pass

# Every caching pass owns the step schedule of the whole block stack: one per profile.
STEP_SCHEDULE = ("step_schedule",)
from ditopt.search import BudgetSearch, smallest_passing

from .schedule import (
    cond_only_placement,
    fit_forecast_weights,
    forecast_errors,
    periodic_schedule,
    quantile_schedule,
    span_residual_sketch,
    step_changes,
    sketch_channels,
    weighted_forecast_errors,
)
from .features import FeatureForecast, NoFeaturesError, add_feature_variants
from .stage import CachedSpan, ConfidenceGate, ProbeGate, StaticSchedule

Auto = Literal["auto"]


class CachingConfig(PassConfig):
    """Base of the caching passes' configs. Each pass rewrites the whole block stack's step
    schedule, so each declares that it ensures and conflicts with STEP_SCHEDULE (one per profile)."""


# --------------------------------------------------------------------------------------------
# Plan surgery shared by the passes
# --------------------------------------------------------------------------------------------
def _block_names(graph: DiTGraph) -> list[str]:
    return [s.name for s in graph.block_segments]


def _plan_blocks_are_plain(graph: DiTGraph) -> bool:
    names = set(_block_names(graph))
    for stage in graph.plan:
        if names & set(stage.segment_names()) and not isinstance(stage, RunSegments):
            return False
    return True


def replace_blocks(graph: DiTGraph, stages: list[Stage]) -> DiTGraph:
    """New plan: prologue stages, `stages` in place of all block stages, epilogue stages."""
    names = set(_block_names(graph))
    before, after, seen_block = [], [], False
    for stage in graph.plan:
        if names & set(stage.segment_names()):
            seen_block = True
            continue
        (after if seen_block else before).append(stage)
    return graph.evolve(plan=tuple(before) + tuple(stages) + tuple(after))


def _require_plain(graph: DiTGraph, name: str) -> None:
    if not _plan_blocks_are_plain(graph):
        raise InvalidProfileError(f"pass {name!r}: the blocks are already cached by an earlier pass; use one caching pass per profile")


def _steps_and_times(ctx: PassContext, name: str) -> tuple[int, tuple[float, ...]]:
    stats = ctx.stats
    if stats is not None:
        return stats.num_steps, tuple(stats.timesteps)
    if ctx.num_steps is None:
        raise CalibrationError(f"pass {name!r} needs the number of sampling steps: pass num_steps=... or calibrate")
    return ctx.num_steps, ()


def _span(graph: DiTGraph, start: int, end: int | None) -> tuple[str, ...]:
    names = _block_names(graph)
    end = len(names) if end is None else end
    if not (0 <= start < end <= len(names)):
        raise InvalidProfileError(f"block span [{start}, {end}) is outside the model's {len(names)} blocks")
    return tuple(names[start:end])


def _report(stages: list[CachedSpan], graph: DiTGraph, steps: int) -> dict[str, Any]:
    """Predicted saving: block evaluations per generation, with and without caching."""
    total = len(_block_names(graph)) * steps
    computed = total
    for st in stages:
        if isinstance(st.policy, StaticSchedule):
            computed -= len(st.blocks) * (steps - sum(st.policy.compute))
    return {
        "stages": [st.describe() for st in stages],
        "block_evaluations": computed,
        "block_evaluations_uncached": total,
        "predicted_block_saving": round(1 - computed / total, 4) if total else 0.0,
    }


# --------------------------------------------------------------------------------------------
# Residual cache (FORA) and Δ-DiT
# --------------------------------------------------------------------------------------------
class ResidualCacheConfig(CachingConfig):
    """Reuse (order 0) or forecast the residual of blocks [start, end) on a periodic schedule."""

    start: Int = Field(0, ge=0)
    end: Int | None = Field(None, ge=1)
    interval: Int = Field(2, ge=1, description="compute every N-th step after warm-up")
    warmup: Int = Field(2, ge=1)
    order: Int = Field(0, ge=0, le=2)
    phase: Literal["all", "early", "late"] = "all"
    phase_boundary: Float = Field(0.5, gt=0, lt=1, description="fraction of steps where 'early' ends")

    @model_validator(mode="after")
    def _span_is_not_empty(self) -> "ResidualCacheConfig":
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"the block span [start, end) = [{self.start}, {self.end}) is empty: end must be greater than start")
        return self


@register_pass("residual_cache", ResidualCacheConfig, level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE, example={})
def residual_cache(graph: DiTGraph, config: ResidualCacheConfig, ctx: PassContext) -> PassResult:
    """FORA / Δ-Cache: reuse a block span's residual on a periodic schedule."""
    _require_plain(graph, "residual_cache")
    steps, times = _steps_and_times(ctx, "residual_cache")
    boundary = int(round(config.phase_boundary * steps))
    phase = {"all": None, "early": (0, boundary), "late": (boundary, steps)}[config.phase]
    mask = periodic_schedule(steps, config.interval, config.warmup, phase)
    span = _span(graph, config.start, config.end)
    names = _block_names(graph)
    stage = CachedSpan(span, StaticSchedule(tuple(mask), times), config.order, key="residual_cache")
    stages: list[Stage] = [RunSegments((n,)) for n in names if names.index(n) < names.index(span[0])]
    stages += [stage] + [RunSegments((n,)) for n in names if names.index(n) > names.index(span[-1])]
    return PassResult(replace_blocks(graph, stages), True, _report([stage], graph, steps))


class DeltaCacheConfig(CachingConfig):
    """Δ-DiT: cache rear blocks early in sampling and front blocks late; split and phase
    boundary chosen from calibration unless given."""

    interval: Int = Field(2, ge=1)
    warmup: Int = Field(2, ge=1)
    order: Int = Field(0, ge=0, le=2)
    split: Int | None = Field(None, ge=1, description="first block of the rear span (default: middle)")
    boundary: Int | None = Field(None, ge=1, description="first step of the late phase (default: from stats)")


@register_pass("delta_cache", DeltaCacheConfig, needs=("trajectory",), level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE, example={})
def delta_cache(graph: DiTGraph, config: DeltaCacheConfig, ctx: PassContext) -> PassResult:
    """Δ-DiT: rear span cached in the early phase, front span in the late phase."""
    _require_plain(graph, "delta_cache")
    if ctx.stats is None:
        raise CalibrationError("delta_cache needs calibration statistics (calibration=fn)")
    names = _block_names(graph)
    if len(names) < 2:
        return PassResult(graph, False, {"skipped": "a single block cannot be split into front and rear spans"})
    split = config.split or len(names) // 2
    steps, times = ctx.stats.num_steps, list(ctx.stats.timesteps)
    boundary = config.boundary
    if boundary is None:
        # Where the front span's residual starts to change less than the rear span's: from
        # there on the front (outline) is settled and can be cached instead of the rear.
        front = _relative_changes(span_residual_sketch(ctx.stats, 0, split - 1))
        rear = _relative_changes(span_residual_sketch(ctx.stats, split, len(names) - 1))
        boundary = next((s for s in range(config.warmup, steps) if front[s] < rear[s]), steps // 2)
    boundary = max(config.warmup, min(boundary, steps - 1))
    rear_mask = periodic_schedule(steps, config.interval, config.warmup, (0, boundary))
    front_mask = periodic_schedule(steps, config.interval, config.warmup, (boundary, steps))
    front_stage = CachedSpan(tuple(names[:split]), StaticSchedule(tuple(front_mask), tuple(times)), config.order, key="delta_front")
    rear_stage = CachedSpan(tuple(names[split:]), StaticSchedule(tuple(rear_mask), tuple(times)), config.order, key="delta_rear")
    report = _report([front_stage, rear_stage], graph, steps)
    report.update({"split": split, "boundary": boundary})
    return PassResult(replace_blocks(graph, [front_stage, rear_stage]), True, report)


def _relative_changes(residual) -> list[float]:
    diffs = (residual[:, 1:] - residual[:, :-1]).norm(dim=-1) / residual[:, 1:].norm(dim=-1).clamp_min(1e-12)
    return [math.inf] + diffs.mean(0).tolist()


# --------------------------------------------------------------------------------------------
# TaylorSeer (periodic forecasting) and the calibrated static schedule
# --------------------------------------------------------------------------------------------
class TaylorForecastConfig(CachingConfig):
    """TaylorSeer: full compute on warm-up steps and every N-th step, Taylor forecast between;
    `target="features"` forecasts each block's pre-gate attention/FFN outputs and recomputes the
    adaLN gate (as the paper), `"residual"` forecasts what the whole block stack adds."""

    order: Int = Field(2, ge=0, le=2)
    interval: Int = Field(4, ge=1)
    warmup: Int = Field(3, ge=1)
    target: Literal["features", "residual"] = "features"


@register_pass("taylor_forecast", TaylorForecastConfig, level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE,
               example={"interval": 2, "warmup": 1})
def taylor_forecast(graph: DiTGraph, config: TaylorForecastConfig, ctx: PassContext) -> PassResult:
    """TaylorSeer: forecast all blocks' residual by Taylor expansion between full steps."""
    _require_plain(graph, "taylor_forecast")
    steps, times = _steps_and_times(ctx, "taylor_forecast")
    mask = periodic_schedule(steps, config.interval, config.warmup)
    try:
        new, stage = forecast_plan(graph, StaticSchedule(tuple(mask), times), config.order, config.target)
    except NoFeaturesError as exc:
        return PassResult(graph, False, {"skipped": str(exc)})
    return PassResult(new, True, _report([stage], graph, steps))


class CalibratedScheduleConfig(CachingConfig):
    """Static schedule chosen from calibration: the fewest computed steps whose sampled PSNR on
    the calibration inputs meets the profile's budget (plus a margin).

    `forecast="fitted"` predicts a skipped step's residual as a weighted sum of the last
    `history` computed residuals, with weights fitted per step (and channel) by least squares on
    the calibration trajectories; `order` is then the Taylor order used when sampling with a
    step count other than the calibrated one. `forecast="taylor"` forecasts with Taylor of
    `order`. `"auto"` (default) searches both: the fit wins on most schedules, Taylor on some
    very sparse ones (it extrapolates what the trajectory does; the fit, what it did)."""

    forecast: Literal["auto", "fitted", "taylor"] = "auto"
    history: Int = Field(3, ge=1, le=4, description="computed steps a fitted forecast combines")
    per_channel: Bool = Field(True, description="fit one weight per channel of the image stream (else one per step)")
    order: Union[Annotated[Int, Field(ge=0, le=2)], Auto] = Field("auto", description="Taylor order 0..2, or 'auto' (taylor: 1 and 2; fitted and auto: 1)")
    computed_steps: Int | None = Field(None, ge=1, description="fix the number of computed steps (no search)")
    compute_steps: tuple[Step, ...] | None = Field(None, description="explicit computed steps (replay): rising, starting with step 0")
    warmup: Union[Annotated[Int, Field(ge=1)], Auto] = Field("auto", description="leading steps always computed, >= 1 (step 0 has nothing to forecast from); 'auto' searches 1, 2 and 3 (2 without a search)")
    alpha: Union[Annotated[Float, Field(ge=0)], Auto] = Field("auto", description="0: even spacing; 1: spacing by residual change; 'auto' searches 0, 0.5 and 1")
    margin_db: Float = Field(1.0, ge=0, description="PSNR margin over the budget on calibration inputs")
    on_mismatch: Literal["rederive", "error"] = "rederive"
    target: Literal["features", "residual"] = "residual"
    # Off by default: on dit-digits a plan with them spends all the headroom, misses the held-out
    # check and the retry drops them (the 45 dB benchmark row then ran out of retries); on
    # flux-digits they gain 1-2 steps' worth at some budgets (docs/design.md).
    cfg_reuse: Literal["auto", "off"] = Field(
        "off", description="'auto': when calibration saw CFG batched into one call, also search steps that compute only the "
        "conditional half of the rows and rebuild the other half (FasterCache's CFG reuse); opt-in: they gain on "
        "flux-digits and cost a retry on dit-digits")
    cond_only_steps: tuple[Annotated[Int, Field(ge=1)], ...] | None = Field(None, description="explicit conditional-only steps (replay); computed steps only, never step 0")
    cfg_delta_order: Literal[0, 1] = Field(1, description="how a conditional-only step rebuilds the unconditional half's "
                                           "difference: 1 extrapolates it linearly from the last two full steps, 0 keeps the last one "
                                           "(FasterCache)")
    span_starts: tuple[Annotated[Int, Field(ge=1)], ...] | None = Field(None, description="first block of each span after the first: every span "
                                                "gets its own computed steps (the front and rear of the stack settle at different times, as Δ-DiT found)")
    span_compute_steps: tuple[tuple[Step, ...], ...] | None = Field(None, description="explicit computed steps per span (replay), "
                                                                   "one tuple per span")
    cond_only_cost: Float = Field(
        0.55, gt=0, le=1, description="time of a conditional-only step relative to a full one, to rank schedules "
        "(a half-batch call took 0.553x / 0.552x of a full one on dit-/flux-digits, 2 CPU threads; "
        "benchmarks/exploration/cfg_reuse_probe.py)")

    @model_validator(mode="after")
    def _spans_are_explicit(self) -> "CalibratedScheduleConfig":
        # Per-span steps are a replay form only (the search computes whole steps: per-span steps
        # lost at equal MACs on both zoo models, docs/design.md); never ignore one half of it.
        if (self.span_starts is None) != (self.span_compute_steps is None):
            raise ValueError("span_starts and span_compute_steps go together (per-span steps are given, not searched)")
        if self.span_starts is not None and (self.compute_steps is not None or self.computed_steps is not None or self.cond_only_steps):
            raise ValueError("span_compute_steps replaces compute_steps / computed_steps / cond_only_steps: give one of them")
        if self.forecast == "fitted" and self.target != "residual":
            raise ValueError("forecast='fitted' forecasts the residual; use target='residual' or forecast='taylor'")
        explicit = "compute_steps" if self.compute_steps is not None else "span_compute_steps" if self.span_compute_steps is not None else None
        if explicit and (self.order == "auto" or self.forecast == "auto"):
            raise ValueError(f"{explicit} replays a schedule: it needs a concrete order (0..2) and forecast ('fitted' or 'taylor'), not 'auto'")
        check_steps("compute_steps", self.compute_steps)
        check_unique("cond_only_steps", self.cond_only_steps)
        if self.cond_only_steps and self.target != "residual":
            raise ValueError("cond_only_steps needs target='residual'")
        if self.cond_only_steps and self.compute_steps is not None and not set(self.cond_only_steps) <= set(self.compute_steps):
            extra = sorted(set(self.cond_only_steps) - set(self.compute_steps))
            raise ValueError(f"cond_only_steps must be computed steps; {extra} are not in compute_steps")
        if self.span_starts is not None:
            if any(b <= a for a, b in zip(self.span_starts, self.span_starts[1:])):
                raise ValueError(f"span_starts = {list(self.span_starts)} must rise strictly (each the first block of the next span)")
            if self.target != "residual":
                raise ValueError("span_compute_steps needs target='residual'")
            if len(self.span_compute_steps or ()) != len(self.span_starts) + 1:
                raise ValueError(f"span_compute_steps needs one tuple per span (a list of steps each): {len(self.span_starts) + 1} "
                                 f"for span_starts = {list(self.span_starts)}, got {len(self.span_compute_steps or ())}")
            for i, chosen in enumerate(self.span_compute_steps or ()):
                check_steps(f"span_compute_steps[{i}]", chosen)
        return self


def forecast_plan(graph: DiTGraph, policy: StaticSchedule, order: int, target: str) -> tuple[DiTGraph, Stage]:
    """All blocks under one static schedule, forecasting either the stack's residual or each
    block's pre-gate features."""
    blocks = tuple(_block_names(graph))
    if target == "features":
        with_variants, features, additive = add_feature_variants(graph, blocks)
        stage: Stage = FeatureForecast(blocks, {k: tuple(v) for k, v in features.items()}, policy, order, additive=additive)
        return replace_blocks(with_variants, [stage]), stage
    stage = CachedSpan(blocks, policy, order, key="schedule")
    return replace_blocks(graph, [stage]), stage


@register_pass("calibrated_schedule", CalibratedScheduleConfig, needs=("trajectory",), level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE,
               example={"computed_steps": 3})
def calibrated_schedule(graph: DiTGraph, config: CalibratedScheduleConfig, ctx: PassContext) -> PassResult:
    """Calibrated static schedule with Taylor forecasting, searched against the PSNR budget."""
    _require_plain(graph, "calibrated_schedule")
    stats = ctx.stats
    if stats is None:
        raise CalibrationError("calibrated_schedule needs calibration statistics (calibration=fn)")
    steps, times = stats.num_steps, tuple(stats.timesteps)
    residual = span_residual_sketch(stats, 0, len(_block_names(graph)) - 1)
    t_axis = [t if not math.isnan(t) else float(i) for i, t in enumerate(times)]

    if config.forecast == "fitted" and config.target != "residual":
        raise InvalidProfileError("calibrated_schedule: forecast='fitted' forecasts the residual; use target='residual' or forecast='taylor'")
    # (forecast, Taylor order) candidates, best first. A fitted forecast uses its order only
    # for step counts other than the calibrated one.
    concrete = None if config.order == "auto" else int(config.order)
    candidates: list[tuple[str, int]] = []
    if config.forecast in ("fitted", "auto") and config.target == "residual":
        candidates.append(("fitted", 1 if concrete is None else concrete))
    if config.forecast in ("taylor", "auto"):
        orders = [concrete] if concrete is not None else ([1] if config.forecast == "auto" else [1, 2])
        candidates += [("taylor", o) for o in orders]

    channels = sketch_channels(stats) if config.per_channel else None
    num_channels = int(stats.meta["stream_shape"][-1]) if channels is not None else None

    fitted: dict[tuple[bool, ...], tuple] = {}  # the chosen mask's weights are not fitted twice

    def policy(forecast: str, mask: list[bool], cond: list[bool] | None = None) -> StaticSchedule:
        weights: tuple = ()
        if forecast == "fitted":
            if tuple(mask) not in fitted:
                fitted[tuple(mask)] = fit_forecast_weights(residual, mask, t_axis, config.history, channels, num_channels)
            weights = fitted[tuple(mask)]
        return StaticSchedule(tuple(mask), times, config.on_mismatch, weights, tuple(cond) if cond and any(cond) else (),
                              config.cfg_delta_order)

    def make(forecast: str, order: int, mask: list[bool], cond: list[bool] | None = None) -> DiTGraph:
        return forecast_plan(graph, policy(forecast, mask, cond), order, config.target)[0]

    def finish(forecast: str, order: int, mask: list[bool], extra: dict[str, Any], cond: list[bool] | None = None) -> PassResult:
        new, stage = forecast_plan(graph, policy(forecast, mask, cond), order, config.target)
        report = _report([stage], graph, steps)
        if forecast == "fitted":
            errors = weighted_forecast_errors(residual, stage.policy.weights, channels)
        else:
            errors = forecast_errors(residual, t_axis, mask, order)
        report["predicted_forecast_error"] = float(errors.mean())
        report["forecast"] = forecast
        report.update(extra)
        cond_steps = tuple(i for i, h in enumerate(cond or ()) if h)
        on_miss = None
        if cond_steps:
            report["cond_only_steps"] = list(cond_steps)
            if config.cfg_reuse == "auto" and not config.cond_only_steps:  # searched, not given
                # The calibration seeds judge conditional-only steps less well than full ones
                # (dit-digits balanced, both chosen at a 31 dB calibration target: 29.3 dB
                # held-out mean with them, 31.2 without): a held-out miss retries without them
                # before it raises the target (benchmarks/exploration/retry_probe.py).
                on_miss = {"cfg_reuse": "off"}
        replay = config.model_copy(update={"forecast": forecast, "order": order, "compute_steps": tuple(i for i, c in enumerate(mask) if c),
                                           "cond_only_steps": cond_steps})
        outcome = PassOutcome(report.get("predicted_psnr_db"), report.get("target_psnr_db"), report["predicted_block_saving"], on_miss)
        return PassResult(new, True, report, replay=("calibrated_schedule", replay), outcome=outcome)

    if config.span_compute_steps is not None:
        return _span_plan(graph, config, stats, candidates, t_axis, channels, num_channels)
    changes = step_changes(residual)
    if config.compute_steps is not None or config.computed_steps is not None:
        if config.compute_steps is not None and (config.order == "auto" or config.forecast == "auto"):
            raise InvalidProfileError("calibrated_schedule: compute_steps needs a concrete order and forecast")
        forecast, order = candidates[0] if config.forecast != "taylor" else candidates[-1]
        if config.compute_steps is not None:
            mask = [i in set(config.compute_steps) for i in range(steps)]
        else:
            warmup = 2 if config.warmup == "auto" else config.warmup
            mask = quantile_schedule(changes, config.computed_steps, warmup, config.alpha if config.alpha != "auto" else 0.0)
        cond = None
        if config.cond_only_steps:
            if config.target != "residual":
                raise InvalidProfileError("calibrated_schedule: cond_only_steps needs target='residual'")
            if not set(config.cond_only_steps) <= {i for i, c in enumerate(mask) if c}:
                raise InvalidProfileError("calibrated_schedule: cond_only_steps must be computed steps")
            cond = [i in set(config.cond_only_steps) for i in range(steps)]
        return finish(forecast, order, mask, {}, cond)

    search = BudgetSearch.start(ctx, "calibrated_schedule", config.margin_db, what="without computed_steps")
    target = search.target_psnr_db
    # Placement variants: where the computed steps go matters as much as how many there are
    # (on flux-digits, 7 computed steps ranged 24.6-34.4 dB over these nine placements).
    alphas = [0.0, 0.5, 1.0] if config.alpha == "auto" else [float(config.alpha)]
    warmups = [2, 1, 3] if config.warmup == "auto" else [int(config.warmup)]
    variants = [(f, o, w, a) for f, o in candidates for w in warmups for a in alphas]
    trials = search.trials

    def psnr_for(variant: tuple[str, int, int, float], k: int, cond_only: int = 0) -> float:
        forecast, order, warmup, alpha = variant
        mask = quantile_schedule(changes, k, warmup, alpha)
        cond = cond_only_placement(mask, warmup, cond_only) if cond_only else None
        key = (forecast, order, config.history, config.per_channel, config.target, tuple(mask)) + ((tuple(cond),) if cond else ())
        return search.measure(key, lambda: make(forecast, order, mask, cond), forecast=forecast, order=order, warmup=warmup,
                              alpha=alpha, computed_steps=k, cond_only=cond_only)

    best_k: int | None = None
    winner: tuple[str, int, int, float] | None = None  # the variant that set best_k
    for variant in variants:
        # Only fewer computed steps than the best so far can win: search below it.
        hi = steps if best_k is None else best_k - 1
        if hi < variant[2] + 1:
            continue
        k = smallest_passing(variant[2] + 1, hi, lambda k, v=variant: search.meets(psnr_for(v, k)))
        if k is not None:
            best_k, winner = k, variant
    if best_k is None or winner is None:
        return PassResult(graph, False, {"skipped": f"no schedule reaches {target:.1f} dB on the calibration inputs", "trials": trials})
    # At the fewest computed steps, the placement (of the winning forecast) with the most
    # headroom: the held-out gate sees other seeds, and a margin there costs nothing here.
    scored = [(psnr_for(v, best_k), -i, v) for i, v in enumerate(variants) if v[:2] == winner[:2] and best_k >= v[2] + 1]
    value, _, chosen = max(scored)
    forecast, order, warmup, alpha = chosen
    k, cond_only = best_k, 0
    extra: dict[str, Any] = {}
    if config.cfg_reuse == "auto" and config.target == "residual" and stats.meta.get("batched_cfg"):
        k, cond_only, value = _search_cond_only(lambda k, c: psnr_for(chosen, k, c), target, chosen[2], best_k, value,
                                                steps, config.cond_only_cost)
        extra["cond_only_cost"] = config.cond_only_cost
    mask = quantile_schedule(changes, k, warmup, alpha)
    cond = cond_only_placement(mask, warmup, cond_only) if cond_only else None
    return finish(forecast, order, mask, {"target_psnr_db": target, "predicted_psnr_db": value, "computed_steps": k,
                                          "warmup": warmup, "alpha": alpha, **extra, "trials": trials}, cond)


def _span_bounds(graph: DiTGraph, starts: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """[(first, last)] block indices of each span, inclusive."""
    n = len(_block_names(graph))
    cuts = [0, *(starts or ()), n]
    if any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise InvalidProfileError(f"calibrated_schedule: span_starts {list(starts or ())} must rise strictly within 1..{n - 1}")
    return [(a, b - 1) for a, b in zip(cuts, cuts[1:])]


def _span_plan(graph: DiTGraph, config: CalibratedScheduleConfig, stats: Any, candidates: list[tuple[str, int]],
               t_axis: list[float], channels: Any, num_channels: int | None) -> PassResult:
    """One CachedSpan per span, each with its own computed steps and fitted forecast weights."""
    spans = _span_bounds(graph, config.span_starts)
    if len(config.span_compute_steps or ()) != len(spans):
        raise InvalidProfileError(f"calibrated_schedule: span_compute_steps needs one tuple per span ({len(spans)})")
    if config.target != "residual" or config.order == "auto" or config.forecast == "auto":
        raise InvalidProfileError("calibrated_schedule: span_compute_steps needs target='residual' and a concrete order and forecast")
    forecast, order = candidates[0] if config.forecast != "taylor" else candidates[-1]
    names, steps, times = _block_names(graph), stats.num_steps, tuple(stats.timesteps)
    stages = []
    for i, ((first, last), chosen) in enumerate(zip(spans, config.span_compute_steps or ())):
        computed = set(chosen)
        mask = [s in computed for s in range(steps)]
        weights: tuple = ()
        if forecast == "fitted":
            weights = fit_forecast_weights(span_residual_sketch(stats, first, last), mask, t_axis, config.history, channels, num_channels)
        policy = StaticSchedule(tuple(mask), times, config.on_mismatch, weights)
        stages.append(CachedSpan(tuple(names[first : last + 1]), policy, order, key=f"schedule_span{i}"))
    report = _report(stages, graph, steps)
    report["forecast"] = forecast
    return PassResult(replace_blocks(graph, stages), True, report, replay=("calibrated_schedule", config))


def _search_cond_only(psnr: Callable[[int, int], float], target: float, warmup: int, best_k: int, best_value: float,
                      steps: int, cost: float) -> tuple[int, int, float]:
    """(computed steps, conditional-only steps among them, calibration PSNR) of the cheapest
    schedule meeting the target, counting a conditional-only step as `cost` of a full one: at
    the fewest computed steps and at one more (a denser schedule with conditional-only steps
    can beat a sparse full one), the most conditional-only steps that still meet the target
    (bisection, PSNR assumed to fall as more steps are conditional-only). One more, not two:
    each count costs a bisection of sampling runs, and on dit-digits at 48 dB two more added
    about two minutes to the search for a schedule 2% cheaper by this count. `psnr(k, c)`: the
    calibration PSNR of k computed steps, c of them conditional-only (memoised by the caller)."""
    best = (float(best_k), best_k, 0, best_value)
    for k in range(best_k, min(best_k + 1, steps) + 1):
        slots = k - min(warmup, k)  # computed steps after the warm-up
        if slots == 0 or k - slots * (1 - cost) >= best[0]:
            continue  # even all of them conditional-only would not be cheaper
        # fewest full steps m (after the warm-up) that still pass: conditional-only = slots - m
        m = smallest_passing(0, slots, lambda m, k=k: psnr(k, slots - m) >= target)
        if m is None:
            continue
        c = slots - m
        price = k - c * (1 - cost)
        if price < best[0]:
            best = (price, k, c, psnr(k, c))
    return best[1], best[2], best[3]


# --------------------------------------------------------------------------------------------
# Probe-gated cache (FirstBlockCache / DBCache) and confidence-gated forecasting
# --------------------------------------------------------------------------------------------
class ProbeCacheConfig(CachingConfig):
    """Compute the first `probe_blocks` blocks every step; skip the rest while the probe's
    relative L1 change since the last full step stays under `threshold` ('auto': calibrated
    against the budget)."""

    probe_blocks: Int = Field(1, ge=1)
    threshold: Union[Annotated[Float, Field(ge=0)], Auto] = Field("auto", description="relative L1 change >= 0, or 'auto'")
    warmup: Int = Field(2, ge=1)
    max_cached: Int = Field(4, ge=1)
    order: Int = Field(0, ge=0, le=2)
    margin_db: Float = Field(1.0, ge=0)


class ConfidenceForecastConfig(CachingConfig):
    """Compute block 0 every step and compare it with its own Taylor forecast; forecast the rest
    while the relative error stays under `threshold` ('auto': calibrated against the budget)."""

    threshold: Union[Annotated[Float, Field(ge=0)], Auto] = Field("auto", description="relative error >= 0, or 'auto'")
    order: Int = Field(2, ge=1, le=2)
    warmup: Int = Field(3, ge=1)
    max_cached: Int = Field(6, ge=1)
    margin_db: Float = Field(1.0, ge=0)


def _gated(graph: DiTGraph, probe_blocks: int, policy: Any, order: int, key: str) -> tuple[DiTGraph, CachedSpan]:
    names = _block_names(graph)
    stage = CachedSpan(tuple(names[probe_blocks:]), policy, order, probe=tuple(names[:probe_blocks]), key=key)
    return replace_blocks(graph, [stage]), stage


def _threshold_search(make_graph, ctx: PassContext, margin_db: float, name: str) -> tuple[float, dict[str, Any], PassOutcome]:
    """Largest threshold (on a log grid) whose sampled PSNR on the calibration inputs meets the budget."""
    search = BudgetSearch.start(ctx, name, margin_db, what="with threshold='auto'")
    grid = [0.005 * (2 ** (i / 2)) for i in range(13)]  # 0.005 .. 0.32
    # Cheapest first: the largest threshold skips the most.
    found = search.cheapest(grid[::-1], key=lambda t: t, build=make_graph, describe=lambda t: {"threshold": t})
    chosen = grid[0] if found is None else found
    predicted = search.memo.get(chosen)
    report = {"target_psnr_db": search.target_psnr_db, "trials": search.trials, "threshold_met_budget": found is not None}
    return chosen, report, PassOutcome(predicted, search.target_psnr_db)


@register_pass("probe_cache", ProbeCacheConfig, level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE, example={"threshold": 0.1})
def probe_cache(graph: DiTGraph, config: ProbeCacheConfig, ctx: PassContext) -> PassResult:
    """FirstBlockCache / DBCache: probe-gated reuse of the blocks after the probe."""
    _require_plain(graph, "probe_cache")
    if config.probe_blocks >= len(graph.block_segments):
        return PassResult(graph, False, {"skipped": "the probe would cover every block"})

    def make(threshold: float) -> DiTGraph:
        return _gated(graph, config.probe_blocks, ProbeGate(threshold, config.warmup, config.max_cached), config.order, "probe")[0]

    extra: dict[str, Any] = {}
    outcome = None
    threshold = config.threshold
    if threshold == "auto":
        threshold, extra, outcome = _threshold_search(make, ctx, config.margin_db, "probe_cache")
    new, stage = _gated(graph, config.probe_blocks, ProbeGate(float(threshold), config.warmup, config.max_cached), config.order, "probe")
    replay = config.model_copy(update={"threshold": float(threshold)})
    return PassResult(new, True, {"stages": [stage.describe()], **extra}, replay=("probe_cache", replay), outcome=outcome)


@register_pass("confidence_forecast", ConfidenceForecastConfig, level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE,
               example={"threshold": 0.1})
def confidence_forecast(graph: DiTGraph, config: ConfidenceForecastConfig, ctx: PassContext) -> PassResult:
    """CG-Taylor / FoCa: forecast the rest only while block 0 agrees with its own forecast."""
    _require_plain(graph, "confidence_forecast")
    if len(graph.block_segments) < 2:
        return PassResult(graph, False, {"skipped": "needs at least two blocks"})

    def make(threshold: float) -> DiTGraph:
        return _gated(graph, 1, ConfidenceGate(threshold, config.warmup, config.max_cached), config.order, "confidence")[0]

    extra: dict[str, Any] = {}
    outcome = None
    threshold = config.threshold
    if threshold == "auto":
        threshold, extra, outcome = _threshold_search(make, ctx, config.margin_db, "confidence_forecast")
    new, stage = _gated(graph, 1, ConfidenceGate(float(threshold), config.warmup, config.max_cached), config.order, "confidence")
    replay = config.model_copy(update={"threshold": float(threshold)})
    return PassResult(new, True, {"stages": [stage.describe()], **extra}, replay=("confidence_forecast", replay), outcome=outcome)
