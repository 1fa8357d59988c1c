"""Choosing which steps compute, from calibration statistics.

The calibration run recorded a fixed random sketch of every block's residual at every step, so
the error of forecasting a span's residual from any set of computed steps can be simulated
offline (teacher-forced): no extra model call. A greedy pass adds, one at a time, the step
whose forecast error is largest; the budget search then bisects on the number of computed
steps with end-to-end sampling on the calibration inputs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ditopt.calibration import CalibStats


def span_residual_sketch(stats: CalibStats, first: int, last: int) -> torch.Tensor:
    """[trajectories, steps, sketch] residual of blocks first..last (inclusive)."""
    res = stats.require("block_residual_sketch").float()
    return res[:, :, first : last + 1].sum(dim=2)


def forecast_errors(residual: torch.Tensor, times: list[float], compute: list[bool], order: int) -> torch.Tensor:
    """Relative L2 error per step of forecasting `residual` from the computed steps
    (0 on computed steps), averaged over trajectories. residual: [traj, steps, k]."""
    steps = residual.shape[1]
    errors = torch.zeros(steps)
    factors: list[torch.Tensor] = []
    t_last: float | None = None
    for s in range(steps):
        if compute[s] or t_last is None:
            new = [residual[:, s]]
            if factors and t_last is not None and times[s] != t_last:
                dt = times[s] - t_last
                for i in range(min(order, len(factors))):
                    new.append((new[i] - factors[i]) / dt)
            factors, t_last = new, times[s]
            continue
        dt = times[s] - t_last
        pred = factors[0].clone()
        for i in range(1, len(factors)):
            pred += factors[i] * (dt**i / math.factorial(i))
        true = residual[:, s]
        errors[s] = float(((pred - true).norm(dim=-1) / true.norm(dim=-1).clamp_min(1e-12)).mean())
    return errors


def greedy_schedule(residual: torch.Tensor, times: list[float], computed: int, order: int, warmup: int = 1) -> list[bool]:
    """Computed-step mask with `computed` True entries: warm-up steps, then repeatedly the step
    with the largest forecast error."""
    steps = residual.shape[1]
    computed = max(1, min(computed, steps))
    mask = [s < min(warmup, computed) for s in range(steps)]
    while sum(mask) < computed:
        errors = forecast_errors(residual, times, mask, order)
        worst = int(errors.argmax())
        if errors[worst] <= 0:
            break
        mask[worst] = True
    return mask


def periodic_schedule(steps: int, interval: int, warmup: int, phase: tuple[int, int] | None = None) -> list[bool]:
    """Compute the warm-up steps, then every `interval`-th step; outside `phase` (start, stop)
    every step computes."""
    mask = []
    for s in range(steps):
        if s < warmup:
            mask.append(True)
        elif phase is not None and not (phase[0] <= s < phase[1]):
            mask.append(True)
        else:
            mask.append((s - warmup + 1) % interval == 0)
    return mask


def smallest_passing(lo: int, hi: int, passes: Callable[[int], bool]) -> int | None:
    """Smallest n in [lo, hi] with passes(n), assuming monotone; None if even hi fails."""
    if not passes(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
