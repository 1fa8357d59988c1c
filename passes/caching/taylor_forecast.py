"""TaylorSeer: full compute on warm-up steps and every N-th step, Taylor forecast between."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ditopt.profiles.fields import Int
from ditopt.graph import DiTGraph
from ditopt.registry import PassContext, PassLevel, PassResult, register_pass

from .common import STEP_SCHEDULE, CachingConfig, caching_report, forecast_plan, require_plain, steps_and_times
from .features import NoFeaturesError
from .schedule import periodic_schedule
from .stage import StaticSchedule


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
    require_plain(graph, "taylor_forecast")
    steps, times = steps_and_times(ctx, "taylor_forecast")
    mask = periodic_schedule(steps, config.interval, config.warmup)
    try:
        new, stage = forecast_plan(graph, StaticSchedule(tuple(mask), times), config.order, config.target)
    except NoFeaturesError as exc:
        return PassResult(graph, False, {"skipped": str(exc)})
    return PassResult(new, True, caching_report([stage], graph, steps))
