"""`moe_split`: dense FFNs into routed experts (Dense2MoE / MoEfication without training).

Each chosen FFN's hidden neurons are split into `shared_experts + experts` equal groups from
calibration statistics (ditopt.passes.moe.split): the shared group always runs, each token runs
the `top_k` routed experts a least-squares router scores highest, and the expert outputs are
summed, so that at top_k = experts the FFN is the dense one exactly. The rewrite replaces the
FFN by `ditopt::moe_ffn` (kernels.moe: tokens grouped by expert, one GEMM pair per expert).

`top_k` (all FFNs) or `layers` ({FFN module path: top_k}) apply as written. With neither, the
pass chooses top_k per FFN against the PSNR budget: each FFN's error at each k is measured on
calibration replay (only that FFN split), a ladder of plans is built from all-FFNs-at-k=1 to
dense by raising, one step at a time, the k of the FFN with the largest error reduction per
activated neuron added, and the one budget search (ditopt.search) bisects over it; the held-out
check judges the choice end to end. GELU FFNs are not sparse like ReLU ones: what k holds the
budget is measured, not assumed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ditopt.calibration.replay import CalibrationReplay
from ditopt.errors import CalibrationError, InvalidProfileError, UnsupportedModelError
from ditopt.graph import DiTGraph, attribute
from ditopt.kernels.moe import activate, activated_parameters
from ditopt.profiles.fields import Float, Int
from ditopt.registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, register_pass
from ditopt.search import BudgetSearch

from .rewrite import FFN, ExpertWeights, find_ffns, has_routed_experts, kept, rewrite_segment
from .split import distill_experts, skip_offsets, split_ffn, split_stats


class MoESplitConfig(PassConfig):
    """Split the blocks' dense FFNs into routed experts: top_k as written, or per FFN by the budget."""

    experts: Int = Field(7, ge=2, le=256, description="routed experts per FFN (with the default shared expert: 8 equal "
                         "groups of neurons, which divides the usual power-of-two and 4x widths)")
    shared_experts: Int = Field(1, ge=0, le=64, description="expert-sized groups of neurons every token runs "
                                "(the most active ones; DiT-MoE finds a shared expert essential)")
    top_k: Int | None = Field(None, ge=1, description="routed experts per token for every FFN; unset with `layers` "
                              "unset: chosen per FFN by the budget")
    layers: dict[str, int] | None = Field(None, description="top_k per FFN by module path (what the search resolves "
                                          "to; FFNs not named stay dense)")
    keep: tuple[str, ...] = Field((), description="FFN module path patterns (fnmatch) kept dense")
    clustering: Literal["coactivation", "weights"] = Field(
        "coactivation", description="group neurons by their contribution pattern on calibration tokens, or by the "
                                    "direction of their up-projection rows")
    ridge: Float = Field(1e-3, ge=0, description="router least-squares damping (times the mean diagonal)")
    margin_db: Float = Field(0.5, ge=0, description="PSNR margin over the budget on the search's samples")
    rows: Int = Field(64, ge=2, le=4096, description="calibration rows the split and the errors are measured on")
    tokens_per_row: Int = Field(32, ge=1, le=65536, description="tokens of each calibration row the split, router "
                                "and distillation fit on")
    distill_steps: Int = Field(0, ge=0, le=100000, description="Adam steps training each split FFN's experts towards "
                               "the dense FFN's outputs on calibration tokens (0: training-free)")
    distill_lr: Float = Field(1e-3, gt=0, le=1, description="distillation learning rate")
    seed: Int = Field(0, ge=0, description="clustering initialisation")

    def searched(self) -> bool:
        return self.top_k is None and self.layers is None

    def needs_calibration(self) -> bool:
        """The split, the router and the search all read calibration activations."""
        return True

    @model_validator(mode="after")
    def _valid(self) -> "MoESplitConfig":
        for where, k in [("top_k", self.top_k)] + [(f"layers[{n!r}]", v) for n, v in (self.layers or {}).items()]:
            if k is not None and not 1 <= k <= self.experts:
                raise ValueError(f"moe_split {where} = {k}: a token runs between 1 and experts = {self.experts} "
                                 "routed experts")
        if self.top_k is not None and self.layers is not None:
            raise ValueError("moe_split: give top_k (every FFN) or layers (per FFN), not both")
        return self


def _split_width(ffn: FFN, config: MoESplitConfig) -> int:
    groups = config.experts + config.shared_experts
    if ffn.hidden % groups:
        fits = [g for g in range(2, min(ffn.hidden, 257)) if ffn.hidden % g == 0]
        raise InvalidProfileError(
            f"moe_split: {ffn.name} has {ffn.hidden} hidden neurons, which do not split into experts + shared_experts = "
            f"{groups} equal groups; choose experts + shared_experts among {', '.join(map(str, fits[:12]))}")
    return ffn.hidden // groups


