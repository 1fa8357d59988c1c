"""Depth pruning: remove whole blocks, chosen from their measured effect on the final output.

Importance is measured, not assumed: on calibration activations (collector "block_inputs") the
pass removes candidate blocks and measures the denoiser output's relative squared error against
the original's, overall and per third of the trajectory. The removal order is greedy on that
measurement (each round removes the block whose removal, on top of the ones already removed,
costs least), with cos(block input, block output) reported only as the cheap prior a naive rule
would use. With `bridge = "linear"` every maximal interval of removed blocks is replaced by the
least-squares affine map from its input to its output (bridge.py), and the greedy measurement
includes the bridges.

How many to remove: `blocks = [...]` and `ratio` apply as written; with neither, the one budget
search (ditopt.search) looks for the cheapest (prefix of the greedy order, full_steps) pair whose
sampled PSNR meets the budget, judged end to end like every lossy pass. `full_steps` is
step-ranged removal: the removed blocks still run on the first steps of each generation, as an
EarlySteps rule (ditopt.plan) holding the original segments, so it composes with a cache
schedule the way attention's dense_steps does. Blocks keep their segments (a removed block
passes its streams through), so a caching pass after this one sees the same block indices and
its schedule is searched on the pruned model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ditopt.calibration.replay import CalibrationReplay
from ditopt.calibration.streams import span_io
from ditopt.costs import segment_macs
from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.graph import DiTGraph
from ditopt.plan import EarlySteps
from ditopt.profiles.fields import Float, Int, check_unique
from ditopt.registry import PassConfig, PassContext, PassLevel, PassOutcome, PassResult, register_pass
from ditopt.search import BudgetSearch

from .bridge import fit_stream_bridge
from .distillation import Distilled, distill_pruned, with_weights
from .rewrite import (StreamBridge, block_pairs, bridge_segment, conditioning_module, pass_through_segment,
                      removable, segment_parameters)


class LayerPruneConfig(PassConfig):
    """Remove blocks: the ones listed, a ratio of them in measured order, or (neither given) as
    many as the profile's PSNR budget allows."""

    blocks: tuple[Int, ...] | None = Field(None, description="explicit block indices to remove (applied as written)")
    ratio: Float | None = Field(None, gt=0, lt=1, description="fraction of the blocks to remove, in measured order")
    bridge: Literal["none", "linear"] = Field("linear", description="'linear': replace each removed interval by the "
                                              "least-squares affine map from its input to its output on calibration "
                                              "activations (with the adaLN modulation); 'none': pass the streams through")
    max_ratio: Float = Field(0.75, gt=0, lt=1, description="the search never removes more than this fraction of the blocks")
    margin_db: Float = Field(0.5, ge=0, description="PSNR margin over the pass's share of the budget on the search's samples")
    rows: Int = Field(128, ge=2, le=4096, description="calibration (trajectory, step) rows the importance is measured on")
    ridge: Float = Field(1e-3, ge=0, le=1, description="bridge ridge damping, relative to the mean diagonal of the normal matrix")
    full_steps: Int | None = Field(None, ge=0, le=10_000, description="the removed blocks still run on the first this-many "
                                   "steps of every generation (step-ranged removal; early steps lay out the image and "
                                   "suffer most); searched with the blocks when neither blocks nor ratio is given, else 0")
    distill_steps: Int = Field(0, ge=0, le=1_000_000, description="> 0: after the removal, Adam steps per removed interval "
                               "training its bridge and the kept blocks beside it (the epilogue for an interval at the "
                               "end) toward the original stretch's output on calibration activations (block-wise)")
    distill_scope: Literal["adjacent", "all"] = Field("adjacent", description="what distillation trains: 'adjacent', per "
                                                      "removed interval its bridge and the kept blocks beside it, "
                                                      "block-wise; 'all', every bridge and every kept block (and the "
                                                      "epilogue) together toward the model's output")
    distill_lr: Float = Field(1e-4, gt=0, le=1, description="distillation learning rate")
    distill_rows: Int = Field(512, ge=2, le=65_536, description="calibration (trajectory, step) rows distilled on (a "
                              "quarter of the batches held out to keep the best state)")
    seed: Int = Field(0, ge=0, description="distillation's rows drawn and batch order")

    def needs_calibration(self) -> bool:
        """Measuring importance, fitting a bridge and distilling replay calibration; explicit
        blocks without a bridge or distillation do not."""
        return self.blocks is None or self.bridge == "linear" or self.distill_steps > 0

    @model_validator(mode="after")
    def _one_way(self) -> "LayerPruneConfig":
        if self.blocks is not None and self.ratio is not None:
            raise ValueError("give blocks or ratio, not both (blocks is the explicit list; ratio picks that many in measured order)")
        check_unique("blocks", self.blocks, allow_empty=False)
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"blocks = {list(self.blocks)}: block indices are 0 or more")
        return self


