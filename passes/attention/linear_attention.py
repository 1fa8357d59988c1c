"""`linear_attention`: chosen self-attention layers replaced by linear attention, trained by
self-distillation on calibration activations (LiT / SANA form).

The replacement keeps the layer's q/k/v/o projections (initialised from the original weights)
and swaps softmax(q k^T) v for phi(q) (phi(k)^T v) / (phi(q) . sum phi(k)) plus a depthwise
convolution of the values on the image grid (`ditopt::linear_attention`, kernels.linear_attention):
O(N D^2) per head instead of O(N^2 D). Linear attention is not a drop-in approximation of a
trained softmax layer, so each candidate layer is distilled block-wise: the block with the
substitute (its attention's projections and the new convolution trainable, everything else
frozen) is trained with Adam towards the original block's outputs on the block inputs recorded
during calibration (ditopt.distill; the original block is the teacher, a held-out quarter of the
batches keeps the best state).

Which layers, and the feature map per layer, come from measurement: each candidate layer is
distilled with each feature map, the denoiser output's error with only that layer replaced is
measured on calibration replay, a layer takes its better feature map, and the one budget search
(ditopt.search) bisects over the ladder "the k layers of least error" (k from all to one); the
held-out check judges the choice end to end. `layers` ({block: feature}) applies as written
(what the search resolves to; distillation re-runs, deterministic under `seed`).

Then end to end (`joint_steps`): the layer-wise fits each assume the other blocks are exact, so
errors compound through the stack. The joint stage trains every replaced layer of a candidate set
together (the same tensors, starting from their layer-wise fits) through the whole block stack
toward the original model's denoiser output on `joint_rows` calibration rows, so a later layer
learns to absorb an earlier one's error. It runs per candidate set the search measures (cached), so
the search judges the jointly trained model it would ship.

Not done here: CLEAR's local-window form (ditopt's windowed alternative is `neighborhood_attention`).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator

from ditopt.calibration.replay import CalibrationReplay
from ditopt.distill import distill, plain_copy, relative_error
from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.graph import AttentionSite, DiTGraph, attribute
from ditopt.kernels.linear_attention import FEATURES, linear_attention_macs
from ditopt.profiles.fields import Float, Int
from ditopt.registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, register_pass
from ditopt.search import BudgetSearch, prefix_ladder

from .rewrite import replace_attention, substitutable, substituted
from .substitution import attention_flops

Feature = Literal["relu", "elu"]
CONV = "_ditopt_linear_attention_conv"


class LinearAttentionConfig(PassConfig):
    """Self-attention layers into distilled linear attention: `layers` as written, or chosen by the budget."""

    feature: Literal["relu", "elu", "auto"] = Field(
        "auto", description="kernel feature map phi: ReLU, ELU + 1, or auto (per layer, the one whose distilled "
                            "layer measures the lower error)")
    layers: dict[str, Feature] | None = Field(
        None, description="{block index: feature map} replaced as written (what the search resolves to); unset: "
                          "chosen by the budget")
    conv_size: Int = Field(3, ge=1, le=9, description="edge of the depthwise value convolution (odd)")
    distill_steps: Int = Field(200, ge=0, le=100000, description="Adam steps distilling each replaced block "
                               "towards the original block (0: the substitute as initialised, zero convolution)")
    distill_lr: Float = Field(1e-3, gt=0, le=1, description="distillation learning rate")
    rows: Int = Field(16, ge=2, le=4096, description="calibration rows (trajectory, step) distilled and measured on")
    joint_steps: Int = Field(0, ge=0, le=100000, description="Adam steps training the replaced layers together "
                             "through the whole block stack toward the model's output, after the layer-wise stage "
                             "(0: layer-wise only)")
    joint_rows: Int = Field(64, ge=2, le=4096, description="calibration rows the joint stage trains and judges on")
    joint_lr: Float = Field(1e-4, gt=0, le=1, description="joint stage learning rate (it starts from fitted layers: "
                            "at the layer-wise rate 1e-3 no held-out check improved on dit-canvas)")
    margin_db: Float = Field(0.5, ge=0, description="PSNR margin over the budget on the search's samples")
    seed: Int = Field(0, ge=0, description="calibration rows drawn and distillation batch order")

    def searched(self) -> bool:
        return self.layers is None

    def needs_calibration(self) -> bool:
        """The search and the distillation read calibration activations; `layers` without
        distillation is the bare rewrite."""
        return self.searched() or self.distill_steps > 0 or self.joint_steps > 0

    @model_validator(mode="after")
    def _valid(self) -> "LinearAttentionConfig":
        if self.conv_size % 2 == 0:
            raise ValueError(f"linear_attention conv_size = {self.conv_size}: an odd edge keeps each token centred")
        for key in self.layers or {}:
            if not key.isdigit():
                raise ValueError(f"linear_attention layers key {key!r}: a block index such as '3'")
        if self.layers == {}:
            raise ValueError("linear_attention layers = {}: name at least one block, or leave it unset to search")
        return self


def _sites(graph: DiTGraph) -> tuple[dict[int, AttentionSite], dict[int, str]]:
    """Per block, its one self/joint attention the op can replace; and why the others cannot."""
    ok, why = {}, {}
    for block in graph.blocks:
        for site in block.attention:
            reason = substitutable(graph, site)
            if reason is None and substituted(graph, block.index, site) is not None:
                reason = "already substituted"
            if reason is None and block.index not in ok:
                ok[block.index] = site
            elif reason is not None:
                why.setdefault(block.index, reason)
    for b in ok:
        why.pop(b, None)
    return ok, why


def _set_parameter(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, last = target.split(".")
    parent = attribute(module, ".".join(path)) if path else module
    setattr(parent, last, torch.nn.Parameter(value.detach().clone(), requires_grad=False))


class LinearRewriter:
    """Replacements of single blocks' attention, distilled once per (block, feature), and
    graphs with any set of them."""

    def __init__(self, graph: DiTGraph, sites: dict[int, AttentionSite], config: LinearAttentionConfig,
                 replay: CalibrationReplay | None, stats: Any = None):
        self.graph, self.sites, self.config, self.replay, self.stats = graph, sites, config, replay, stats
        self.states: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.logs: dict[str, dict[str, float]] = {}
        self._io: dict[int, list] | None = None
        # The joint stage: per candidate set (sorted (block, feature) pairs), per block its tensors.
        self.joint_states: dict[tuple, dict[int, dict[str, torch.Tensor]]] = {}
        self.joint_logs: dict[str, dict[str, Any]] = {}
        self._joint_data: list | None = None

    def _conv_name(self, site: AttentionSite) -> str:
        return f"{CONV}_{site.node}"

    def rewrite(self, graph: DiTGraph, block: int, feature: str, state: dict[str, torch.Tensor] | None) -> DiTGraph:
        """`graph` with block `block`'s attention (and its copies an earlier pass made) replaced,
        holding `state`'s tensors (the distilled ones) or the initial ones."""
        site = next(s for s in graph.blocks[block].attention if s.node == self.sites[block].node)
        h, w = graph.grid
        weights = {self._conv_name(site): torch.zeros(site.heads, site.head_dim, self.config.conv_size, self.config.conv_size)}
        record = {"pattern": "linear", "tile": 1, "feature": feature, "conv_size": self.config.conv_size,
                  "kind": site.kind, "dense_steps": 0}
        args = lambda n_text, scale: (h, w, n_text, feature, 1e-6)  # noqa: E731
        op = torch.ops.ditopt.linear_attention.default
        new = replace_attention(graph, block, site, op, args, record, weights=weights)
        if new is None:
            raise InvalidProfileError(f"linear_attention: block {block}'s attention is masked, causal or has dropout; "
                                      "leave it out of layers")
        names = [s.name for s in new.segments if s.block == block and (s.kind == "block" or (
            s.kind == "variant" and not new.is_early_variant(s)))]
        for name in names:
            if name != new.segment_for_block(block).name:
                copied = replace_attention(new, block, site, op, args, record, segment=name, weights=weights)
                new = copied if copied is not None else new
            if state:
                seg = new.segment(name)
                module = fx.GraphModule(seg.module, copy.deepcopy(seg.module.graph))
                for target, value in state.items():
                    _set_parameter(module, target, value)
                new = new.with_segment(seg.replace_module(module))
        return new

    def distilled(self, block: int, feature: str) -> dict[str, torch.Tensor] | None:
        """The trained tensors of block `block` with `feature` (None without distillation)."""
        if not self.config.distill_steps:
            return None
        if (block, feature) not in self.states:
            self.states[(block, feature)] = self._distill(block, feature)
        return self.states[(block, feature)]

    def _targets(self, module: torch.nn.Module, block: int) -> list[str]:
        """What trains in block `block`: its attention's projections and the new convolution."""
        site = self.sites[block]
        prefix = site.module + "."
        return sorted({n.target for n in module.graph.nodes if n.op == "get_attr" and (
            n.target.startswith(prefix) or n.target == self._conv_name(site))
            and attribute(module, n.target).is_floating_point()})

    def _distill(self, block: int, feature: str) -> dict[str, torch.Tensor]:
        if self._io is None:
            self._io = self.replay.block_io(set(self.sites))
        # optimize may run inside inference mode, and calibration's tensors may be inference tensors:
        # autograd needs plain copies of the data and of the student's frozen weights.
        with torch.inference_mode(False):
            io = [(tuple(_plain(a) for a in args), tuple(_plain(o) for o in outs)) for args, outs in self._io[block]]
            student = plain_copy(self.rewrite(self.graph, block, feature, None).segment_for_block(block).module)
        params = {t: attribute(student, t) for t in self._targets(student, block)}
        held = max(1, len(io) // 4) if len(io) > 1 else 0
        train, judge = io[held:] or io, io[:held] or io

        def run(live: dict[str, torch.Tensor], args: tuple) -> tuple:
            return tuple(torch.func.functional_call(student, live, args))

        def loss(live, i):
            args, want = train[i]
            got = run(live, args)
            return sum(relative_error(g, w) for g, w in zip(got, want) if w.is_floating_point())

        def held_out(live):
            return float(sum(sum(relative_error(g, w) for g, w in zip(run(live, a), want) if w.is_floating_point())
                             for a, want in judge) / len(judge))

        state, log = distill(params, loss, held_out, self.config.distill_steps, len(train), self.config.distill_lr,
                             self.config.seed + block)
        self.logs[f"{block}:{feature}"] = log
        return state

    def layerwise(self, plan: dict[int, str], graph: DiTGraph) -> DiTGraph:
        """`graph` with `plan`'s layers as the layer-wise stage left them (what ranks the layers:
        the joint stage runs only on the sets the search measures)."""
        for block, feature in sorted(plan.items()):
            graph = self.rewrite(graph, block, feature, self.distilled(block, feature))
        return graph

    def jointly_trained(self, plan: dict[int, str]) -> dict[int, dict[str, torch.Tensor]]:
        """Per block of `plan`, its tensors after the joint stage (trained once per plan)."""
        key = tuple(sorted(plan.items()))
        if key not in self.joint_states:
            self.joint_states[key] = self._joint(plan)
        return self.joint_states[key]

    def _joint(self, plan: dict[int, str]) -> dict[int, dict[str, torch.Tensor]]:
        start = self.layerwise(plan, self.graph)
        segments = [s for s in start.main_segments if s.kind != "prologue"]
        outputs = [o for o in start.signature.outputs if isinstance(o, str)]
        with torch.inference_mode(False):
            if self._joint_data is None:  # per batch of rows: the stack's inputs, the original's outputs
                replay = CalibrationReplay(self.graph, self.stats, self.config.joint_rows, seed=self.config.seed)
                refs = replay.reference()
                self._joint_data = [({n: _plain(v) for n, v in env.items()}, [_plain(o) for o in ref])
                                    for (_, env), ref in zip(replay.envs(), refs)]
            data = self._joint_data
            # Frozen segments too: autograd saves their weights, which are inference tensors when
            # optimize runs (or the graph was rewritten) inside inference mode.
            modules = {s.name: plain_copy(s.module) if (s.kind == "block" and s.block in plan) or _holds_inference(s.module)
                       else s.module for s in segments}
        targets = {b: self._targets(modules[start.segment_for_block(b).name], b) for b in plan}
        params = {f"{b}|{t}": attribute(modules[start.segment_for_block(b).name], t) for b in plan for t in targets[b]}

        def forward(live: dict[str, torch.Tensor], env0: dict[str, Any]) -> list[torch.Tensor]:
            env = dict(env0)
            for seg in segments:
                args = tuple(env[n] for n in seg.inputs)
                if seg.kind == "block" and seg.block in plan:
                    out = torch.func.functional_call(modules[seg.name], {t: live[f"{seg.block}|{t}"]
                                                                         for t in targets[seg.block]}, args)
                else:
                    out = modules[seg.name](*args)
                env.update(zip(seg.outputs, out))
            return [env[o] for o in outputs]

        def row_errors(live: dict[str, torch.Tensor], env0: dict[str, Any], want: list) -> torch.Tensor:
            got = forward(live, env0)
            num = sum((g.float() - w.float()).pow(2).flatten(1).sum(1) for g, w in zip(got, want) if w.is_floating_point())
            den = sum(w.float().pow(2).flatten(1).sum(1) for w in want if w.is_floating_point())
            return num / den.clamp_min(1e-30)

        # Each row's error is counted relative to its error after the layer-wise stage: the rows
        # that are accurate already (the early, high-noise steps here) move the final sample
        # most per unit of error (measured on dit-canvas: the first 5 of 50 steps replaced alone
        # cost as much PSNR as the last 5 at a thousandth of their error), so a plain energy-
        # weighted loss would trade them away for the rows with the largest error.
        with torch.inference_mode(False), torch.no_grad():
            start_rows = [row_errors(params, env0, want).clamp_min(1e-12) for env0, want in data]

        def error(live: dict[str, torch.Tensor], i: int) -> torch.Tensor:
            env0, want = data[i]
            return (row_errors(live, env0, want) / start_rows[i]).mean()

        held = max(1, len(data) // 4) if len(data) > 1 else 0
        train = list(range(held, len(data))) or [0]
        judge = list(range(held)) or [0]
        state, log = distill(params, lambda live, i: error(live, train[i]),
                             lambda live: float(sum(float(error(live, i)) for i in judge) / len(judge)),
                             self.config.joint_steps, len(train), self.config.joint_lr, self.config.seed)
        self.joint_logs[",".join(f"{b}:{f}" for b, f in sorted(plan.items()))] = {
            **log, "loss": "row error over its layer-wise error", "rows": sum(int(r.numel()) for r in start_rows),
            "held_out_batches": len(judge)}
        return {b: {t: state[f"{b}|{t}"] for t in targets[b]} for b in plan}

    def release(self, plan: dict[int, str]) -> None:
        """Keep only `plan`'s trained tensors (the calibration data and the other fits go);
        `build(plan, graph)` still works."""
        if self.config.joint_steps:
            self.jointly_trained(plan)
        self.replay, self._io, self.graph, self.stats, self._joint_data = None, None, None, None, None
        self.states = {k: v for k, v in self.states.items() if plan.get(k[0]) == k[1]}
        key = tuple(sorted(plan.items()))
        self.joint_states = {k: v for k, v in self.joint_states.items() if k == key}

    def build(self, plan: dict[int, str], graph: DiTGraph | None = None) -> DiTGraph:
        """`graph` (the pass's input by default) with `plan`'s layers replaced: jointly trained
        with `joint_steps`, else as the layer-wise stage left them."""
        g = graph if graph is not None else self.graph
        if not self.config.joint_steps:
            return self.layerwise(plan, g)
        joint = self.jointly_trained(plan)
        for block, feature in sorted(plan.items()):
            g = self.rewrite(g, block, feature, joint[block])
        return g


def _plain(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _holds_inference(module: torch.nn.Module) -> bool:
    return any(t.is_inference() for t in (*module.parameters(), *module.buffers())) or any(
        isinstance(v, torch.Tensor) and v.is_inference() for m in module.modules() for v in vars(m).values())


@register_pass("linear_attention", LinearAttentionConfig, needs=("block_inputs",), level=PassLevel.NODE, lossy=True,
               example={"layers": {"0": "elu"}, "distill_steps": 4, "rows": 4})
def linear_attention(graph: DiTGraph, config: LinearAttentionConfig, ctx: PassContext) -> PassResult:
    """Self-attention layers into distilled linear attention, as many as the budget allows."""
    sites, why = _sites(graph)
    if config.layers is not None:
        unknown = [int(b) for b in config.layers if int(b) not in sites]
        if unknown:
            b = unknown[0]
            reason = why.get(b, f"the model has blocks 0..{len(graph.blocks) - 1}")
            if reason == "already substituted":
                return PassResult(graph, False, {"skipped": f"block {b}'s attention is already substituted"})
            raise InvalidProfileError(f"linear_attention layers names block {b}, whose attention cannot be replaced "
                                      f"({reason}); replaceable blocks: {sorted(sites) or 'none'}")
    if not sites:
        reasons = "; ".join(f"block {b}: {r}" for b, r in sorted(why.items())) or "no attention"
        return PassResult(graph, False, {"skipped": f"no self-attention layer to replace ({reasons})"})
    replay = None
    if config.needs_calibration():
        if not CalibrationReplay.recorded(ctx.stats):
            raise CalibrationError("linear_attention distils and measures its layers on calibration activations: pass "
                                   "calibration=fn (a function that samples with the model), or give layers with "
                                   "distill_steps = 0")
    if CalibrationReplay.recorded(ctx.stats):  # without distillation too: the report's replayed error
        replay = CalibrationReplay(graph, ctx.stats, config.rows, seed=config.seed)
    rewriter = LinearRewriter(graph, sites, config, replay, ctx.stats)
    features = FEATURES if config.feature == "auto" else (config.feature,)
    report: dict[str, Any] = {"candidates": sorted(sites), "kept_dense": {str(b): r for b, r in sorted(why.items())}}
    search = None
    if config.layers is not None:
        plan = {int(b): f for b, f in config.layers.items()}
    else:
        errors: dict[int, dict[str, float]] = {
            b: {f: replay.error(rewriter.layerwise({b: f}, graph)).total for f in features} for b in sorted(sites)}
        best = {b: min(features, key=lambda f: (e[f], features.index(f))) for b, e in errors.items()}
        report["sensitivity"] = {str(b): e for b, e in errors.items()}
        least = {b: errors[b][best[b]] for b in errors}
        plans = prefix_ladder(sorted(least, key=lambda b: (least[b], b)))  # the k layers of least error

        def key(i: int) -> tuple:
            return ("linear_attention", config.conv_size, config.distill_steps, config.distill_lr, config.rows,
                    config.joint_steps, config.joint_rows, config.joint_lr, config.seed, tuple((b, best[b]) for b in plans[i]))

        search = BudgetSearch.start(ctx, "linear_attention", config.margin_db, what="without layers")
        chosen = search.cheapest(list(range(len(plans))), key=key,
                                 build=lambda i: (lambda g: rewriter.build({b: best[b] for b in plans[i]}, g)),
                                 describe=lambda i: {"setting": f"blocks {plans[i]}"})
        report["trials"] = search.trials
        report["target_psnr_db"] = search.target_psnr_db
        if chosen is None:
            report["skipped"] = (f"even the one layer of least error (block {plans[-1]}) misses the target of "
                                 f"{search.target_psnr_db:.2f} dB on the search's samples; every layer stays dense")
            return PassResult(graph, False, report)
        plan = {b: best[b] for b in plans[chosen]}
        report["predicted_psnr_db"] = search.memo[key(chosen)]
    new = rewriter.build(plan)
    dense_flops = sum(attention_flops(s) for s in sites.values())
    kept = dense_flops - sum(attention_flops(sites[b]) for b in plan)
    for b in plan:
        s = sites[b]
        kept += 2.0 * linear_attention_macs((1, s.heads, s.query_tokens, s.head_dim), (1, s.heads, s.key_tokens, s.head_dim),
                                            config.conv_size)
    report.update({
        "substituted": sorted(plan), "features": {str(b): f for b, f in sorted(plan.items())},
        "attention_flops_per_row": dense_flops,
        "predicted_attention_flop_saving": 1.0 - kept / dense_flops if dense_flops else 0.0,
    })
    if replay is not None:
        report["replayed_error"] = replay.error(new).to_dict()
    if rewriter.logs or rewriter.joint_logs:
        report["distillation"] = {"steps": config.distill_steps, "lr": config.distill_lr,
                                  "seconds": round(sum(v["seconds"] for v in rewriter.logs.values()), 1),
                                  "fits": rewriter.logs}
    if rewriter.joint_logs:  # every candidate set the search trained jointly, the chosen one included
        report["distillation"].update({"joint_steps": config.joint_steps, "joint": rewriter.joint_logs,
                                       "joint_seconds": round(sum(v["seconds"] for v in rewriter.joint_logs.values()), 1)})
    resolved = config.model_copy(update={"layers": {str(b): f for b, f in sorted(plan.items())}})
    outcome = None
    if search is not None:
        outcome = PassOutcome(predicted_psnr_db=report["predicted_psnr_db"], target_psnr_db=search.target_psnr_db,
                              saving=report["predicted_attention_flop_saving"])
    rewriter.release(plan)  # the chosen layers are distilled: keep their tensors, not the calibration data
    return PassResult(new, True, report, replay=("linear_attention", resolved), outcome=outcome,
                      rewrite=lambda g: rewriter.build(plan, g))


__all__ = ["LinearAttentionConfig", "linear_attention"]
