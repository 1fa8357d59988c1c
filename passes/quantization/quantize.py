"""`quantize`: low-bit linear layers (LRQ-DiT's twin-log weights and adaptive rotations).

Explicit settings (`weights`, `activations`, `rotation`, or per-layer `layers`) apply as written;
the report gives the error measured on calibration replay where statistics were recorded. With
neither weights nor activations given, the pass chooses per layer against the PSNR budget: each
layer's sensitivity is measured (the denoiser output's error on calibration replay with only that
layer at the low format), layers go to the low format least sensitive first, the rest to W8A8,
and, when even all-W8A8 misses, the most sensitive ones stay in float; the one budget search
(ditopt.search) bisects over that ladder of plans and the end-to-end held-out check judges it.

Kept in high precision by default: everything outside the blocks (embedders, final norm and
output projection live in the prologue and epilogue) and the blocks' adaLN modulation linears.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ditopt.calibration.replay import CalibrationReplay
from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.graph import DiTGraph
from ditopt.kernels.quant import WEIGHT_BITS, hadamard, rotation_block
from ditopt.profiles.fields import Float, Int
from ditopt.registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, register_pass
from ditopt.search import BudgetSearch

from ditopt.graph import attribute

from .rewrite import LayerPlan, PreparedLayer, Site, kept, linear_sites, prepare, quantize_segment
from .stats import LayerStats, linear_input_stats

ACT_BITS = {"none": 0, "int8": 8, "int4": 4}


class QuantizeConfig(PassConfig):
    """Quantize the blocks' linear layers: as written, or chosen per layer by the budget."""

    weights: Literal["none", "int8", "int4", "tlq4", "tlq3"] | None = Field(
        None, description="weight format; with activations also unset, chosen per layer by the budget")
    activations: Literal["none", "int8", "int4"] | None = Field(None, description="dynamic per-token activation quantization")
    rotation: Literal["none", "hadamard", "smoothquant", "ars"] = Field(
        "ars", description="input transform: Hadamard folded into the weights, SmoothQuant scales, or ARS (per layer "
                           "from calibration: Hadamard, or smoothing then Hadamard where a few channels carry outliers)")
    group_size: Int = Field(64, ge=8, le=4096, description="input channels per int4 / TLQ group")
    keep: tuple[str, ...] = Field(("*embed*",), description="module path patterns (fnmatch) kept in float; the default "
                                  "keeps the embedders (diffusers' DiT runs a timestep / class embedder in every block)")
    keep_modulation: bool = Field(True, description="keep the blocks' adaLN modulation linears in float")
    low: str = Field("tlq4/int8", description="the search's low format 'weights/activations'")
    layers: dict[str, str] | None = Field(None, description="per-layer formats 'weights/activations[/rotation]' by module "
                                          "path (what the search resolves to; layers not named stay float)")
    outlier_ratio: Float = Field(8.0, gt=1, description="ARS: channel absmax over median at or above which a layer "
                                 "counts as having salient outliers (smoothing before the rotation)")
    smooth_alpha: Float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength")
    activation_scales: Literal["dynamic", "static"] = Field(
        "dynamic", description="int8 activation scales: per token at run time, or 'static': one per layer from the "
                               "calibration inputs' absmax (after the layer's rotation), what TensorRT's explicit int8 "
                               "quantization needs (it takes constant scales only); needs calibration=, int8 activations")
    integer_w8a8: bool = Field(True, description="run W8A8 layers through the int8 GEMM (torch._int_mm) rather than Q/DQ")
    margin_db: Float = Field(0.5, ge=0, description="PSNR margin over the budget on the search's samples")
    rows: Int = Field(64, ge=2, le=4096, description="calibration rows the sensitivities are measured on")

    def searched(self) -> bool:
        return self.weights is None and self.activations is None and self.layers is None

    def needs_calibration(self) -> bool:
        """Sensitivity (search) and the smoothing / ARS statistics replay calibration."""
        if self.layers is not None:  # each layer's format names its own transform
            return any(LayerPlan.parse(v).rotation in ("smoothquant", "outlier") for v in self.layers.values())
        return self.searched() or self.rotation in ("smoothquant", "ars") or self.activation_scales == "static"

    @model_validator(mode="after")
    def _valid(self) -> "QuantizeConfig":
        for text in [self.low, *(self.layers or {}).values()]:
            try:
                plan = LayerPlan.parse(text)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            if plan.weights not in WEIGHT_BITS or plan.activations not in (0, 4, 8):
                raise ValueError(f"layer format {text!r}: weights one of {', '.join(WEIGHT_BITS)}, activations none, int8 or int4")
            if plan.rotation not in ("none", "hadamard", "smoothquant", "outlier"):
                raise ValueError(f"layer format {text!r}: rotation none, hadamard, smoothquant or outlier")
        if self.activation_scales == "static":
            acts = [self.activations] if not self.searched() else [f"int{LayerPlan.parse(self.low).activations}"]
            acts += [f"int{LayerPlan.parse(v).activations}" for v in (self.layers or {}).values()]
            if "int4" in acts:
                raise ValueError("activation_scales = 'static' calibrates int8 activation scales (TensorRT's int8); "
                                 "int4 activations stay dynamic per token: use activation_scales = 'dynamic' or int8 activations")
        return self


