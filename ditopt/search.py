"""The one budget search every lossy pass plugs into.

A lossy pass exposes its knob as settings ordered from cheapest (most aggressive) to costliest
(gentlest) and a way to build the candidate graph of a setting; the search measures each
candidate's PSNR with the search context's evaluator (final samples on the samples the search
may see) and keeps the cheapest setting that meets the target. `optimize` owns the target (the
profile's budget, plus a pass's margin, plus the tightening after held-out misses), the memo of
measured plans across attempts, and the end-to-end check that confirms the choice on held-out
samples. The caching passes are its first users: `calibrated_schedule` (computed steps per
placement) and the probe-gated caches (threshold).

Several lossy passes in one profile share the budget this way: each runs in profile order on the
graph the earlier ones rewrote, so its evaluator measures the composition, and the last search
decides against the whole budget; the held-out check then judges the composition end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from .errors import CalibrationError


def smallest_passing(lo: int, hi: int, passes: Callable[[int], bool]) -> int | None:
    """Smallest n in [lo, hi] with passes(n), assuming passes is monotone; None if even hi
    fails. Bisection: log2(hi - lo) + 1 measurements."""
    if not passes(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def prefix_ladder(order: list[int]) -> list[list[int]]:
    """The settings "the k best of `order`" (best first), from all of them down to the best one,
    each sorted: the ladder a pass that replaces whole layers bisects over."""
    return [sorted(order[:k]) for k in range(len(order), 0, -1)]


@dataclass
class BudgetSearch:
    """A pass's search against the PSNR budget: the target, memoized measurements, the trials.

    `measure(key, build)` returns the PSNR of `build()` (a candidate graph), measured once per
    `key` for the whole optimize call (retries included); `meets(value)` compares it with the
    target. `trials` lists every measurement this pass asked for (`sampled`: False when the memo
    answered), for the report."""

    name: str
    evaluate: Callable[[Any], float]
    target_psnr_db: float
    memo: dict = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls, ctx: Any, name: str, margin_db: float = 0.0, *, what: str = "") -> "BudgetSearch":
        """The search for pass `name` from its PassContext; CalibrationError (saying what the
        pass needs) when there is no evaluator or no PSNR budget to search against."""
        search = ctx.search
        target = search.target_psnr_db(ctx.budget, margin_db)
        if search.evaluate is None or target is None:
            raise CalibrationError(
                f"{name}{' ' + what if what else ''} searches against the profile's PSNR budget: it needs "
                "budget.min_psnr_db and a calibration function that returns the final samples"
            )
        return cls(name, search.evaluate, target, search.memo(name))

    def measure(self, key: Hashable, build: Callable[[], Any], **trial: Any) -> float:
        seen = key in self.memo
        if not seen:
            self.memo[key] = float(self.evaluate(build()))
        self.trials.append({**trial, "psnr_db": self.memo[key], "sampled": not seen})
        return self.memo[key]

    def meets(self, value: float) -> bool:
        return value >= self.target_psnr_db

    def cheapest(self, settings: list[Any], key: Callable[[Any], Hashable], build: Callable[[Any], Any],
                 describe: Callable[[Any], dict[str, Any]] = lambda s: {"setting": s}) -> Any | None:
        """The first of `settings` (cheapest first, quality rising along the list) whose
        candidate meets the target, by bisection; None when even the last one misses."""
        index = smallest_passing(0, len(settings) - 1, lambda i: self.meets(
            self.measure(key(settings[i]), lambda: build(settings[i]), **describe(settings[i]))))
        return None if index is None else settings[index]
