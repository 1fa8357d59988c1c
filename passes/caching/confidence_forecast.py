"""CG-Taylor / FoCa: block 0 computes every step and is compared with its own forecast; the rest
is forecast while they agree."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from ditopt.profiles.fields import Float, Int
from ditopt.graph import DiTGraph
from ditopt.registry import PassContext, PassLevel, PassResult, register_pass

from .common import (STEP_SCHEDULE, Auto, CachingConfig, gated_plan,
                     require_plain, threshold_search)
from .stage import ConfidenceGate


class ConfidenceForecastConfig(CachingConfig):
    """Compute block 0 every step and compare it with its own Taylor forecast; forecast the rest
    while the relative error stays under `threshold` ('auto': calibrated against the budget)."""

    threshold: Union[Annotated[Float, Field(ge=0)], Auto] = Field("auto", description="relative error >= 0, or 'auto'")
    order: Int = Field(2, ge=1, le=2)
    warmup: Int = Field(3, ge=1)
    max_cached: Int = Field(6, ge=1)
    margin_db: Float = Field(1.0, ge=0)


@register_pass("confidence_forecast", ConfidenceForecastConfig, level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE,
               example={"threshold": 0.1})
def confidence_forecast(graph: DiTGraph, config: ConfidenceForecastConfig, ctx: PassContext) -> PassResult:
    """CG-Taylor / FoCa: forecast the rest only while block 0 agrees with its own forecast."""
    require_plain(graph, "confidence_forecast")
    if len(graph.block_segments) < 2:
        return PassResult(graph, False, {"skipped": "needs at least two blocks"})

    def make(threshold: float) -> DiTGraph:
        return gated_plan(graph, 1, ConfidenceGate(threshold, config.warmup, config.max_cached), config.order, "confidence")[0]

    extra: dict[str, Any] = {}
    outcome = None
    threshold = config.threshold
    if threshold == "auto":
        threshold, extra, outcome = threshold_search(make, ctx, config.margin_db, "confidence_forecast")
    new, stage = gated_plan(graph, 1, ConfidenceGate(float(threshold), config.warmup, config.max_cached), config.order, "confidence")
    replay = config.model_copy(update={"threshold": float(threshold)})
    return PassResult(new, True, {"stages": [stage.describe()], **extra}, replay=("confidence_forecast", replay), outcome=outcome)