def _rotation_for(rotation: str, site: Site, stats: LayerStats | None, ratio: float) -> str:
    if rotation != "ars":
        return rotation
    if stats is None:
        raise CalibrationError("rotation = 'ars' chooses per layer from calibration statistics: pass calibration=fn")
    return "outlier" if stats.outlier_ratio >= ratio else "hadamard"


class Quantizer:
    """Builds quantized graphs from per-site plans, preparing each (site, plan) once."""

    def __init__(self, graph: DiTGraph, config: QuantizeConfig, sites: list[Site], stats: dict[str, LayerStats] | None):
        self.graph, self.config, self.sites, self.stats = graph, config, sites, stats
        self._prepared: dict[tuple[str, LayerPlan], PreparedLayer] = {}
        self._rotations: dict[int, torch.Tensor] = {}
        self._act_scales: dict[tuple[str, str], torch.Tensor] | None = None  # (target, rotation) -> static scale

    def layer(self, site: Site, plan: LayerPlan) -> PreparedLayer:
        key = (site.target, plan)
        if key not in self._prepared:
            w = attribute(self.graph.segment(site.segment).module, site.target)
            smooth = rot = None
            if plan.rotation in ("smoothquant", "outlier"):
                if self.stats is None or site.target not in self.stats:
                    raise CalibrationError(f"rotation '{plan.rotation}' on {site.name} needs calibration statistics")
                a = self.stats[site.target].absmax.clamp_min(1e-5)
                wmax = w.detach().float().abs().amax(0).clamp_min(1e-5)
                alpha = self.config.smooth_alpha
                smooth = (a ** alpha / wmax ** (1 - alpha)).clamp(1e-2, 1e2)
            if plan.rotation in ("hadamard", "outlier"):
                n = site.in_features
                if n not in self._rotations:
                    self._rotations[n] = hadamard(n)
                rot = self._rotations[n]
            importance = None
            if rot is None and self.stats is not None and site.target in self.stats:
                # The input's channel energy weights the weight error (a rotation mixes the
                # channels, whose rotated energies calibration did not record: uniform then).
                importance = self.stats[site.target].mean_sq / (smooth ** 2 if smooth is not None else 1.0)
            self._prepared[key] = prepare(w, plan, smooth, rot, self.config.group_size, importance)
        return self._prepared[key]

    def calibrate_static(self, replay: CalibrationReplay, plan_sets: list[dict[str, LayerPlan]]) -> None:
        """One static int8 scale per (layer, input transform) the plans use: the absmax over the
        calibration rows of the layer's input after its smoothing and rotation, over 127. One
        replay of the float graph reads every layer's input."""
        wanted: dict[str, dict[str, PreparedLayer]] = {}
        for plans in plan_sets:
            for site in self.sites:
                plan = plans.get(site.target)
                if plan is not None and plan.activations == 8:
                    wanted.setdefault(site.target, {})[plan.rotation] = self.layer(site, plan)
        by_segment: dict[str, dict[str, str]] = {}
        for site in self.sites:
            if site.target in wanted:
                for node in site.nodes:
                    by_segment.setdefault(site.segment, {})[node] = site.target
        amax: dict[tuple[str, str], torch.Tensor] = {}

        def sink(target: str, x: torch.Tensor) -> None:
            x2 = x.detach().float().reshape(-1, x.shape[-1])
            for rotation, layer in wanted[target].items():
                t = x2 / layer.smooth if layer.smooth is not None else x2
                t = t @ layer.rotation if layer.rotation is not None else t
                key = (target, rotation)
                amax[key] = torch.maximum(amax.get(key, torch.zeros(())), t.abs().amax())

        replay.read(by_segment, sink)
        self._act_scales = {k: (v.clamp_min(1e-8) / 127.0).reshape(()) for k, v in amax.items()}

    @property
    def calibrated(self) -> bool:
        return self._act_scales is not None

    def static_scales(self, plans: dict[str, LayerPlan]) -> dict[str, float]:
        return {s.name: float(self._act_scales[(s.target, plans[s.target].rotation)]) for s in self.sites
                if self._act_scales is not None and s.target in plans and (s.target, plans[s.target].rotation) in self._act_scales}

    def build(self, plans: dict[str, LayerPlan], graph: DiTGraph | None = None) -> DiTGraph:
        g = graph if graph is not None else self.graph
        by_segment: dict[str, dict[str, PreparedLayer]] = {}
        scales: dict[str, torch.Tensor] = {}
        for site in self.sites:
            if site.target in plans and not plans[site.target].is_float:
                by_segment.setdefault(site.segment, {})[site.target] = self.layer(site, plans[site.target])
                key = (site.target, plans[site.target].rotation)
                if self._act_scales is not None and key in self._act_scales:
                    scales[site.target] = self._act_scales[key]
        for name, layers in by_segment.items():
            g = g.with_segment(quantize_segment(g.segment(name), layers, self.config.integer_w8a8, scales or None))
        return g


