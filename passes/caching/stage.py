"""Feature caching across denoising steps: reuse or forecast what a run of blocks adds.

One stage, `CachedSpan`, replaces a contiguous run of block stages in the plan. On a step it
either computes the blocks (and refreshes its cache) or predicts their effect:

    out = in + R̂(t)          for each stream the span updates (image, and text in MMDiT),

where R̂ is the span's residual from the last computed step (order 0: FORA, Δ-DiT, DBCache),
a Taylor forecast from the last computed steps' finite differences in the timestep (TaylorSeer
orders 1 and 2), or, for a calibrated schedule, a linear combination of the last computed
residuals with per-step weights fitted on the calibration trajectories (`StaticSchedule.weights`;
Taylor is one such combination, so the fit can only match or beat it on those trajectories).
Which steps compute is decided on the host, between segments:

* `StaticSchedule`: a fixed per-step mask (calibrated or periodic); no probe at all, so it is
  what exported engines run. Sampling with another step count re-derives the mask from the
  calibrated timesteps, or fails with a clear error.
* `ProbeGate` (FirstBlockCache / DBCache): the first `probe` blocks always compute; the rest is
  skipped while the probe residual's relative L1 change since the last full step stays under
  a threshold.
* `ConfidenceGate` (CG-Taylor / FoCa): the first block always computes and is compared with its
  own forecast; the rest is forecast only while that error stays under a threshold.

A `StaticSchedule` may also mark computed steps `cond_only` (FasterCache's CFG reuse): with
CFG batched into one call (first half of the rows unconditional, second half conditional, the
same latents in both), the span computes only the second half and rebuilds the first:

    R_first(t) = R_second(t) + D(t),   D = R_first - R_second,

where D(t) extrapolates linearly in the timestep from the last two full steps (order 1; one
full step so far, or order 0 as FasterCache does: D of the last full step). On both zoo models
the extrapolated difference reads 4-14 dB higher than the frozen one at the same steps
(benchmarks/exploration/cfg_delta_extrapolation.py). The span runs on the program the runtime
captures for the half batch (`StepContext.second_half`). A call whose halves do not hold the
same latents, or whose half program reads other shapes, computes in full instead (and says so
in the call record): the mask never changes what a call means.

All cross-step values live in `ctx.state`, which the runtime keeps per CFG branch and clears per
generation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch

from ditopt.calibration.streams import SpanIO, span_io, value_shapes
from ditopt.errors import CalibrationError
from ditopt.graph import DiTGraph, latent_halves_equal
from ditopt.plan import RunSegments, Stage, StageSpec, StepContext, register_stage_loader


# --------------------------------------------------------------------------------------------
# Taylor forecasting
# --------------------------------------------------------------------------------------------
class TaylorCache:
    """Finite-difference Taylor factors of a list of tensors, in timestep units.

    The i-th derivative estimate is kept as ``diffs[i] * scales[i]``: each finite difference is
    one fused ``sub`` whose scalar factor is carried on the host, and a forecast is ``order``
    fused ``add``s. At the widths of the zoo models these elementwise passes over the cached
    features, not the matmuls skipped, bound what a forecast step costs (a divide per
    difference and a clone per forecast were a third of the forecasting rows' time)."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.diffs: list[list[torch.Tensor]] = []  # diffs[0]: the values; diffs[i]: scaled i-th differences
        self.scales: list[float] = []  # derivative i = diffs[i] * scales[i]
        self.t: float | None = None

    def update(self, values: list[torch.Tensor], t: float) -> None:
        diffs, scales = [list(values)], [1.0]
        if self.diffs and self.t is not None and t != self.t:
            dt = t - self.t
            for i in range(min(self.order, len(self.diffs))):
                # (new_i * s_new - old_i * s_old) / dt  ==  (new_i - old_i * s_old / s_new) * (s_new / dt)
                ratio = self.scales[i] / scales[i]
                diffs.append([torch.sub(a, b, alpha=ratio) for a, b in zip(diffs[i], self.diffs[i])])
                scales.append(scales[i] / dt)
        self.diffs, self.scales, self.t = diffs, scales, t

    @property
    def factors(self) -> list[list[torch.Tensor]]:
        """The derivative estimates themselves (for inspection and tests; allocates)."""
        return [[d * s for d in ds] for ds, s in zip(self.diffs, self.scales)]

    def coefficients(self, t: float) -> list[float]:
        """The forecast at ``t`` is ``sum_i coefficients[i] * diffs[i]`` (``coefficients[0] == 1``)."""
        if self.t is None:
            raise RuntimeError("forecast requested before any computed step")
        dt = t - self.t
        return [dt**i / math.factorial(i) * self.scales[i] for i in range(len(self.diffs))]

    def predict(self, t: float) -> list[torch.Tensor]:
        """Forecast at ``t``; order 0 returns the cached tensors themselves (the stages only
        read them: the captured graphs are functional)."""
        if self.t is None:
            raise RuntimeError("forecast requested before any computed step")
        if len(self.diffs) == 1:
            return list(self.diffs[0])
        coefs = self.coefficients(t)
        out = [torch.add(v, d, alpha=coefs[1]) for v, d in zip(self.diffs[0], self.diffs[1])]
        for i in range(2, len(self.diffs)):
            for o, d in zip(out, self.diffs[i]):
                o.add_(d, alpha=coefs[i])
        return out


def taylor_weights(times: list[float], t: float, order: int) -> list[float]:
    """The forecast `TaylorCache(order)` makes at `t` from values cached at `times` (oldest
    first), as weights on those values, most recent first. Runs the cache itself on one-hot
    scalars, so it is the same formula by construction."""
    n = len(times)
    cache = TaylorCache(order)
    for i, ti in enumerate(times):
        cache.update([torch.nn.functional.one_hot(torch.tensor(i), n).double()], ti)
    return cache.predict(t)[0].flip(0).tolist()


class ForecastHistory:
    """The last `size` computed values (most recent first), forecast as a weighted sum.

    A forecast is one ``mul`` and ``len(weights) - 1`` fused ``add_``s per tensor, and an update
    only moves references: no finite differences are formed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[list[torch.Tensor]] = []
        self.times: list[float] = []  # most recent first, like values

    @property
    def t(self) -> float | None:
        return self.times[0] if self.times else None

    def update(self, values: list[torch.Tensor], t: float) -> None:
        self.values = [list(values)] + self.values[: self.size - 1]
        self.times = [t] + self.times[: self.size - 1]

    def predict(self, weights: tuple[tuple[float, ...], ...], base: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """sum_j weights[j] * values[j]; weights[j] is one weight, or one per channel (last
        dimension) of the tensors that have that many channels (the mean weight for others).
        With `base` (one tensor per leading value), ``base[i] +`` that sum: the skipped span's
        output in one pass less than forecasting and adding apart."""
        if not self.values:
            raise RuntimeError("forecast requested before any computed step")
        if len(weights) > len(self.values):
            raise ValueError(f"{len(weights)} forecast weights for {len(self.values)} cached steps")
        out: list[torch.Tensor] = []
        for j, (wj, vals) in enumerate(zip(weights, self.values)):
            for i, v in enumerate(vals):
                w = _multiplier(wj, v)
                if j == 0:
                    if base is not None and i < len(base):
                        buf = laid_out_like(v, base[i])
                        out.append(torch.add(base[i], v, alpha=w, out=buf) if isinstance(w, float) else torch.addcmul(base[i], v, w, out=buf))
                    else:
                        out.append(torch.mul(v, w))
                elif isinstance(w, float):
                    out[i].add_(v, alpha=w)
                else:
                    out[i].addcmul_(v, w)
        return out

    def taylor(self, t: float, order: int) -> list[torch.Tensor]:
        """Taylor forecast from the cached steps (for step counts the weights were not fitted for)."""
        times = self.times[: order + 1][::-1]
        return self.predict(tuple((w,) for w in taylor_weights(times, t, order)))


def laid_out_like(value: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
    """An output buffer with `value`'s memory layout for an elementwise op of `value` and
    `other`, or None (the op picks) where autograd must record the op (it cannot record `out=`).

    A forecast adds cached values (laid out as the computed span wrote them) to the span's
    input, and the op would take the input's layout: on diffusers' DiT the patch embedding's
    transpose leaves the stream channel-strided, so every later pass over a forecast output (the
    remaining multiply-adds, the final layer norm) ran on strided memory, 4-5x slower than
    contiguous at the zoo models' width (`benchmarks/exploration/skip_step_cost.py`). A skipped
    step's output now has the layout a computed step's has."""
    if torch.is_grad_enabled() and (value.requires_grad or other.requires_grad):
        return None
    return torch.empty_like(value)


def _multiplier(weights: tuple[float, ...], value: torch.Tensor) -> float | torch.Tensor:
    if len(weights) == 1:
        return float(weights[0])
    if value.dim() and value.shape[-1] == len(weights):
        return _channel_weights(weights, value.dtype, value.device)
    return sum(weights) / len(weights)


@functools.lru_cache(maxsize=4096)
def _channel_weights(weights: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The per-channel weight tensor, made once per (weights, dtype, device): every skipped step
    of every generation asks for the same few, and building a tensor from a tuple of floats
    costs as much as the multiply-add it feeds at the zoo models' width. Read-only by use."""
    return torch.tensor(weights, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Decisions: the span policies
# --------------------------------------------------------------------------------------------
class SpanPolicy(Protocol):
    """When a cached span computes, and how a skipped step is forecast. The caching passes
    (FORA, Δ-DiT, TaylorSeer, FirstBlockCache/DBCache, FoCa, CFG reuse) differ only in the policy
    they hand `CachedSpan`; the stage asks the policy instead of testing its type.

    `type` names it in artifacts (`to_spec` / `POLICY_TYPES[type].from_spec`). `decide` is called
    once per step: `probe()` gives what the probe blocks added (gated policies only), `first`
    whether nothing is cached yet. `computed_steps()` is the number of computed steps per
    generation where it is fixed (None for gates: it depends on the run)."""

    type: ClassVar[str]
    needs_probe: ClassVar[bool]

    def describe(self) -> dict[str, Any]: ...
    def decide(self, probe: Callable[[], torch.Tensor], ctx: StepContext, state: dict, t: float, first: bool, order: int) -> bool: ...
    def new_cache(self, order: int) -> "TaylorCache | ForecastHistory": ...
    def forecast(self, cache: Any, ctx: StepContext, t: float, inputs: list[torch.Tensor], order: int) -> tuple[list[torch.Tensor], bool]: ...
    def cond_only_now(self, ctx: StepContext) -> bool: ...
    def uses_second_half(self) -> bool: ...
    def computed_steps(self) -> int | None: ...
    def to_spec(self, prefix: str) -> StageSpec: ...


class _TaylorForecasting:
    """Forecast a skipped step by Taylor expansion of the stage's order (every policy but a
    fitted static schedule); no conditional-only steps."""

    def new_cache(self, order: int) -> "TaylorCache | ForecastHistory":
        return TaylorCache(order)

    def forecast(self, cache: Any, ctx: StepContext, t: float, inputs: list[torch.Tensor], order: int) -> tuple[list[torch.Tensor], bool]:
        """(forecast values, whether the paired inputs are already added to them)."""
        return cache.predict(t), False

    def cond_only_now(self, ctx: StepContext) -> bool:
        return False

    def uses_second_half(self) -> bool:
        return False

    def computed_steps(self) -> int | None:
        return None


@dataclass(frozen=True)
class StaticSchedule(_TaylorForecasting):
    compute: tuple[bool, ...]  # per calibrated step: True computes the span
    timesteps: tuple[float, ...] = ()  # calibrated timesteps (empty: match by step index only)
    on_mismatch: str = "rederive"  # or "error"
    # Per calibrated step, fitted forecast weights on the last computed values (most recent
    # first), each one weight or one per channel; () on computed steps. Empty: Taylor
    # forecasting of the stage's order.
    weights: tuple[tuple[tuple[float, ...], ...], ...] = ()
    # Per calibrated step: True computes only the second half of a batched-CFG call's rows and
    # rebuilds the first half (see the module docstring). Empty: every computed step is full.
    cond_only: tuple[bool, ...] = ()
    # How a conditional-only step rebuilds the other half's difference: 0 keeps the last full
    # step's, 1 extrapolates linearly from the last two full steps.
    cfg_delta_order: int = 1

    type: ClassVar[str] = "static"
    needs_probe: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.cond_only and (len(self.cond_only) != len(self.compute) or any(h and not c for h, c in zip(self.cond_only, self.compute))):
            raise ValueError("cond_only marks computed steps only, one flag per step")
        if self.cfg_delta_order not in (0, 1):
            raise ValueError(f"cfg_delta_order is 0 or 1, not {self.cfg_delta_order!r}")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": "static", "compute_steps": [i for i, c in enumerate(self.compute) if c], "steps": len(self.compute)}
        if any(self.cond_only):
            out["cond_only_steps"] = [i for i, h in enumerate(self.cond_only) if h]
            out["cfg_delta_order"] = self.cfg_delta_order
        out["forecast"] = "fitted" if self.weights else "taylor"
        if self.weights:
            # The mean over channels per history step: the full table can be 10^4 numbers.
            out["forecast_weights_mean"] = {i: [round(sum(w) / len(w), 6) for w in ws] for i, ws in enumerate(self.weights) if ws}
        return out

    def matches(self, ctx: StepContext) -> bool:
        """Whether this call is the calibrated step of the same index (same timestep)."""
        return ctx.step < len(self.compute) and (
            not self.timesteps or ctx.timestep is None
            or math.isclose(self.timesteps[ctx.step], ctx.timestep, rel_tol=1e-5, abs_tol=1e-6)
        )

    def decide(self, probe: Callable[[], torch.Tensor], ctx: StepContext, state: dict, t: float, first: bool, order: int) -> bool:
        return True if first else static_decision(self, ctx, state)

    def new_cache(self, order: int) -> "TaylorCache | ForecastHistory":
        return ForecastHistory(max(len(w) for w in self.weights)) if self.weights else TaylorCache(order)

    def forecast(self, cache: Any, ctx: StepContext, t: float, inputs: list[torch.Tensor], order: int) -> tuple[list[torch.Tensor], bool]:
        if not self.weights:  # new_cache gave a TaylorCache
            return cache.predict(t), False
        weights = self.weights[ctx.step] if self.matches(ctx) else ()
        if weights and len(weights) <= len(cache.values):
            return cache.predict(weights, base=inputs), True
        # Another step count than calibrated: the weights belong to other steps; use Taylor.
        return cache.taylor(t, min(order, len(cache.values) - 1)), False

    def cond_only_now(self, ctx: StepContext) -> bool:
        return bool(self.cond_only) and self.matches(ctx) and self.cond_only[ctx.step]

    def uses_second_half(self) -> bool:
        return any(self.cond_only)

    def computed_steps(self) -> int | None:
        return sum(self.compute)

    def to_spec(self, prefix: str) -> StageSpec:
        """JSON plus tensors named `prefix`...: timesteps and fitted weights go in float64
        tensors (exact, and NaN-safe where JSON is not)."""
        tensors = {f"{prefix}timesteps": torch.tensor(self.timesteps, dtype=torch.float64)}
        weights: list[dict[str, Any] | None] = []
        for step, per_history in enumerate(self.weights):
            if not per_history:
                weights.append(None)
                continue
            name = f"{prefix}weights.{step}"
            tensors[name] = torch.tensor([w for ws in per_history for w in ws], dtype=torch.float64)
            weights.append({"tensor": name, "lengths": [len(ws) for ws in per_history]})
        return {"type": self.type, "compute": list(self.compute), "timesteps": f"{prefix}timesteps", "on_mismatch": self.on_mismatch,
                "weights": weights, "cond_only": list(self.cond_only), "cfg_delta_order": self.cfg_delta_order}, tensors

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "StaticSchedule":
        weights = []
        for entry in spec["weights"]:
            if entry is None:
                weights.append(())
                continue
            flat, out, at = tensors[entry["tensor"]].tolist(), [], 0
            for n in entry["lengths"]:
                out.append(tuple(flat[at : at + n]))
                at += n
            weights.append(tuple(out))
        return cls(tuple(bool(c) for c in spec["compute"]), tuple(tensors[spec["timesteps"]].tolist()), spec["on_mismatch"],
                   tuple(weights), tuple(bool(c) for c in spec["cond_only"]), int(spec["cfg_delta_order"]))


@dataclass(frozen=True)
class GatedPolicy(_TaylorForecasting):
    """Gates that run the probe blocks every step and skip the span while a measure of the
    probe's output stays under `threshold` (after `warmup` steps, at most `max_cached` in a row)."""

    threshold: float
    warmup: int = 2
    max_cached: int = 4  # consecutive skipped steps before a forced full step

    needs_probe: ClassVar[bool] = True

    def describe(self) -> dict[str, Any]:
        return {"policy": self.type, "threshold": self.threshold, "warmup": self.warmup, "max_cached": self.max_cached}

    def decide(self, probe: Callable[[], torch.Tensor], ctx: StepContext, state: dict, t: float, first: bool, order: int) -> bool:
        residual = probe()
        compute = first or ctx.step < self.warmup or state["cached_run"] >= self.max_cached
        if not compute:
            compute = self._drifted(residual, ctx, state, t)
        if compute:
            state["probe_ref"] = residual
            state.setdefault("probe_taylor", TaylorCache(max(order, 1))).update([residual], t)
        return compute

    def _drifted(self, residual: torch.Tensor, ctx: StepContext, state: dict, t: float) -> bool:
        raise NotImplementedError

    def to_spec(self, prefix: str) -> StageSpec:
        return {"type": self.type, "threshold": self.threshold, "warmup": self.warmup, "max_cached": self.max_cached}, {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "GatedPolicy":
        return cls(float(spec["threshold"]), int(spec["warmup"]), int(spec["max_cached"]))


@dataclass(frozen=True)
class ProbeGate(GatedPolicy):
    """FirstBlockCache / DBCache: compute when the probe residual's relative L1 change since the
    last full step reaches the threshold."""

    type: ClassVar[str] = "probe"

    def _drifted(self, residual: torch.Tensor, ctx: StepContext, state: dict, t: float) -> bool:
        ref = state["probe_ref"]
        change = float((residual - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))
        ctx.record["probe_change"] = change
        return change >= self.threshold


@dataclass(frozen=True)
class ConfidenceGate(GatedPolicy):
    """CG-Taylor / FoCa: compute when the probe's output strays from its own Taylor forecast."""

    type: ClassVar[str] = "confidence"

    def _drifted(self, residual: torch.Tensor, ctx: StepContext, state: dict, t: float) -> bool:
        forecast = state["probe_taylor"].predict(t)[0]
        err = float((residual - forecast).norm() / residual.norm().clamp_min(1e-12))
        ctx.record["probe_error"] = err
        return err >= self.threshold


POLICY_TYPES: dict[str, type] = {cls.type: cls for cls in (StaticSchedule, ProbeGate, ConfidenceGate)}


def rederived_compute(schedule: StaticSchedule, step: int, t: float | None, history: list[float]) -> bool:
    """Decide for a run whose timesteps differ from the calibrated ones: compute when the
    trajectory has passed a calibrated compute point since the last computed step."""
    if t is None or not schedule.timesteps:
        raise CalibrationError("cannot re-derive the cache schedule without timesteps; re-calibrate for this step count")
    warmup = next((i for i, c in enumerate(schedule.compute) if not c), len(schedule.compute))
    if step == 0 or len(history) < warmup:
        return True
    last = history[-1]
    points = [ts for ts, c in zip(schedule.timesteps, schedule.compute) if c]
    lo, hi = min(t, last), max(t, last)
    return any(lo <= p < hi for p in points) or t <= min(schedule.timesteps) and schedule.compute[-1]


def cached_span_io(graph: DiTGraph, names: tuple[str, ...]) -> SpanIO:
    """span_io, memoised on the graph for these exact segment modules."""
    key = (names, tuple(id(graph.segment(n).module) for n in names))
    memo = graph.meta.setdefault("_span_io", {})
    if key not in memo:
        memo[key] = span_io(graph, names)
    return memo[key]


def static_decision(policy: StaticSchedule, ctx: StepContext, state: dict) -> bool:
    """The calibrated mask when this run's timesteps match the calibration; otherwise
    re-derived from the calibrated timesteps, or a clear error."""
    steps = len(policy.compute)
    if policy.matches(ctx):
        return policy.compute[ctx.step]
    if policy.on_mismatch == "error":
        expected = policy.timesteps[ctx.step] if ctx.step < steps else "none"
        raise CalibrationError(
            f"step {ctx.step} has timestep {ctx.timestep}, but the cache schedule was calibrated for "
            f"{steps} steps (timestep {expected} here): re-run calibration for this step count, "
            "or use on_mismatch='rederive'"
        )
    return rederived_compute(policy, ctx.step, ctx.timestep, state["history"])


def _half_difference(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """first half minus second half of each value's rows."""
    return [v[: v.shape[0] // 2] - v[v.shape[0] // 2 :] for v in values]


def _extrapolated_difference(kept: list[tuple[float, list[torch.Tensor]]], t: float, order: int) -> list[torch.Tensor]:
    """The half difference at timestep t from the (timestep, difference) pairs kept at the last
    full steps, oldest first: the last one (order 0, or a single pair), else the line through
    the last two."""
    t1, last = kept[-1]
    if order == 0 or len(kept) < 2 or kept[-2][0] == t1:
        return last
    t0, before = kept[-2]
    # lerp(d0, d1, 1 + c) = d1 + c (d1 - d0): one kernel per value.
    weight = 1.0 + (t - t1) / (t1 - t0)
    return [torch.lerp(d0, d1, weight) for d0, d1 in zip(before, last)]


def _half_inputs(graph: DiTGraph, half: DiTGraph, blocks: tuple[str, ...], io: SpanIO, env: dict[str, Any]) -> dict[str, Any] | str:
    """The span's inputs for the half-batch program (the second half of the rows of every value
    whose shape there has half the rows), or why they cannot be formed. The check runs once per
    pair of programs."""
    memo = graph.meta.setdefault("_cond_only_inputs", {})
    if blocks not in memo or memo[blocks][0] is not half:
        memo[blocks] = (half, _half_input_plan(graph, half, blocks, io))
    plan = memo[blocks][1]
    if isinstance(plan, str):
        return plan
    return {name: (env[name][env[name].shape[0] // 2 :] if sliced else env[name]) for name, sliced in plan}


def _half_input_plan(graph: DiTGraph, half: DiTGraph, blocks: tuple[str, ...], io: SpanIO) -> tuple[tuple[str, bool], ...] | str:
    try:
        half_io = cached_span_io(half, blocks)
    except KeyError:
        return "the half-batch program has other block segments"
    if (half_io.inputs, half_io.pairs, half_io.unpaired) != (io.inputs, io.pairs, io.unpaired):
        return "the half-batch program's span reads or writes other values"
    full_shapes, half_shapes = value_shapes(graph), value_shapes(half)
    plan = []
    for name in io.inputs:
        full, want = full_shapes.get(name), half_shapes.get(name)
        if full is None or want is None:
            return f"no shape recorded for span input {name!r}"
        if full == want:
            plan.append((name, False))
        elif len(full) == len(want) and full[0] == 2 * want[0] and full[1:] == want[1:]:
            plan.append((name, True))
        else:
            return f"span input {name!r} is {list(full)} here and {list(want)} in the half-batch program"
    return tuple(plan)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
@dataclass
class CachedSpan(Stage):
    """Compute or predict a contiguous run of blocks (see module docstring)."""

    blocks: tuple[str, ...]  # the span's block segments, in order
    policy: SpanPolicy
    order: int = 0
    probe: tuple[str, ...] = ()  # blocks before the span that always run and feed the gate
    key: str = "cache"
    kind = "cached-span"
    exportable = True

    def __post_init__(self) -> None:
        if self.policy.needs_probe and not self.probe:
            raise ValueError(f"{type(self.policy).__name__} needs probe blocks")

    def segment_names(self) -> tuple[str, ...]:
        return self.probe + self.blocks

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "segments": list(self.blocks), "probe": list(self.probe), "order": self.order, **self.policy.describe()}

    def io(self, graph: DiTGraph) -> SpanIO:
        return cached_span_io(graph, self.blocks)

    def uses_second_half(self) -> bool:
        return self.policy.uses_second_half()

    def spec(self) -> StageSpec:
        policy, tensors = policy_spec(self.policy, f"{self.key}.")
        return {"kind": self.kind, "blocks": list(self.blocks), "probe": list(self.probe), "order": self.order,
                "key": self.key, "policy": policy}, tensors

    # -- one call ------------------------------------------------------------------------------
    def run(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext) -> None:
        if self.key not in ctx.state:
            ctx.state[self.key] = {"taylor": self.policy.new_cache(self.order), "cached_run": 0, "history": []}
        state = ctx.state[self.key]
        t = ctx.timestep if ctx.timestep is not None else float(ctx.step)
        io = self.io(graph)
        if self.probe:
            RunSegments(self.probe).run(graph, env, ctx)
        compute = self._decide(graph, env, ctx, state, t, io)
        if compute:
            values = self._cond_only(graph, env, ctx, state, io, t) if self.policy.cond_only_now(ctx) else None
            if values is None:
                before = [env[i] for i, _ in io.pairs]
                RunSegments(self.blocks).run(graph, env, ctx)
                values = [env[o] - b for (_, o), b in zip(io.pairs, before)] + [env[o].clone() for o in io.unpaired]
                if self.uses_second_half():
                    # Only the last two full steps of batched CFG count: a call that is no CFG
                    # pair clears them, and the next pair starts over.
                    if latent_halves_equal(graph, env):
                        state["cfg_deltas"] = ((state.get("cfg_deltas") or []) + [(t, _half_difference(values))])[-2:]
                    else:
                        state["cfg_deltas"] = None
            state["taylor"].update(values, t)
            state["cached_run"] = 0
            state["history"].append(t)
        else:
            inputs = [env[i] for i, _ in io.pairs]
            predicted, added = self.policy.forecast(state["taylor"], ctx, t, inputs, self.order)
            for k, (i, o) in enumerate(io.pairs):
                env[o] = predicted[k] if added else torch.add(inputs[k], predicted[k], out=laid_out_like(predicted[k], inputs[k]))
            for k, o in enumerate(io.unpaired):
                # An unpaired output may be the model's output: never hand the cache itself out.
                env[o] = predicted[len(io.pairs) + k].clone()
            state["cached_run"] += 1
            ctx.record.setdefault("cached", []).extend(self.blocks)

    def _cond_only(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext, state: dict, io: SpanIO, t: float) -> list[torch.Tensor] | None:
        """Compute the span on the second half of the rows and rebuild the first half from the
        difference at the last full steps; None (compute in full) where that is not valid for
        this call, with the reason in the call record."""
        reason = None
        kept = state.get("cfg_deltas")
        if not kept:
            reason = "no full step with batched CFG (equal latent halves) since the last generation start"
        elif not latent_halves_equal(graph, env):
            reason = "the two halves of the batch hold different latents (not batched CFG)"
        elif ctx.second_half is None:
            reason = "the runtime offers no half-batch program"
        if reason is None:
            half = ctx.second_half()
            inputs = half if isinstance(half, str) else _half_inputs(graph, half, self.blocks, io, env)
            if isinstance(inputs, str):
                reason = inputs
        if reason is not None:
            ctx.record.setdefault("cond_only_declined", []).append(reason)
            return None
        delta = _extrapolated_difference(kept, t, self.policy.cfg_delta_order)
        half_env = dict(inputs)
        before = [half_env[i] for i, _ in io.pairs]
        RunSegments(self.blocks).run(half.at_step(ctx.step), half_env, ctx)
        second = [half_env[o] - b for (_, o), b in zip(io.pairs, before)] + [half_env[o] for o in io.unpaired]
        values = [torch.cat([v + d, v]) for v, d in zip(second, delta)]
        for k, (i, o) in enumerate(io.pairs):
            env[o] = env[i] + values[k]
        for k, o in enumerate(io.unpaired):
            env[o] = values[len(io.pairs) + k].clone()
        ctx.record.setdefault("cond_only", []).extend(self.blocks)
        return values

    def _decide(self, graph: DiTGraph, env: dict[str, Any], ctx: StepContext, state: dict, t: float, io: SpanIO) -> bool:
        return self.policy.decide(lambda: self._probe_residual(graph, env, io), ctx, state, t, state["taylor"].t is None, self.order)

    def _probe_residual(self, graph: DiTGraph, env: dict[str, Any], io: SpanIO) -> torch.Tensor:
        """What the probe blocks added to the image stream on this step."""
        return env[io.primary_input] - env[cached_span_io(graph, self.probe).primary_input]


# --------------------------------------------------------------------------------------------
# Stages as data (export artifacts)
# --------------------------------------------------------------------------------------------
def policy_spec(policy: SpanPolicy, prefix: str) -> StageSpec:
    """A span policy as JSON plus tensors named `prefix`... (see each policy's `to_spec`)."""
    return policy.to_spec(prefix)


def policy_from_spec(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SpanPolicy:
    kind = spec.get("type")
    if kind not in POLICY_TYPES:
        raise ValueError(f"unknown cache policy type {kind!r} (known: {sorted(POLICY_TYPES)})")
    return POLICY_TYPES[kind].from_spec(spec, tensors)


register_stage_loader(CachedSpan.kind, lambda spec, tensors: CachedSpan(
    tuple(spec["blocks"]), policy_from_spec(spec["policy"], tensors), int(spec["order"]), tuple(spec["probe"]), spec["key"]))
