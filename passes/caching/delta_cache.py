"""Δ-DiT: the rear span cached early in sampling, the front span late; split and phase boundary from calibration."""

from __future__ import annotations

import math

from pydantic import Field

from ditopt.errors import CalibrationError
from ditopt.profiles.fields import Int
from ditopt.graph import DiTGraph
from ditopt.registry import PassContext, PassLevel, PassResult, register_pass

from .collector import NAME as RESIDUALS
from .common import STEP_SCHEDULE, CachingConfig, block_names, caching_report, replace_blocks, require_plain
from .schedule import periodic_schedule, span_residual_sketch
from .stage import CachedSpan, StaticSchedule


class DeltaCacheConfig(CachingConfig):
    """Δ-DiT: cache rear blocks early in sampling and front blocks late; split and phase
    boundary chosen from calibration unless given."""

    interval: Int = Field(2, ge=1)
    warmup: Int = Field(2, ge=1)
    order: Int = Field(0, ge=0, le=2)
    split: Int | None = Field(None, ge=1, description="first block of the rear span (default: middle)")
    boundary: Int | None = Field(None, ge=1, description="first step of the late phase (default: from stats)")


@register_pass("delta_cache", DeltaCacheConfig, needs=(RESIDUALS,), level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE, example={})
def delta_cache(graph: DiTGraph, config: DeltaCacheConfig, ctx: PassContext) -> PassResult:
    """Δ-DiT: rear span cached in the early phase, front span in the late phase."""
    require_plain(graph, "delta_cache")
    if ctx.stats is None:
        raise CalibrationError("delta_cache needs calibration statistics (calibration=fn)")
    names = block_names(graph)
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
    report = caching_report([front_stage, rear_stage], graph, steps)
    report.update({"split": split, "boundary": boundary})
    return PassResult(replace_blocks(graph, [front_stage, rear_stage]), True, report)


def _relative_changes(residual) -> list[float]:
    diffs = (residual[:, 1:] - residual[:, :-1]).norm(dim=-1) / residual[:, 1:].norm(dim=-1).clamp_min(1e-12)
    return [math.inf] + diffs.mean(0).tolist()
