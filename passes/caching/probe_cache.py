"""FirstBlockCache / DBCache: the probe blocks compute every step; the rest is reused while the
probe's output changes little."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ditopt.profiles.fields import Float, Int
from ditopt.graph import DiTGraph
from ditopt.registry import PassContext, PassLevel, PassResult, register_pass

from .common import STEP_SCHEDULE, Auto, CachingConfig, gated_cache, require_plain
from .stage import ProbeGate


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


@register_pass("probe_cache", ProbeCacheConfig, level=PassLevel.PLAN, lossy=True, ensures=STEP_SCHEDULE, conflicts=STEP_SCHEDULE, example={"threshold": 0.1})
def probe_cache(graph: DiTGraph, config: ProbeCacheConfig, ctx: PassContext) -> PassResult:
    """FirstBlockCache / DBCache: probe-gated reuse of the blocks after the probe."""
    require_plain(graph, "probe_cache")
    if config.probe_blocks >= len(graph.block_segments):
        return PassResult(graph, False, {"skipped": "the probe would cover every block"})
    return gated_cache(graph, config, ctx, "probe_cache", ProbeGate, config.probe_blocks, "probe")