def intervals(removed: set[int]) -> list[tuple[int, ...]]:
    runs: list[list[int]] = []
    for b in sorted(removed):
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return [tuple(r) for r in runs]


class Pruner:
    """Builds pruned graphs for removal sets, with the bridges fitted once per interval."""

    def __init__(self, graph: DiTGraph, config: LayerPruneConfig, replay: CalibrationReplay | None) -> None:
        self.graph, self.config, self.replay = graph, config, replay
        self._bridges: dict[tuple[int, ...], dict[str, StreamBridge | None]] = {}
        self.distilled: Distilled | None = None  # the trained tensors of one removal set

    def bridges(self, interval: tuple[int, ...]) -> dict[str, StreamBridge | None]:
        if interval not in self._bridges:
            self._bridges[interval] = self._fit(interval)
        return self._bridges[interval]

    def _fit(self, interval: tuple[int, ...]) -> dict[str, StreamBridge | None]:
        g, replay = self.graph, self.replay
        replay.reference()
        names = tuple(g.segment_for_block(b).name for b in interval)
        first = g.segment(names[0])
        ends = dict(span_io(g, names).pairs)  # interval input stream -> its value after the interval
        info = next(b for b in g.blocks if b.index == interval[0])
        streams = {i for i, _ in block_pairs(g, first)}
        cond = conditioning_module(first, info.modulation, streams)
        m_rows = replay.conditioning(cond[0], tuple(first.inputs[i] for i in cond[1])) if cond else None
        out: dict[str, StreamBridge | None] = {}
        for stream, _ in block_pairs(g, first):
            end = ends.get(stream)
            x, y = replay.teacher.get(stream), replay.teacher.get(end) if end else None
            if x is None or y is None or x.shape != y.shape:
                out[stream] = None
                continue
            per_row = x.shape[0] // replay.rows  # kept tokens per replayed row
            m = m_rows[torch.arange(replay.rows).repeat_interleave(per_row)] if m_rows is not None else None
            out[stream] = fit_stream_bridge(x, y, m, self.config.ridge)
        return out

    def build(self, removed: set[int], graph: DiTGraph | None = None, full_steps: int = 0) -> DiTGraph:
        """`graph` (default: the pass's) with `removed` pruned, from step `full_steps` of each
        generation on; the same rewrite at any shape."""
        g = graph if graph is not None else self.graph
        dist = self.distilled if self.distilled is not None and self.distilled.removed == frozenset(removed) else None
        trained = set(dist.blocks) if dist else set()
        originals = {s.name: s.module for s in g.segments if s.block in removed | trained}
        for run in intervals(removed):
            for pos, b in enumerate(run):
                seg = g.segment_for_block(b)
                if pos == 0 and self.config.bridge == "linear":
                    new = bridge_segment(g, seg, dist.bridges[run] if dist else self.bridges(run))
                else:
                    new = pass_through_segment(g, seg)
                g = g.with_segment(new)
        if dist:
            for b, state in dist.blocks.items():
                # The block's segment and the versions of it later passes add (caching's `:record`).
                for seg in [s for s in g.segments if s.block == b and s.kind in ("block", "variant")
                            and not g.is_early_variant(s)]:
                    reads = {str(n.target) for n in seg.module.graph.nodes if n.op == "get_attr"}
                    g = g.with_segment(with_weights(seg, {t: v for t, v in state.items() if t in reads}))
            if dist.epilogue:
                g = g.with_segment(with_weights(g.epilogue, dist.epilogue))
        if full_steps:
            # Segments a later pass adds to a removed block (caching's `:record`) have no
            # original: they run pruned on the early steps too (derive gives None). Distilled
            # neighbours run their original version there too (the original blocks feed them).
            for b in sorted(removed | trained):
                g = g.with_early_steps(EarlySteps(b, full_steps, lambda seg: originals.get(seg.name), "full",
                                                  f"layer_prune full_steps={full_steps}"))
        return g


