"""Feature caching across denoising steps (FORA, Δ-DiT, FirstBlockCache/DBCache, TaylorSeer,
CG-Taylor/FoCa, calibrated static schedules). Importing registers the passes."""

from . import passes  # noqa: F401  (registers the passes)
from .stage import CachedSpan, ConfidenceGate, ProbeGate, StaticSchedule, TaylorCache

__all__ = ["CachedSpan", "ConfidenceGate", "ProbeGate", "StaticSchedule", "TaylorCache"]
