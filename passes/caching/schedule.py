"""Choosing which steps compute, from calibration statistics.

The calibration run recorded a fixed random sketch of every block's residual at every step
(collector "trajectory", `collector.py`).
From it: how fast the residual moves at each step (computed steps are spaced evenly in
cumulative change), and the teacher-forced forecast error of any schedule (reported as a
prediction). The budget search then bisects on the number of computed steps with end-to-end
sampling on the calibration inputs.

A greedy placement (add the step with the largest offline forecast error) was tried first and
dropped: it produced isolated adjacent computed pairs whose finite differences are noisy, and
measured PSNR with Taylor order 1-2 came out far below evenly spaced schedules.
"""

from __future__ import annotations

import math

import torch

from ditopt.calibration import CalibStats

from .collector import NAME, residual_meta


def span_residual_sketch(stats: CalibStats, first: int, last: int) -> torch.Tensor:
    """[trajectories, steps, sketch] residual of blocks first..last (inclusive)."""
    res = stats.require("block_residual_sketch", NAME).float()
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


# Fitted forecast weights, per skipped step: one entry per history step (most recent first),
# each a tuple of per-channel weights (length 1: one weight for every element).
StepWeights = tuple[tuple[float, ...], ...]


def sketch_channels(stats: CalibStats) -> torch.Tensor | None:
    """Channel (last dimension of the image stream) of each sketch column, or None when the
    stats do not say which elements were sketched."""
    index = stats.tensors.get("sketch_index")
    shape = residual_meta(stats).get("stream_shape") or []
    if index is None or len(shape) < 2:
        return None
    return index.long() % int(shape[-1])


def fit_forecast_weights(
    residual: torch.Tensor,
    compute: list[bool],
    times: list[float],
    history: int,
    channels: torch.Tensor | None = None,
    num_channels: int | None = None,
    ridge: float = 1e-3,
) -> tuple[StepWeights, ...]:
    """Per skipped step s, the weights w (most recent first) on the last `history` computed
    residuals that minimise sum ||sum_j w_j R[c_j] - R[s]||^2 over the calibration trajectories
    (residual: [traj, steps, k] sketches, teacher-forced).

    With `channels` (the channel of each sketch column) the weights are fitted per channel: a
    DiT block's output is scaled per channel by a timestep-dependent adaLN gate, which one
    weight per step cannot follow. A small ridge pulls w toward the order-1 Taylor weights
    rather than toward 0: neighbouring residuals are nearly collinear, and shrinking toward 0
    would shrink the forecast itself. () on computed steps."""
    from .stage import taylor_weights

    data = residual.double()
    k = data.shape[-1]
    group = torch.zeros(k, dtype=torch.long) if channels is None else channels.long()
    groups = num_channels or int(group.max()) + 1
    out: list[StepWeights] = []
    computed: list[int] = []
    for s in range(len(compute)):
        if compute[s] or not computed:
            computed.append(s)
            out.append(())
            continue
        hist = computed[-history:][::-1]
        m = len(hist)
        a = data[:, hist]  # [traj, m, k]
        # Per-group normal equations: sum over trajectories, then over the group's columns.
        gram = torch.zeros(groups, m, m, dtype=torch.float64).index_add_(0, group, torch.einsum("nik,njk->kij", a, a))
        rhs = torch.zeros(groups, m, dtype=torch.float64).index_add_(0, group, torch.einsum("nik,nk->ki", a, data[:, s]))
        prior = torch.zeros(m, dtype=torch.float64)
        last_two = hist[:2]
        prior[: len(last_two)] = torch.tensor(taylor_weights([times[c] for c in reversed(last_two)], times[s], len(last_two) - 1))
        lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)  # [groups]
        eye = torch.eye(m, dtype=torch.float64)
        w = torch.linalg.solve(gram + lam[:, None, None] * eye, rhs + lam[:, None] * prior)  # [groups, m]
        out.append(tuple(tuple(float(x) for x in w[:, j]) for j in range(m)))
    return tuple(out)


def weighted_forecast_errors(residual: torch.Tensor, weights: tuple[StepWeights, ...], channels: torch.Tensor | None = None) -> torch.Tensor:
    """Like `forecast_errors`, for fitted weights (teacher-forced, per step, 0 on computed steps)."""
    errors = torch.zeros(residual.shape[1])
    computed: list[int] = []
    for s, w in enumerate(weights):
        if not w:
            computed.append(s)
            continue
        hist = computed[-len(w):][::-1]
        pred = torch.zeros_like(residual[:, s])
        for wj, c in zip(w, hist):
            per_column = torch.tensor(wj, dtype=residual.dtype)[channels] if len(wj) > 1 else wj[0]
            pred += per_column * residual[:, c]
        true = residual[:, s]
        errors[s] = float(((pred - true).norm(dim=-1) / true.norm(dim=-1).clamp_min(1e-12)).mean())
    return errors


def step_changes(residual: torch.Tensor) -> list[float]:
    """Mean relative change of the residual from the previous step (step 0: the largest seen)."""
    diffs = (residual[:, 1:] - residual[:, :-1]).norm(dim=-1) / residual[:, 1:].norm(dim=-1).clamp_min(1e-12)
    changes = diffs.mean(0).tolist()
    return [max(changes, default=1.0)] + changes


def quantile_schedule(changes: list[float], computed: int, warmup: int, alpha: float) -> list[bool]:
    """Computed steps spaced evenly in cumulative change^alpha: alpha 0 is a uniform interval,
    alpha 1 computes more often where the residual moves fast. Even spacing keeps Taylor
    finite differences well conditioned (an isolated pair of adjacent computed steps does not)."""
    steps = len(changes)
    computed = max(1, min(computed, steps))
    warmup = min(warmup, computed)
    mask = [s < warmup for s in range(steps)]
    remaining = computed - warmup
    if remaining <= 0:
        return mask
    weights = [max(c, 1e-6) ** alpha for c in changes[warmup:]]
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        cumulative.append(acc / total)
        acc += w
    for j in range(remaining):
        target = j / remaining
        s = warmup + next(i for i, c in enumerate(cumulative + [2.0]) if c >= target - 1e-12)
        while s < steps and mask[s]:
            s += 1
        if s >= steps:
            s = next(i for i in range(steps) if not mask[i])
        mask[s] = True
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


def cond_only_placement(mask: list[bool], warmup: int, count: int) -> list[bool]:
    """Mark `count` computed steps after the warm-up as conditional-only (CFG reuse), latest
    first and every other one before any two in a row: the rebuilt rows lean on the difference
    kept at the last full step, which ages across consecutive conditional-only steps, and late
    steps tolerate it best (dit-digits, every step computed, held-out mean PSNR: every other
    step of the last half conditional-only 54.2 dB, every other step from the start 43.4 dB;
    benchmarks/exploration/cfg_reuse_probe.py)."""
    late = [i for i, c in enumerate(mask) if c and i >= warmup][::-1]
    order = late[0::2] + late[1::2]
    chosen = set(order[:count])
    return [i in chosen for i in range(len(mask))]
