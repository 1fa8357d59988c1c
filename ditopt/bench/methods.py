"""Methods the model benchmark compares: the reference model, diffusers' cache hooks, cache-dit
and ditopt's own passes, each at a few settings from gentle to aggressive.

Every method setting is built by a *builder* into a :class:`Runner`: the module handed to
``bundle.sample(model=...)`` plus ``new_generation()``, which gives the method fresh cache state
before every generation. Peers (diffusers hooks, cache-dit) mutate the module they are applied to,
so each one is applied to its own ``copy.deepcopy`` of the zoo model; the zoo bundle's own model is
only ever run as the unoptimized reference.

A builder raises :class:`Unsupported` when the method cannot run on the model (the reason goes
into the results); any other exception is recorded as a failure.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "METHODS", "MethodSetting", "Runner", "Unsupported", "BuildContext", "settings_for", "method_names",
]


class Unsupported(Exception):
    """The method cannot be applied to this model (reason in the message)."""


@dataclass
class BuildContext:
    """What a builder may use: the zoo bundle, the number of sampling steps, and a sampler for
    the calibration / validation seeds (disjoint from the evaluation seeds)."""

    bundle: Any
    steps: int
    calibration_classes: list[int]
    calibration_seeds: list[int]
    validation_classes: list[int]
    validation_seeds: list[int]
    cache: dict[str, Any] = field(default_factory=dict)  # shared between settings of one model

    def sample(self, runner: "Runner", classes: list[int], seeds: list[int]) -> torch.Tensor:
        runner.new_generation()
        return self.bundle.sample(classes, seeds, steps=self.steps, model=runner.model)


class Runner:
    """A model to sample with plus the per-generation reset of its cache state."""

    def __init__(self, model: nn.Module, reset: Callable[[], None] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.model = model
        self._reset = reset
        self.info: dict[str, Any] = dict(info or {})

    def new_generation(self) -> None:
        if self._reset is not None:
            self._reset()


@dataclass(frozen=True)
class MethodSetting:
    method: str  # registry key, e.g. "diffusers-fbc"
    family: str  # curve in the Pareto plot, e.g. "diffusers FirstBlockCache"
    provider: str  # "reference" | "diffusers" | "cache-dit" | "ditopt"
    setting: str  # short label, e.g. "thr=0.05"
    params: dict[str, Any]
    build: Callable[[BuildContext, dict[str, Any]], Runner]

    @property
    def key(self) -> str:
        return f"{self.method}[{self.setting}]"


# ------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------
def _build_baseline(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    return Runner(ctx.bundle.model, None, {"note": "the zoo model itself, unmodified"})


# ------------------------------------------------------------------------------------------
# diffusers hooks (functional apply_* on a deep copy + a cache context per call)
# ------------------------------------------------------------------------------------------
def _timestep_scale(bundle) -> float:
    # DiT gets integer DDPM timesteps 0..999; the Flux bundle feeds t/1000, pipelines report t.
    return 1000.0 if bundle.kind == "flux" else 1.0


class DiffusersHooked(nn.Module):
    """Runs a hooked model the way a diffusers pipeline does: every call inside a cache context
    (one name per generation, so state never leaks between generations), with the step index and
    the current timestep on the pipeline scale (0..1000) available to the hooks' callbacks."""

    def __init__(self, model: nn.Module, steps: int, timestep_scale: float) -> None:
        super().__init__()
        self.inner = model
        self.steps = steps
        self.timestep_scale = timestep_scale
        self.generation = 0
        self.step = -1
        self.current_timestep: float = 1000.0
        self._last_t: float | None = None

    def new_generation(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.inner).reset_stateful_hooks(recurse=True)
        self.generation += 1
        self.step = -1
        self._last_t = None

    def forward(self, **kwargs: Any) -> Any:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = kwargs.get("timestep")
        t = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        if t != self._last_t:
            self.step += 1
            self._last_t = t
        self.current_timestep = t * self.timestep_scale
        ctx = CacheContext(f"generation-{self.generation}", step_index=self.step,
                           num_inference_steps=self.steps, timestep=self.current_timestep)
        _set_cache_context(self.inner, ctx)
        try:
            return self.inner(**kwargs)
        finally:
            _set_cache_context(self.inner, None)