def _plan_bits(plans: dict[str, LayerPlan], sites: list[Site]) -> tuple[int, int]:
    """(weight bits as planned, weight bits in float) over the sites."""
    planned = sum(site.in_features * site.out_features * WEIGHT_BITS[plans[site.target].weights if site.target in plans else "none"]
                  for site in sites)
    return planned, sum(site.in_features * site.out_features * 32 for site in sites)


def _packed_bytes(quantizer: Quantizer, plans: dict[str, LayerPlan]) -> int:
    total = 0
    for site in quantizer.sites:
        plan = plans.get(site.target)
        if plan is None or plan.weights == "none":
            total += 4 * site.in_features * site.out_features
        else:
            total += quantizer.layer(site, plan).weight.storage_bytes()
    return total


@register_pass("quantize", QuantizeConfig, needs=("block_inputs",), level=PassLevel.NODE, lossy=True,
               example={"weights": "int8", "activations": "int8", "rotation": "hadamard"})
def quantize(graph: DiTGraph, config: QuantizeConfig, ctx: PassContext) -> PassResult:
    """Low-bit linear layers: as written, or per layer as low as the budget allows."""
    all_sites = linear_sites(graph)
    sites = [s for s in all_sites if not kept(s, config.keep, config.keep_modulation)]
    if not sites:
        return PassResult(graph, False, {"skipped": "no linear layer of the blocks is left to quantize (all kept)"})
    used = ([config.low.split("/")[0]] if config.searched() else [config.weights or "none"]
            + [LayerPlan.parse(v).weights for v in (config.layers or {}).values()])
    if any(w in ("int4", "tlq4", "tlq3") for w in used):
        bad = sorted({s.in_features for s in sites if s.in_features % config.group_size})
        if bad:
            raise InvalidProfileError(f"quantize group_size = {config.group_size} does not divide the input width "
                                      f"{bad[0]} of some layers; give a group_size that divides {', '.join(map(str, bad))}")
    if config.rotation in ("hadamard", "ars") or any("hadamard" in v or "outlier" in v for v in (config.layers or {}).values()):
        for width in sorted({s.in_features for s in sites}):
            try:
                rotation_block(width)
            except ValueError as exc:
                raise InvalidProfileError(f"quantize rotation = {config.rotation!r}: {exc}") from None
    if config.needs_calibration() and ctx.stats is None:
        raise CalibrationError("quantize needs calibration statistics (calibration=fn) to measure layer sensitivity "
                               "and activation outliers; or give weights/activations with rotation 'none' or 'hadamard'")
    replay = CalibrationReplay(graph, ctx.stats, config.rows) if CalibrationReplay.recorded(ctx.stats) else None
    stats = linear_input_stats(replay, graph, sites) if replay is not None else None
    quantizer = Quantizer(graph, config, sites, stats)
    report: dict[str, Any] = {"layers_total": len(all_sites), "layers_quantizable": len(sites),
                              "kept": sorted(s.name for s in all_sites if s not in sites)}
    if stats is not None:
        report["activation_stats"] = {s.name: stats[s.target].to_dict() for s in sites}
    search = None
    outcome = None

    def plan_of(weights: str, acts: str, site: Site) -> LayerPlan:
        rot = "none" if weights == "none" and acts == "none" else _rotation_for(
            config.rotation, site, stats.get(site.target) if stats else None, config.outlier_ratio)
        return LayerPlan(weights, ACT_BITS[acts], rot)

    if config.layers is not None:
        names = {s.name: s for s in sites}
        unknown = sorted(set(config.layers) - set(names))
        if unknown:
            raise InvalidProfileError(f"quantize layers names {unknown[0]!r}, which is not a quantizable linear of this "
                                      f"model (those are e.g. {', '.join(list(names)[:3])})")
        plans = {names[n].target: LayerPlan.parse(v) for n, v in config.layers.items()}
    elif not config.searched():
        weights, acts = config.weights or "none", config.activations or "none"
        plans = {s.target: plan_of(weights, acts, s) for s in sites}
    else:
        if replay is None:
            raise CalibrationError("quantize with only a budget measures layer sensitivity on calibration: pass calibration=fn")
        low_w, low_a = config.low.split("/")[:2]
        low = {s.target: plan_of(low_w, low_a, s) for s in sites}
        mid = {s.target: plan_of("int8", "int8", s) for s in sites}
        if config.activation_scales == "static":
            quantizer.calibrate_static(replay, [low, mid])
        sens_low = {s.target: replay.error(quantizer.build({s.target: low[s.target]})).total for s in sites}
        sens_mid = {s.target: replay.error(quantizer.build({s.target: mid[s.target]})).total for s in sites}
        report["sensitivity"] = {s.name: {config.low: sens_low[s.target], "int8/int8": sens_mid[s.target]} for s in sites}
        order_low = sorted(sites, key=lambda s: sens_low[s.target])
        order_mid = sorted(sites, key=lambda s: sens_mid[s.target])
        # Cheapest first: k least sensitive layers low and the rest W8A8 (k = all .. 0), then j
        # least sensitive at W8A8 and the rest float (j = all-1 .. 0).
        settings: list[tuple[str, int]] = [("low", k) for k in range(len(sites), -1, -1)]
        settings += [("mid", j) for j in range(len(sites) - 1, -1, -1)]

        def plans_for(setting: tuple[str, int]) -> dict[str, LayerPlan]:
            kind, k = setting
            if kind == "low":
                chosen = {s.target for s in order_low[:k]}
                return {s.target: low[s.target] if s.target in chosen else mid[s.target] for s in sites}
            chosen = {s.target for s in order_mid[:k]}
            return {s.target: mid[s.target] for s in sites if s.target in chosen}

        def key(setting: tuple[str, int]) -> tuple:
            return ("quantize", config.low, config.rotation, setting)

        search = BudgetSearch.start(ctx, "quantize", config.margin_db, what="without weights or activations")
        chosen = search.cheapest(settings, key=key,
                                 build=lambda st: (lambda g: quantizer.build(plans_for(st), g)),
                                 describe=lambda st: {"setting": f"{st[1]} layers {config.low if st[0] == 'low' else 'int8/int8'}, "
                                                      f"rest {'int8/int8' if st[0] == 'low' else 'float'}"})
        report["trials"] = search.trials
        report["target_psnr_db"] = search.target_psnr_db
        if chosen is None:
            report["skipped"] = (f"even one layer at W8A8 misses the target of {search.target_psnr_db:.2f} dB on the "
                                 "search's samples; nothing quantized")
            return PassResult(graph, False, report)
        plans = plans_for(chosen)
        report["predicted_psnr_db"] = search.memo[key(chosen)]
        report["chosen"] = {"setting": list(chosen)}
    plans = {t: p for t, p in plans.items() if not p.is_float}
    if not plans:
        return PassResult(graph, False, {**report, "skipped": "every layer planned in float"})
    if config.activation_scales == "static":
        if replay is None:
            raise CalibrationError("quantize activation_scales = 'static' calibrates the scales on the recorded block "
                                   "inputs: pass calibration=fn")
        if not quantizer.calibrated:
            quantizer.calibrate_static(replay, [plans])
        report["static_activation_scales"] = quantizer.static_scales(plans)
    quantized = quantizer.build(plans)
    bits, float_bits = _plan_bits(plans, sites)
    packed = _packed_bytes(quantizer, plans)
    gemm = sum(1 for p in plans.values() if p.runs_int8_gemm(config.integer_w8a8))
    report.update({
        "formats": {s.name: plans[s.target].label if s.target in plans else "float" for s in sites},
        "weight_bits_mean": bits / sum(s.in_features * s.out_features for s in sites),
        "weight_bytes_float": float_bits // 8, "weight_bytes_packed": packed,
        "weight_compression": (float_bits / 8) / packed,
        "execution": {"int8_gemm": gemm, "fake_quant": len(plans) - gemm},
        "execution_note": ("W8A8 layers run the int8 GEMM; other formats run as Q/DQ (codes and scales held and decoded per "
                           "call, a float GEMM); packed bytes count TLQ as its 6 parameters per group, while the runtime "
                           "and the ONNX export hold its decoded table"),
    })
    if replay is not None:
        report["replayed_error"] = replay.error(quantized).to_dict()
    resolved = config.model_copy(update={"layers": {s.name: plans[s.target].label for s in sites if s.target in plans},
                                         "weights": None, "activations": None})
    if search is not None:
        outcome = PassOutcome(predicted_psnr_db=report["predicted_psnr_db"], target_psnr_db=search.target_psnr_db,
                              saving=None)
    # Replays at other call shapes reuse these prepared (rotated, quantized) weights.
    return PassResult(quantized, True, report, replay=("quantize", resolved), outcome=outcome,
                      rewrite=lambda g: quantizer.build(plans, g))


__all__ = ["QuantizeConfig", "quantize"]