def greedy_order(pruner: Pruner, candidates: list[int], limit: int) -> list[dict[str, Any]]:
    """Remove `limit` blocks one at a time, each round the one whose removal (on top of the
    earlier ones) gives the smallest replayed output error; one entry per round."""
    removed: set[int] = set()
    rounds = []
    for _ in range(limit):
        scored = []
        for b in candidates:
            if b in removed:
                continue
            err = pruner.replay.error(pruner.build(removed | {b}))
            scored.append((err.total, b, err))
        if not scored:
            break
        total, b, err = min(scored, key=lambda s: (s[0], s[1]))
        removed.add(b)
        rounds.append({"block": b, "removed": sorted(removed), **err.to_dict(),
                       "alone": {str(c): e.total for _, c, e in scored} if len(removed) == 1 else None})
    return rounds


def cosine_prior(replay: CalibrationReplay, graph: DiTGraph) -> dict[int, float]:
    """cos(block input, block output) of the image stream, mean over replayed tokens: the
    naive rule's ranking (high: the block changes little)."""
    replay.reference()
    out = {}
    for seg in graph.block_segments:
        io = span_io(graph, (seg.name,))
        x, y = replay.teacher.get(io.primary_input), replay.teacher.get(io.primary_output)
        if x is not None and y is not None and x.shape == y.shape:
            out[seg.block] = float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
    return out


def full_steps_grid(steps: int | None) -> list[int]:
    """Step-ranged removal's candidates: the removed blocks run on none, or the first tenth,
    two tenths, ... up to six tenths of the steps (cheapest first)."""
    if not steps:
        return [0]
    return sorted({min(steps - 1, round(steps * tenth / 10)) for tenth in range(7)})


def search_removal(search: BudgetSearch, pruner: Pruner, order: list[int], grid: list[int], steps: int | None,
                   bridge: str) -> tuple[int, int] | None:
    """The (k, full_steps) that saves the most multiply-adds per generation while meeting the
    budget: for each prefix length k of the greedy order (longest first), the fewest full
    steps that meet it (bisection: quality rises with full steps), skipping any k or full-steps
    value that could not beat the best pair found so far."""
    base = sum(segment_macs(s) for s in pruner.graph.main_segments)
    best: tuple[int, int] | None = None
    best_saving = 0.0
    for k in range(len(order), 0, -1):
        removed = set(order[:k])
        saved = base - sum(segment_macs(s) for s in pruner.build(removed).main_segments)
        useful = [f for f in grid if saved * (1 - f / steps if steps else 1) > best_saving]
        if not useful:
            continue  # a shorter prefix saves less, but bridges make it not strictly so
        f = search.cheapest(useful, key=lambda f: (tuple(sorted(removed)), bridge, f),
                            build=lambda f: (lambda g: pruner.build(removed, g, f)),
                            describe=lambda f: {"removed": sorted(removed), "full_steps": f})
        if f is not None:
            best, best_saving = (k, f), saved * (1 - f / steps if steps else 1)
    return best


