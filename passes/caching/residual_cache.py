"""FORA / Δ-Cache: reuse (or forecast) a block span's residual on a periodic schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ditopt.profiles.fields import Float, Int
from ditopt.graph import DiTGraph
from ditopt.plan import RunSegments, Stage
from ditopt.registry import PassContext, PassLevel, PassResult, register_pass

from .common import STEP_SCHEDULE, CachingConfig, block_names, block_span, caching_report, replace_blocks, require_plain, steps_and_times
from .schedule import periodic_schedule
from .stage import CachedSpan, StaticSchedule


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
    require_plain(graph, "residual_cache")
    steps, times = steps_and_times(ctx, "residual_cache")
    boundary = int(round(config.phase_boundary * steps))
    phase = {"all": None, "early": (0, boundary), "late": (boundary, steps)}[config.phase]
    mask = periodic_schedule(steps, config.interval, config.warmup, phase)
    span = block_span(graph, config.start, config.end)
    names = block_names(graph)
    stage = CachedSpan(span, StaticSchedule(tuple(mask), times), config.order, key="residual_cache")
    stages: list[Stage] = [RunSegments((n,)) for n in names if names.index(n) < names.index(span[0])]
    stages += [stage] + [RunSegments((n,)) for n in names if names.index(n) > names.index(span[-1])]
    return PassResult(replace_blocks(graph, stages), True, caching_report([stage], graph, steps))