def _hooked(ctx: BuildContext, apply: Callable[[nn.Module, "DiffusersHooked"], None], info: dict) -> Runner:
    from diffusers.hooks import HookRegistry

    model = copy.deepcopy(ctx.bundle.model)
    wrapper = DiffusersHooked(model, ctx.steps, _timestep_scale(ctx.bundle))
    apply(model, wrapper)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return Runner(wrapper, wrapper.new_generation, info)


def _block_module_patterns(bundle) -> list[str]:
    """Names (re.fullmatch) of the blocks' attention and feed-forward modules: TaylorSeerCache's
    default patterns ('^transformer_blocks.*attn') do not fullmatch DiT's 'attn1' and skip FFNs."""
    if bundle.kind == "dit":
        return [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
    return [r"transformer_blocks\.\d+\.(attn|ff|ff_context)",
            r"single_transformer_blocks\.\d+\.(attn|proj_mlp|proj_out)"]


def _build_fbc(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return _hooked(ctx, lambda m, w: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=params["threshold"])),
                   {"api": "diffusers.hooks.apply_first_block_cache"})


def _build_taylorseer(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    patterns = _block_module_patterns(ctx.bundle)
    cfg = TaylorSeerCacheConfig(cache_interval=params["cache_interval"],
                                disable_cache_before_step=params["disable_cache_before_step"],
                                max_order=params["max_order"], taylor_factors_dtype=torch.float32,
                                cache_identifiers=patterns)
    return _hooked(ctx, lambda m, w: apply_taylorseer_cache(m, cfg),
                   {"api": "diffusers.hooks.apply_taylorseer_cache", "cache_identifiers": patterns,
                    "taylor_factors_dtype": "float32 (model runs in fp32)"})


def _magcache_ratios(ctx: BuildContext) -> list[float]:
    """Run diffusers' own MagCache calibration mode (no skipping) on the calibration seeds and read
    the ratios it prints at the end of the generation."""
    key = "magcache_ratios"
    if key in ctx.cache:
        return ctx.cache[key]
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    runner = _hooked(ctx, lambda m, w: apply_mag_cache(m, MagCacheConfig(num_inference_steps=ctx.steps, calibrate=True)), {})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ctx.sample(runner, ctx.calibration_classes, ctx.calibration_seeds)
    text = buf.getvalue()
    marker = "Calibration Complete"
    if marker not in text:
        raise RuntimeError(f"MagCache calibration printed no ratios (output: {text[-300:]!r})")
    line = next(ln for ln in text[text.index(marker):].splitlines()[1:] if ln.strip().startswith("["))
    ratios = [float(r) for r in ast.literal_eval(line.strip())]
    if len(ratios) != ctx.steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {ctx.steps} steps")
    ctx.cache[key] = ratios
    return ratios


def _build_magcache(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    ratios = _magcache_ratios(ctx)
    cfg = MagCacheConfig(threshold=params["threshold"], max_skip_steps=params["max_skip_steps"],
                         retention_ratio=params["retention_ratio"], num_inference_steps=ctx.steps,
                         mag_ratios=list(ratios))
    return _hooked(ctx, lambda m, w: apply_mag_cache(m, cfg),
                   {"api": "diffusers.hooks.apply_mag_cache",
                    "mag_ratios": "calibrated with MagCacheConfig(calibrate=True) on the calibration seeds",
                    "mag_ratios_values": [round(r, 5) for r in ratios]})


def _build_pab(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(m: nn.Module, w: DiffusersHooked) -> None:
        cfg = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=params["skip_range"],
            spatial_attention_timestep_skip_range=tuple(params["timestep_range"]),
            current_timestep_callback=lambda: w.current_timestep,
        )
        apply_pyramid_attention_broadcast(m, cfg)

    return _hooked(ctx, apply, {"api": "diffusers.hooks.apply_pyramid_attention_broadcast"})


def _build_fastercache(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    if ctx.bundle.kind != "dit":
        raise Unsupported(
            "FasterCache splits the denoiser output into spatial frequencies and only supports "
            "tensor formats BCFHW/BFCHW/BCHW; FluxTransformer2DModel returns packed tokens [B, S, C] "
            "(diffusers: 'TODO: Support BSC')")

    def apply(m: nn.Module, w: DiffusersHooked) -> None:
        cfg = FasterCacheConfig(
            spatial_attention_block_skip_range=params["attention_skip_range"],
            spatial_attention_timestep_skip_range=(-1, params["timestep_upper"]),
            unconditional_batch_skip_range=params["uncond_skip_range"],
            unconditional_batch_timestep_skip_range=(-1, params["timestep_upper"]),
            spatial_attention_block_identifiers=(r"^transformer_blocks.*attn",),
            tensor_format="BCHW",
            current_timestep_callback=lambda: w.current_timestep,
            attention_weight_callback=lambda _m: 0.5,
            # the CFG batch is [null class]*n + classes: the class labels must be split too
            _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"],
        )
        apply_faster_cache(m, cfg)

    return _hooked(ctx, apply, {"api": "diffusers.hooks.apply_faster_cache",
                                "note": "class_labels added to the uncond/cond split kwargs; tensor_format BCHW"})


# ------------------------------------------------------------------------------------------
# cache-dit (transformer-only)
# ------------------------------------------------------------------------------------------
def _quiet_cache_dit() -> None:
    import os

    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is first imported
    for name in ("CACHE_DIT", "cache_dit"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _build_dbcache(ctx: BuildContext, params: dict[str, Any], taylorseer: bool) -> Runner:
    _quiet_cache_dit()
    import cache_dit
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    model = copy.deepcopy(ctx.bundle.model)

    def cache_config() -> Any:
        return DBCacheConfig(num_inference_steps=ctx.steps, Fn_compute_blocks=params["Fn"],
                             Bn_compute_blocks=params["Bn"], residual_diff_threshold=params["threshold"],
                             max_warmup_steps=params["warmup"], enable_separate_cfg=False)

    def calibrator() -> Any:
        return TaylorSeerCalibratorConfig(taylorseer_order=params.get("order", 1)) if taylorseer else None

    kwargs = {"cache_config": cache_config()}
    if taylorseer:
        kwargs["calibrator_config"] = calibrator()
    with contextlib.redirect_stdout(io.StringIO()):
        cached = cache_dit.enable_cache(model, **kwargs)
    cached = cached if isinstance(cached, nn.Module) else model

    def reset() -> None:
        refresh = {"cache_config": cache_config()}
        if taylorseer:
            refresh["calibrator_config"] = calibrator()
        cache_dit.refresh_context(cached, **refresh)

    return Runner(cached, reset, {"api": "cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...)"
                                  + (", calibrator_config=TaylorSeerCalibratorConfig(...))" if taylorseer else ")"),
                                  "refresh": "cache_dit.refresh_context before every generation"})


# ------------------------------------------------------------------------------------------
# ditopt
# ------------------------------------------------------------------------------------------
def _ditopt_model(ctx: BuildContext) -> nn.Module:
    # ditopt never modifies the model it is given; one copy serves all ditopt settings.
    if "ditopt_model" not in ctx.cache:
        ctx.cache["ditopt_model"] = copy.deepcopy(ctx.bundle.model)
    return ctx.cache["ditopt_model"]


def _prebuild(opt, bundle, batch: int | None) -> None:
    """Capture the programs for the benchmark's batch shape now (with the half-batch one of
    conditional-only steps), outside counting and timing.
    The call must match the sampler's exactly (it passes ``return_dict=False``): a program is
    kept per call signature, and a miss would capture again inside the MAC count (torch.export's
    trace counts as one forward)."""
    if batch:
        opt.prepare(**bundle.make_inputs(batch), return_dict=False)


def _build_ditopt(ctx: BuildContext, params: dict[str, Any]) -> Runner:
    import ditopt

    bundle = ctx.bundle
    model = _ditopt_model(ctx)
    profile = params["profile"]
    calibrated = params.get("calibrate") or isinstance(profile, str) or (
        isinstance(profile, dict) and (profile.get("budget") or {}).get("min_psnr_db") is not None)
    # Stats are shared between settings whose passes need the same collectors: the key is what
    # the profile's passes declare, so a calibration without (say) the caching sketches is never
    # handed to a profile that reads them.
    from ditopt.profiles import load_profile
    from ditopt.registry import get_pass

    needs = sorted({n for e in load_profile(profile).passes for n in get_pass(e.name).needs})
    stats_key = "ditopt_stats:" + ",".join(needs)
    kwargs: dict[str, Any] = {"example_inputs": bundle.make_inputs(2)}
    if calibrated:
        kwargs["calibration"] = lambda m: bundle.sample(ctx.calibration_classes, ctx.calibration_seeds, steps=ctx.steps, model=m)
        kwargs["validation"] = lambda m: bundle.sample(ctx.validation_classes, ctx.validation_seeds, steps=ctx.steps, model=m)
        if stats_key in ctx.cache:
            kwargs["stats"] = ctx.cache[stats_key]
    else:
        kwargs["num_steps"] = ctx.steps
    opt = ditopt.optimize(model, profile, on_gate_miss="return", **kwargs)  # a missed gate is a row, flagged
    if calibrated and getattr(opt, "stats", None) is not None:
        ctx.cache.setdefault(stats_key, opt.stats)
    _prebuild(opt, bundle, ctx.cache.get("batch"))
    opt.reset()
    report = opt.report.to_dict()
    info: dict[str, Any] = {"api": "ditopt.optimize", "profile": profile, "passed": report.get("passed")}
    for p in report.get("passes", []):
        rep = p.get("report") or {}
        info.setdefault("passes", []).append({
            "name": p.get("name"), "applied": p.get("applied"), "modified": p.get("modified"),
            "config": p.get("config"),
            "predicted_block_saving": rep.get("predicted_block_saving"),
            "stages": rep.get("stages"),
            # scalar search results (e.g. target / measured calibration PSNR), not the trial lists
            "search": {k: v for k, v in rep.items() if isinstance(v, (int, float, str, bool)) and k != "predicted_block_saving"},
            # per candidate set the end-to-end distillation trained: held-out loss before/after, seconds
            "joint": (rep.get("distillation") or {}).get("joint"),
        })
        if "substituted" in rep:  # attention passes: which layers changed, and why the others did not
            info["passes"][-1]["substituted"] = rep["substituted"]
            info["passes"][-1]["dense_reasons"] = sorted({d["reason"] for d in rep.get("dense", [])})
    info["verification"] = [{k: v.get(k) for k in ("kind", "passed", "psnr_db", "psnr_lower_db", "max_rel_err") if k in v}
                            for v in report.get("verification", [])]
    if report.get("retries"):  # held-out misses before the shipped plan, and what each retry changed
        from ditopt.optimize import describe_retry

        info["retries"] = [describe_retry(a) for a in report["retries"]]
    return Runner(opt, opt.reset, info)


# ------------------------------------------------------------------------------------------
# registry: method -> settings (gentle ... aggressive)
# ------------------------------------------------------------------------------------------
def _taylor_profile(order: int, interval: int, warmup: int) -> dict:
    return {"name": f"taylor-o{order}-i{interval}", "passes": [
        {"name": "taylor_forecast", "order": order, "interval": interval, "warmup": warmup}]}


def _residual_profile(interval: int, warmup: int, order: int) -> dict:
    return {"name": f"residual-i{interval}", "passes": [
        {"name": "residual_cache", "interval": interval, "warmup": warmup, "order": order}]}


# The exact passes the presets run after the schedule (they change no value, only what is recomputed
# and how tokens sit in memory); the budget and attention rows run them too, so every ditopt
# caching row is the same stack at another budget.
_EXACT_PASSES = ({"name": "conditioning_memo"}, {"name": "patch_layout"})


def _budget_profile(min_psnr_db: float, **schedule: Any) -> dict:
    """The calibrated schedule at a user-stated PSNR budget (what the presets are, at other budgets):
    ditopt's curve between the presets and above ``lossless``. Points exist only where a budget
    was asked for, and each lands 1-3 dB above it (held-out gate), so the grid is dense enough to
    put a ditopt point just above each peer's PSNR. ``schedule``: calibrated_schedule options
    beyond the defaults (e.g. cfg_reuse)."""
    suffix = "".join(f"-{k}={v}" for k, v in schedule.items())
    return {"name": f"schedule-{min_psnr_db:g}dB{suffix}", "budget": {"min_psnr_db": min_psnr_db, "max_rel_err": 1e-4},
            "passes": [{"name": "calibrated_schedule", "order": "auto", **schedule}, *_EXACT_PASSES]}


def _attention_profile(name: str, attention: dict, budget_db: float | None = None, forced: bool = True,
                       schedule: bool = True) -> dict:
    """Attention substitution, optionally composed with the calibrated cache schedule at a PSNR
    budget (and the exact passes, as the presets are; ``schedule=False``: the budget gates the
    substitution alone, the row that composition is compared with). ``forced``: on every layer (min_mass 0,
    cost guard off: the zoo models' attention is broad and their 16-token blocks make PISA cost
    more than dense, so the calibrated choice
    substitutes nothing; this shows the quality each pattern costs). Otherwise the pass decides
    from calibration with its defaults, as a user's profile would. Per-call rollback is off
    (max_rel_err 1): the end-to-end PSNR is what is measured."""
    passes = [{"min_mass": 0.0, "max_cost": None, **attention} if forced else dict(attention)]
    budget: dict[str, Any] = {"max_rel_err": 1.0}
    if budget_db is not None:
        passes += [{"name": "calibrated_schedule", "order": "auto"}] if schedule else []
        passes += list(_EXACT_PASSES)
        budget["min_psnr_db"] = budget_db
    return {"name": name, "budget": budget, "passes": passes}


def _linear_attention_profile(name: str, budget_db: float, schedule: bool = True, joint_steps: int = 0) -> dict:
    """linear_attention under a PSNR budget, which chooses its layers and feature map; with the
    calibrated schedule too (``schedule``), both searched against the same budget; with
    ``joint_steps``, every candidate set trained end to end after the layer-wise stage."""
    la: dict[str, Any] = {"name": "linear_attention", "feature": "auto"}
    if joint_steps:
        la["joint_steps"] = joint_steps
    passes: list[dict[str, Any]] = [la]
    passes += [{"name": "calibrated_schedule", "order": "auto"}] if schedule else []
    return {"name": name, "budget": {"min_psnr_db": budget_db, "max_rel_err": 1.0}, "passes": passes + list(_EXACT_PASSES)}


def _specs() -> dict[str, dict[str, Any]]:
    S = lambda label, **p: (label, p)  # noqa: E731
    return {
        "baseline": {"family": "baseline", "provider": "reference", "build": _build_baseline,
                     "settings": [S("reference")]},
        "diffusers-fbc": {"family": "diffusers FirstBlockCache", "provider": "diffusers", "build": _build_fbc,
                          "settings": [S("thr=0.08", threshold=0.08), S("thr=0.12", threshold=0.12),
                                       S("thr=0.24", threshold=0.24), S("thr=0.4", threshold=0.4)]},
        "diffusers-taylorseer": {"family": "diffusers TaylorSeerCache", "provider": "diffusers", "build": _build_taylorseer,
                                 "settings": [S("N=2,o1", cache_interval=2, disable_cache_before_step=3, max_order=1),
                                              S("N=3,o1", cache_interval=3, disable_cache_before_step=3, max_order=1),
                                              S("N=5,o1", cache_interval=5, disable_cache_before_step=3, max_order=1)]},
        "diffusers-magcache": {"family": "diffusers MagCache", "provider": "diffusers", "build": _build_magcache,
                               "settings": [S("thr=0.01,k=1", threshold=0.01, max_skip_steps=1, retention_ratio=0.2),
                                            S("thr=0.03,k=2", threshold=0.03, max_skip_steps=2, retention_ratio=0.2),
                                            S("thr=0.06,k=3", threshold=0.06, max_skip_steps=3, retention_ratio=0.2),
                                            S("thr=0.15,k=4", threshold=0.15, max_skip_steps=4, retention_ratio=0.1)]},
        "diffusers-pab": {"family": "diffusers PyramidAttentionBroadcast", "provider": "diffusers", "build": _build_pab,
                          "settings": [S("skip=2,t=100-800", skip_range=2, timestep_range=(100, 800)),
                                       S("skip=3,t=100-800", skip_range=3, timestep_range=(100, 800)),
                                       S("skip=4,t=50-950", skip_range=4, timestep_range=(50, 950))]},
        "diffusers-fastercache": {"family": "diffusers FasterCache", "provider": "diffusers", "build": _build_fastercache,
                                  "settings": [S("attn=2,uncond=5", attention_skip_range=2, uncond_skip_range=5, timestep_upper=681),
                                               S("attn=2,uncond=3", attention_skip_range=2, uncond_skip_range=3, timestep_upper=800),
                                               S("attn=3,uncond=2", attention_skip_range=3, uncond_skip_range=2, timestep_upper=900)]},
        "cachedit-dbcache": {"family": "cache-dit DBCache", "provider": "cache-dit",
                             "build": lambda c, p: _build_dbcache(c, p, taylorseer=False),
                             "settings": [S("F1B0,thr=0.12", Fn=1, Bn=0, threshold=0.12, warmup=2),
                                          S("F1B0,thr=0.24", Fn=1, Bn=0, threshold=0.24, warmup=2),
                                          S("F1B0,thr=0.4", Fn=1, Bn=0, threshold=0.4, warmup=2)]},
        "cachedit-dbcache-taylorseer": {"family": "cache-dit DBCache+TaylorSeer", "provider": "cache-dit",
                                        "build": lambda c, p: _build_dbcache(c, p, taylorseer=True),
                                        "settings": [S("F1B0,thr=0.12,o1", Fn=1, Bn=0, threshold=0.12, warmup=2, order=1),
                                                     S("F1B0,thr=0.24,o1", Fn=1, Bn=0, threshold=0.24, warmup=2, order=1),
                                                     S("F1B0,thr=0.4,o1", Fn=1, Bn=0, threshold=0.4, warmup=2, order=1)]},
        "ditopt-preset": {"family": "ditopt presets", "provider": "ditopt", "build": _build_ditopt,
                          "settings": [S("lossless", profile="lossless"), S("balanced", profile="balanced"),
                                       S("fast", profile="fast")]},
        "ditopt-budget": {"family": "ditopt calibrated_schedule at a PSNR budget", "provider": "ditopt",
                          "build": _build_ditopt,
                          "settings": [S(f"{db:g} dB", profile=_budget_profile(db)) for db in (50.0, 48.0, 47.0, 45.0, 42.0, 41.0, 40.0, 37.5, 32.5, 27.5)]},
        # The opt-in conditional-only steps (FasterCache's CFG reuse with an extrapolated
        # difference), at the budgets around the presets: what a user gains by turning them on.
        "ditopt-budget-cfg": {"family": "ditopt calibrated_schedule at a PSNR budget, cfg_reuse='auto'", "provider": "ditopt",
                              "build": _build_ditopt,
                              "settings": [S(f"{db:g} dB", profile=_budget_profile(db, cfg_reuse="auto")) for db in (45.0, 40.0, 37.5, 35.0, 30.0)]},
        "ditopt-memo": {"family": "ditopt conditioning_memo", "provider": "ditopt", "build": _build_ditopt,
                        "settings": [S("exact", exact=True, profile={"name": "conditioning-memo", "passes": [{"name": "conditioning_memo"}]})]},
        "ditopt-layout": {"family": "ditopt patch_layout", "provider": "ditopt", "build": _build_ditopt,
                          "settings": [S("exact", exact=True, profile={"name": "patch-layout", "passes": [{"name": "patch_layout"}]})]},
        "ditopt-taylor": {"family": "ditopt taylor_forecast", "provider": "ditopt", "build": _build_ditopt,
                          "settings": [S("o2,N=2", profile=_taylor_profile(2, 2, 3)),
                                       S("o2,N=3", profile=_taylor_profile(2, 3, 3)),
                                       S("o2,N=5", profile=_taylor_profile(2, 5, 3))]},
        "ditopt-residual": {"family": "ditopt residual_cache", "provider": "ditopt", "build": _build_ditopt,
                            "settings": [S("N=2", profile=_residual_profile(2, 2, 0)),
                                         S("N=3", profile=_residual_profile(3, 2, 0)),
                                         S("N=4", profile=_residual_profile(4, 2, 0))]},
        "ditopt-attention": {"family": "ditopt attention substitution", "provider": "ditopt", "build": _build_ditopt,
                             "settings": [S("NA r=1", calibrate=True, collectors=("attention",),
                                            profile=_attention_profile("na-r1", {"name": "neighborhood_attention", "radius": 1})),
                                          S("PISA rho=0.5", calibrate=True, collectors=("attention",),
                                            profile=_attention_profile("pisa-0.5", {"name": "block_sparse_attention", "rho": 0.5})),
                                          S("PISA rho=0.25", calibrate=True, collectors=("attention",),
                                            profile=_attention_profile("pisa-0.25", {"name": "block_sparse_attention", "rho": 0.25})),
                                          S("PISA 0.5+balanced", calibrate=True, collectors=("attention", "trajectory"),
                                            profile=_attention_profile("pisa-0.5+balanced", {"name": "block_sparse_attention", "rho": 0.5}, 30.0)),
                                          S("NA auto+balanced", calibrate=True, collectors=("attention", "trajectory"),
                                            profile=_attention_profile("na-auto+balanced", {"name": "neighborhood_attention"}, 30.0, forced=False)),
                                          S("NA auto", calibrate=True, collectors=("attention",),
                                            profile=_attention_profile("na-auto", {"name": "neighborhood_attention"}, 30.0,
                                                                       forced=False, schedule=False))]},
        # Linear attention distilled from the model's own layers (layer-wise, on recorded block
        # inputs; "joint": then end to end through the stack), the layers and feature map chosen by
        # the one budget search at 30 dB; alone, and composed with the calibrated cache schedule
        # under the same budget.
        "ditopt-linear-attention": {"family": "ditopt linear_attention", "provider": "ditopt", "build": _build_ditopt,
                                    "settings": [S("LA auto 35dB", calibrate=True, collectors=("block_inputs",),
                                                   profile=_linear_attention_profile("la-auto-35dB", 35.0, schedule=False)),
                                                 S("LA auto 30dB", calibrate=True, collectors=("block_inputs",),
                                                   profile=_linear_attention_profile("la-auto-30dB", 30.0, schedule=False)),
                                                 S("LA auto 30dB joint", calibrate=True, collectors=("block_inputs",),
                                                   profile=_linear_attention_profile("la-auto-30dB-joint", 30.0, schedule=False,
                                                                                     joint_steps=100)),
                                                 S("LA auto+balanced 30dB", calibrate=True, collectors=("block_inputs", "trajectory"),
                                                   profile=_linear_attention_profile("la-auto+balanced-30dB", 30.0))]},
    }


METHODS = _specs()
# In --quick mode: one setting per method (index into the list above).
QUICK_SETTING = {"diffusers-fbc": 1, "diffusers-magcache": 2, "cachedit-dbcache": 1,
                 "cachedit-dbcache-taylorseer": 1, "ditopt-preset": 1}


def method_names() -> list[str]:
    return list(METHODS)


def settings_for(methods: list[str], quick: bool = False, setting_index: int | None = None,
                 only: list[str] | None = None) -> list[MethodSetting]:
    """Expand method names into their settings; the baseline always comes first. ``setting_index``
    keeps only that setting of every method (clamped to the method's list; 0 = gentlest).
    ``only``: keep just these settings, named as in the tables (``ditopt-preset[balanced]``)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if only is not None:
        known = {s.key for s in settings_for(methods)}
        missing = sorted(set(only) - known)
        if missing:
            raise ValueError(f"unknown setting(s) {missing} for methods {methods}; known: {', '.join(sorted(known))}")
    ordered = ["baseline"] + [m for m in dict.fromkeys(methods) if m != "baseline"]
    out = []
    for m in ordered:
        spec = METHODS[m]
        settings = spec["settings"]
        if setting_index is not None and len(settings) > 1:
            settings = [settings[max(0, min(setting_index, len(settings) - 1))]]
        elif quick and len(settings) > 1:
            settings = [settings[QUICK_SETTING.get(m, 0)]]
        for label, params in settings:
            setting = MethodSetting(m, spec["family"], spec["provider"], label, dict(params), spec["build"])
            if only is None or m == "baseline" or setting.key in only:
                out.append(setting)
    return out
