"""CG-Taylor / FoCa: block 0 computes every step and is compared with its own forecast; the rest
is forecast while they agree."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ditopt.profiles.fields import Float, Int
from ditopt.graph import DiTGraph
from ditopt.registry import PassContext, PassLevel, PassResult, register_pass

from .common import STEP_SCHEDULE, Auto, CachingConfig, gated_cache, require_plain
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
    return gated_cache(graph, config, ctx, "confidence_forecast", ConfidenceGate, 1, "confidence")