def _costs(graph: DiTGraph) -> tuple[int, int]:
    macs = sum(segment_macs(s) for s in graph.main_segments)
    params = sum(segment_parameters(s) for s in graph.main_segments)
    return macs, params


@register_pass("layer_prune", LayerPruneConfig, needs=("block_inputs",), level=PassLevel.NODE, lossy=True,
               example={"blocks": [1], "distill_steps": 2, "distill_rows": 8})
def layer_prune(graph: DiTGraph, config: LayerPruneConfig, ctx: PassContext) -> PassResult:
    """Depth pruning: remove the blocks whose measured removal costs least, as many as the budget allows."""
    blocks = [b.index for b in graph.blocks]
    if len(blocks) < 2:
        return PassResult(graph, False, {"skipped": f"the model has {len(blocks)} block; pruning needs two or more"})
    fixed = {b: why for b in blocks if (why := removable(graph, graph.segment_for_block(b)))}
    candidates = [b for b in blocks if b not in fixed]
    if config.blocks is not None:
        unknown = sorted(set(config.blocks) - set(blocks))
        if unknown:
            raise InvalidProfileError(f"layer_prune blocks = {list(config.blocks)}: the model has blocks 0..{len(blocks) - 1}, "
                                      f"no {', '.join(map(str, unknown))}")
        if len(config.blocks) >= len(blocks):
            raise InvalidProfileError(f"layer_prune blocks = {list(config.blocks)} removes every block; keep at least one")
        stuck = sorted(set(config.blocks) & set(fixed))
        if stuck:
            raise InvalidProfileError(f"layer_prune cannot remove block {stuck[0]}: {fixed[stuck[0]]}")
    needs_replay = config.needs_calibration()
    if config.distill_steps and not CalibrationReplay.recorded(ctx.stats):
        raise CalibrationError(f"layer_prune distill_steps = {config.distill_steps} trains on the block inputs recorded "
                               "during calibration, and there are none: pass calibration=fn (a function that samples "
                               "with the model), or set distill_steps = 0")
    if needs_replay and ctx.stats is None:
        raise CalibrationError("layer_prune needs calibration statistics (calibration=fn) to measure block importance "
                               "and fit bridges; or give blocks = [...] with bridge = 'none'")
    # Explicit blocks without a bridge need no statistics, but when they were recorded the report
    # still gives the replayed error of the removal.
    replay = (CalibrationReplay(graph, ctx.stats, config.rows)
              if needs_replay or CalibrationReplay.recorded(ctx.stats) else None)
    pruner = Pruner(graph, config, replay)
    report: dict[str, Any] = {"bridge": config.bridge}
    if fixed:
        report["not_removable"] = {str(b): why for b, why in fixed.items()}
    searched = False
    search = None
    steps = ctx.num_steps or (ctx.stats.num_steps if ctx.stats is not None else None)
    full_steps = config.full_steps or 0
    if steps is not None and full_steps >= steps:
        raise InvalidProfileError(f"layer_prune full_steps = {full_steps}: the sampler runs {steps} steps, so the blocks "
                                  f"would never be removed; give fewer than {steps}")
    if config.blocks is not None:
        removed = set(config.blocks)
    else:
        limit = len(candidates) if config.ratio is not None else max(1, int(config.max_ratio * len(blocks)))
        limit = min(limit, len(blocks) - 1, len(candidates))
        if config.ratio is not None:
            limit = min(limit, max(1, round(config.ratio * len(blocks))))
        rounds = greedy_order(pruner, candidates, limit)
        report["order"] = rounds
        report["cosine_prior"] = {str(k): v for k, v in cosine_prior(replay, graph).items()}
        order = [r["block"] for r in rounds]
        if config.ratio is not None:
            removed = set(order)
        else:
            search = BudgetSearch.start(ctx, "layer_prune", config.margin_db, what="without blocks or ratio")
            grid = [config.full_steps] if config.full_steps is not None else full_steps_grid(steps)
            chosen = search_removal(search, pruner, order, grid, steps, config.bridge)
            report["trials"] = search.trials
            report["target_psnr_db"] = search.target_psnr_db
            report["full_steps_searched"] = grid
            searched = True
            if chosen is None:
                report["skipped"] = (f"removing even one block ({order[0]}), with its original running on the first "
                                     f"{max(grid)} of {steps or '?'} steps, misses the target of "
                                     f"{search.target_psnr_db:.2f} dB on the search's samples; nothing removed")
                return PassResult(graph, False, report)
            k, full_steps = chosen
            removed = set(order[:k])
    pruned = pruner.build(removed, full_steps=full_steps)
    if config.distill_steps:
        report["replayed_error_before_distill"] = replay.error(pruned).to_dict()
        runs = intervals(removed)
        bridges = {r: pruner.bridges(r) for r in runs} if config.bridge == "linear" else {}
        rows = CalibrationReplay(graph, ctx.stats, config.distill_rows, seed=config.seed)
        pruner.distilled = distill_pruned(graph, pruner.build(removed), rows, runs, bridges, steps=config.distill_steps,
                                          lr=config.distill_lr, seed=config.seed, full_steps=full_steps,
                                          scope=config.distill_scope)
        report["distillation"] = pruner.distilled.log
        del rows
        pruned = pruner.build(removed, full_steps=full_steps)
    macs0, params0 = _costs(graph)
    macs1, params1 = _costs(pruned)
    # Multiply-adds per step averaged over the generation: the first full_steps run the original.
    mean = macs1 + (macs0 - macs1) * full_steps / steps if steps else macs1
    report.update({
        "removed": sorted(removed), "intervals": [list(r) for r in intervals(removed)], "full_steps": full_steps,
        "blocks_before": len(blocks), "blocks_after": len(blocks) - len(removed),
        "macs_before": macs0, "macs_after": macs1, "macs_per_step_mean": mean,
        "parameters_before": params0, "parameters_after": params1,
    })
    if full_steps:
        report["parameters_note"] = ("the removed blocks' weights stay loaded for the first full_steps; "
                                     "parameters_after counts the pruned version")
    if config.bridge == "linear":
        report["bridges"] = [{"interval": list(run), "fitted_streams": sum(b is not None for b in fits.values()),
                              "passed_through": sum(b is None for b in fits.values()),
                              "conditioned": any(b is not None and b.b is not None for b in fits.values()),
                              "parameters": sum(b.parameters for b in fits.values() if b is not None)}
                             for run in intervals(removed) for fits in [pruner.bridges(run)]]
        if pruner.distilled is not None:
            for entry in report["bridges"]:
                entry["distilled"] = any(f"bridge{entry['interval'][0]}" in f.get("trained", ()) and "note" not in f
                                         for f in pruner.distilled.log["fits"])
    if replay is not None:
        report["replayed_error"] = replay.error(pruned).to_dict()
        report["replayed_rows"] = replay.rows
    resolved = config.model_copy(update={"blocks": tuple(sorted(removed)), "ratio": None, "full_steps": full_steps})
    outcome = None
    if searched:
        predicted = next(t["psnr_db"] for t in reversed(search.trials)
                         if t["removed"] == sorted(removed) and t["full_steps"] == full_steps)
        report["predicted_psnr_db"] = predicted
        outcome = PassOutcome(predicted_psnr_db=predicted, target_psnr_db=search.target_psnr_db,
                              saving=1.0 - mean / macs0 if macs0 else None)
    # Replays at other call shapes reuse these bridges (fitted once, on the rows verified).
    return PassResult(pruned, True, report, replay=("layer_prune", resolved), outcome=outcome,
                      rewrite=lambda g: pruner.build(removed, g, full_steps=full_steps))