class Splitter:
    """The experts of every FFN (split once; distilled once per k when asked for), and the
    graphs with any subset of the FFNs routed at some k."""

    def __init__(self, graph: DiTGraph, ffns: list[FFN], config: MoESplitConfig, inputs: dict[str, torch.Tensor]):
        self.graph, self.ffns, self.config, self.inputs = graph, ffns, config, inputs
        self.dense: dict[str, tuple] = {}
        self.split: dict[str, ExpertWeights] = {}
        self.at_k: dict[tuple[str, int], ExpertWeights] = {}
        self.distill_log: dict[str, dict[str, float]] = {}
        for ffn in ffns:
            module = graph.segment(ffn.segment).module
            get = lambda t: attribute(module, t).detach().float() if t is not None else None  # noqa: E731
            self.dense[ffn.name] = (get(ffn.w1), get(ffn.b1), get(ffn.w2), get(ffn.b2))
            shared = config.shared_experts * _split_width(ffn, config)
            self.split[ffn.name] = split_ffn(inputs[ffn.name], *self.dense[ffn.name], ffn.activation, config.experts,
                                             shared, config.clustering, config.ridge, config.seed)

    def experts_at(self, ffn: FFN, k: int) -> ExpertWeights:
        """The split of `ffn` for routing at k: skip offsets for that k, then distilled if asked."""
        if (ffn.name, k) not in self.at_k:
            x = self.inputs[ffn.name]
            w = skip_offsets(x, self.split[ffn.name], ffn.activation, k)
            if self.config.distill_steps:
                w1, b1, w2, b2 = self.dense[ffn.name]
                y = activate(x @ w1.T + (b1 if b1 is not None else 0), ffn.activation) @ w2.T + (b2 if b2 is not None else 0)
                w, self.distill_log[f"{ffn.name}@{k}"] = distill_experts(
                    x, y, w, ffn.activation, k, self.config.distill_steps, self.config.distill_lr, seed=self.config.seed)
            self.at_k[(ffn.name, k)] = w
        return self.at_k[(ffn.name, k)]

    def release(self, ks: dict[str, int]) -> None:
        """Keep only the experts `build(ks, graph)` uses; the calibration tokens go."""
        self.inputs = {}
        self.at_k = {k: w for k, w in self.at_k.items() if ks.get(k[0]) == k[1]}

    def build(self, ks: dict[str, int], graph: DiTGraph | None = None) -> DiTGraph:
        g = graph if graph is not None else self.graph
        by_segment: dict[str, dict[str, tuple]] = {}
        for ffn in self.ffns:
            k = ks.get(ffn.name)
            if k is not None and k < self.config.experts:
                by_segment.setdefault(ffn.segment, {})[ffn.down] = (ffn, self.experts_at(ffn, k), k)
        for name, splits in by_segment.items():
            g = g.with_segment(rewrite_segment(g.segment(name), splits))
        return g


