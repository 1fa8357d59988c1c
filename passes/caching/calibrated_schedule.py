"""The calibrated static schedule: the fewest computed steps (and their placement, forecast and
conditional-only steps) whose sampled PSNR meets the budget, searched with the one budget search."""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Field, model_validator

from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.profiles.fields import Bool, Float, Int, Step, check_steps, check_unique
from ditopt.graph import DiTGraph
from ditopt.registry import PassContext, PassLevel, PassOutcome, PassResult, register_pass
from ditopt.search import BudgetSearch, smallest_passing

from .collector import NAME as RESIDUALS, residual_meta
from .common import STEP_SCHEDULE, Auto, CachingConfig, block_names, caching_report, forecast_plan, replace_blocks, require_plain
from .schedule import (cond_only_placement, fit_forecast_weights, forecast_errors, quantile_schedule,
                       span_residual_sketch, step_changes, sketch_channels, weighted_forecast_errors)
from .stage import CachedSpan, StaticSchedule


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


@register_pass("calibrated_schedule", CalibratedScheduleConfig, needs=(RESIDUALS,), level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE,
               example={"computed_steps": 3})
def calibrated_schedule(graph: DiTGraph, config: CalibratedScheduleConfig, ctx: PassContext) -> PassResult:
    """Calibrated static schedule with Taylor forecasting, searched against the PSNR budget."""
    require_plain(graph, "calibrated_schedule")
    stats = ctx.stats
    if stats is None:
        raise CalibrationError("calibrated_schedule needs calibration statistics (calibration=fn)")
    steps, times = stats.num_steps, tuple(stats.timesteps)
    residual = span_residual_sketch(stats, 0, len(block_names(graph)) - 1)
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
    num_channels = int(residual_meta(stats)["stream_shape"][-1]) if channels is not None else None

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
        report = caching_report([stage], graph, steps)
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
    n = len(block_names(graph))
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
    names, steps, times = block_names(graph), stats.num_steps, tuple(stats.timesteps)
    stages = []
    for i, ((first, last), chosen) in enumerate(zip(spans, config.span_compute_steps or ())):
        computed = set(chosen)
        mask = [s in computed for s in range(steps)]
        weights: tuple = ()
        if forecast == "fitted":
            weights = fit_forecast_weights(span_residual_sketch(stats, first, last), mask, t_axis, config.history, channels, num_channels)
        policy = StaticSchedule(tuple(mask), times, config.on_mismatch, weights)
        stages.append(CachedSpan(tuple(names[first : last + 1]), policy, order, key=f"schedule_span{i}"))
    report = caching_report(stages, graph, steps)
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
