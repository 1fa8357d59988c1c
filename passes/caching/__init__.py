"""Feature caching across denoising steps (FORA, Δ-DiT, FirstBlockCache/DBCache, TaylorSeer,
CG-Taylor/FoCa, calibrated static schedules), one pass per module; all of them hand `CachedSpan`
a span policy (stage.SpanPolicy). Importing registers the passes and the calibration collector
"trajectory" (block residual sketches, collector.py) that the calibrated ones need."""

from . import (  # noqa: F401  (each module registers its pass, collector.py its collector)
    calibrated_schedule,
    collector,
    confidence_forecast,
    delta_cache,
    probe_cache,
    residual_cache,
    taylor_forecast,
)
from .stage import CachedSpan, ConfidenceGate, ProbeGate, SpanPolicy, StaticSchedule, TaylorCache

__all__ = ["CachedSpan", "ConfidenceGate", "ProbeGate", "SpanPolicy", "StaticSchedule", "TaylorCache"]