def _ladder(ffns: list[FFN], errors: dict[str, dict[int, float]], experts: int) -> list[dict[str, int]]:
    """Plans from every FFN at k = 1 towards dense, cheapest first: each step raises the k of the
    FFN whose measured error falls most per activated neuron added. The dense plan is left out."""
    ks = {f.name: 1 for f in ffns}
    cost = {f.name: f.width * (f.hidden // experts) for f in ffns}  # neurons x width per routed expert (about)
    plans = [dict(ks)]
    while True:
        open_ = [f for f in ffns if ks[f.name] < experts]
        if not open_:
            break
        best = max(open_, key=lambda f: (errors[f.name][ks[f.name]] - errors[f.name].get(ks[f.name] + 1, 0.0)) / cost[f.name])
        ks[best.name] += 1
        if all(v == experts for v in ks.values()):
            break
        plans.append(dict(ks))
    return plans


@register_pass("moe_split", MoESplitConfig, needs=("block_inputs",), level=PassLevel.NODE, lossy=True,
               example={"experts": 3, "shared_experts": 1, "top_k": 1})
def moe_split(graph: DiTGraph, config: MoESplitConfig, ctx: PassContext) -> PassResult:
    """Dense FFNs into routed experts: top_k as written, or per FFN as low as the budget allows."""
    already = has_routed_experts(graph)
    if already is not None and "moe_ffn" in already:
        raise InvalidProfileError(f"moe_split: the FFNs are already split (ditopt::moe_ffn in {already.split(' (')[0]}); "
                                  "a profile lists moe_split once")
    if already is not None:
        raise UnsupportedModelError(f"moe_split: the model already routes tokens in {already}; splitting its FFNs again "
                                    "is not supported: drop moe_split from the profile")
    found, skipped = find_ffns(graph)
    if not found:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the blocks have no FFN"
        raise UnsupportedModelError(f"moe_split found no dense FFN (up projection, activation, down projection) to "
                                    f"split in the blocks ({why}); drop moe_split from the profile")
    ffns = [f for f in found if not kept(f, config.keep)]
    if config.layers is not None:
        names = {f.name for f in ffns}
        unknown = sorted(set(config.layers) - names)
        if unknown:
            raise InvalidProfileError(f"moe_split layers names {unknown[0]!r}, which is not a splittable FFN of this model "
                                      f"(those are e.g. {', '.join(sorted(names)[:3])})")
    if not ffns:
        return PassResult(graph, False, {"skipped": "every FFN is kept dense (keep patterns)", "not_split": skipped})
    for ffn in ffns:
        _split_width(ffn, config)
    if not CalibrationReplay.recorded(ctx.stats):
        raise CalibrationError("moe_split splits FFNs and fits their routers on calibration activations: pass "
                               "calibration=fn (a function that samples with the model)")
    replay = CalibrationReplay(graph, ctx.stats, config.rows, seed=config.seed)
    inputs = replay.node_inputs(_by_segment(ffns), per_row=config.tokens_per_row)
    splitter = Splitter(graph, ffns, config, inputs)
    report: dict[str, Any] = {"ffns_total": len(found), "ffns_splittable": len(ffns), "experts": config.experts,
                              "shared_experts": config.shared_experts}
    if skipped:
        report["not_split"] = skipped
    search = outcome = None
    if config.layers is not None:
        ks = dict(config.layers)
    elif config.top_k is not None:
        ks = {f.name: config.top_k for f in ffns}
    else:
        errors = {f.name: {k: replay.error(splitter.build({f.name: k})).total for k in range(1, config.experts)}
                  for f in ffns}
        for f in ffns:
            errors[f.name][config.experts] = 0.0
        report["sensitivity"] = {name: {str(k): v for k, v in e.items()} for name, e in errors.items()}
        plans = _ladder(ffns, errors, config.experts)

        def key(i: int) -> tuple:
            return ("moe_split", config.experts, config.shared_experts, config.clustering, config.seed, config.rows,
                    config.tokens_per_row, config.distill_steps, config.distill_lr, tuple(sorted(plans[i].items())))

        search = BudgetSearch.start(ctx, "moe_split", config.margin_db, what="without top_k or layers")
        chosen = search.cheapest(list(range(len(plans))), key=key,
                                 build=lambda i: (lambda g: splitter.build(plans[i], g)),
                                 describe=lambda i: {"setting": f"top_k {plans[i]}"})
        report["trials"] = search.trials
        report["target_psnr_db"] = search.target_psnr_db
        if chosen is None:
            report["skipped"] = (f"even one FFN routed at k = {config.experts - 1} of {config.experts} misses the target "
                                 f"of {search.target_psnr_db:.2f} dB on the search's samples; every FFN stays dense")
            return PassResult(graph, False, report)
        ks = plans[chosen]
        report["predicted_psnr_db"] = search.memo[key(chosen)]
    ks = {n: k for n, k in ks.items() if k < config.experts}
    if not ks:
        return PassResult(graph, False, {**report, "skipped": "every FFN planned dense (top_k = experts)"})
    routed = splitter.build(ks)
    layers: dict[str, Any] = {}
    dense_total = active_total = 0
    for ffn in ffns:
        dense_total += ffn.parameters
        k = ks.get(ffn.name)
        if k is None:
            active_total += ffn.parameters
            continue
        w = splitter.experts_at(ffn, k)
        active = activated_parameters(ffn.width, ffn.hidden, w.shared, w.experts, k)
        active_total += active
        st = split_stats(inputs[ffn.name], w, ffn.activation, k)
        layers[ffn.name] = {
            "top_k": k, "shared_neurons": w.shared, "neurons_per_expert": (ffn.hidden - w.shared) // w.experts,
            # per token: the weights it multiplies by, i.e. its multiply-adds (router included)
            "activated_parameters": {"dense": ffn.parameters, "routed": active},
            "load": st.load, "load_max_over_mean": max(st.load) * w.experts,
            "router_captured": st.captured, "oracle_captured": st.oracle_captured,
        }
    report.update({
        "layers": layers,
        "activated_ffn_parameters": {"dense": dense_total, "routed": active_total,
                                     "fewer": 1.0 - active_total / dense_total},
        "replayed_error": replay.error(routed).to_dict(),
        "fitted_on_tokens": int(next(iter(inputs.values())).shape[0]),
        "execution_note": "CPU/GPU: tokens grouped by expert, one GEMM pair per expert (Triton grouped GEMM on CUDA); "
                          "an exported ONNX artifact computes every expert and masks (same outputs, no speed-up)",
    })
    if splitter.distill_log:
        report["distillation"] = {"steps": config.distill_steps, "lr": config.distill_lr, "fits": splitter.distill_log}
    resolved = config.model_copy(update={"layers": dict(ks), "top_k": None})
    if search is not None:
        outcome = PassOutcome(predicted_psnr_db=report["predicted_psnr_db"], target_psnr_db=search.target_psnr_db,
                              saving=None)
    # Replays at other call shapes reuse these experts and routers (split and distilled once);
    # the calibration tokens and the unchosen splits are not kept alive by the optimized module.
    splitter.release(ks)
    return PassResult(routed, True, report, replay=("moe_split", resolved), outcome=outcome,
                      rewrite=lambda g: splitter.build(ks, g))


def _by_segment(ffns: list[FFN]) -> dict[str, dict[str, str]]:
    """{segment: {up node: FFN name}} (a dual block's two FFNs share a segment)."""
    out: dict[str, dict[str, str]] = {}
    for f in ffns:
        out.setdefault(f.segment, {})[f.up] = f.name
    return out


__all__ = ["MoESplitConfig", "moe_split"]
