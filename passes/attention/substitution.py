"""What the attention substitution passes share: the config base and the per-layer choice from the
"attention" calibration (the mass each pattern keeps, what the substitute costs), and the rewrite
of the chosen layers. Each pass (neighborhood_attention, block_sparse_attention) is its own module.

Which layers: with `blocks` given, those of them the calibrated mass allows; with `blocks` unset
and no PSNR budget, every layer the mass allows (min_mass, max_cost); with `blocks` unset under a
PSNR budget (`budget.min_psnr_db`), the layers the mass allows are only the candidates and the one
budget search (ditopt.search) keeps as many of them as the budget allows, most local first. The
report's `chosen_by` says which rule decided."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field, model_validator

from ditopt.graph import AttentionSite, DiTGraph
from ditopt.kernels.block_sparse import num_selected
from ditopt.kernels.layout import tile_grid
from ditopt.kernels.neighborhood import neighborhood_density
from ditopt.kernels.ops import block_sparse_attention_macs, neighborhood_attention_macs
from ditopt.plan import EarlySteps
from ditopt.profiles.fields import Float, Int, check_in, check_unique
from ditopt.registry import PassConfig, PassContext, PassOutcome, PassResult
from ditopt.search import BudgetSearch, prefix_ladder

from .collector import RADII, RHOS, TILES, auto_tile, measurable_sites
from .rewrite import replace_attention, restore_dense, substitutable, substituted
from .token_order import reorder_tokens_once


MAX_COST_HELP = (
    "a layer stays dense when the substitute's multiply-adds (block statistics, selection and compensation "
    "included, as the flop counter counts them) exceed this share of dense attention's; null: substitute "
    "whenever the calibrated mass allows (to study quality only)"
)

DENSE_STEPS_HELP = (
    "steps 0..N-1 of every generation run the original dense block; the per-layer choice then reads only the "
    "calibrated step buckets the later steps fall in. auto: per layer, the smallest bucket start whose remaining "
    "buckets keep min_mass"
)


# Explicit radius / rho / tile values must be ones the "attention" calibration measures
# (collector.RADII, RHOS, TILES): any other value has no calibrated mass, so every layer would
# stay dense (or, for a radius whose window covers the grid, run a substitute that skips nothing).
AutoOr = Literal["auto"]


class AttentionConfig(PassConfig):
    reorder: Literal["once", "per_layer"] = Field("once", description="tile-major token order: once after the prologue (falls back to per layer when unsupported), or permute q/k/v inside each substituted attention")
    tile: Union[Annotated[Int, Field(ge=1)], AutoOr] = Field("auto", description="tile edge in tokens (the kernels' tile-major layout), one of the calibrated tiles 2, 4, 8; auto: 8 or 4 (at least 4 tiles per axis), whichever keeps fewer multiply-adds per the calibration (see _pick_tile)")
    min_mass: Float = Field(0.95, ge=0.0, le=1.0, description="a layer stays dense when its calibrated attention mass is below this")
    blocks: tuple[Annotated[Int, Field(ge=0)], ...] | None = Field(None, description="substitute only these block indices (where the calibrated mass allows); unset: every such layer, or under a PSNR budget (budget.min_psnr_db) the ones the budget search keeps (what the search resolves to)")
    dense_steps: Union[Annotated[Int, Field(ge=0)], AutoOr] = Field(0, description=DENSE_STEPS_HELP)
    max_cost: Annotated[Float, Field(gt=0.0)] | None = Field(0.9, description=MAX_COST_HELP)
    margin_db: Float = Field(0.5, ge=0, description="with blocks unset under a PSNR budget: PSNR margin over the pass's share of the budget on the search's samples")

    @model_validator(mode="after")
    def _calibrated_values(self) -> "AttentionConfig":
        check_in("tile", self.tile, TILES, "the tiles calibration measures")
        check_unique("blocks", self.blocks, allow_empty=False)
        return self


def masses_by_step(ctx: PassContext, key: str, tile: int) -> torch.Tensor | None:
    """The collector's [bucket, blocks, heads, n] masses for `key` at `tile`; None when not calibrated."""
    stats = ctx.stats
    return None if stats is None else getattr(stats, "tensors", {}).get(f"attention.{key}_by_step.tile{tile}")


def calibrated_mass(ctx: PassContext, block: int, tile: int, key: str, from_step: int = 0) -> torch.Tensor | None:
    """Worst case over heads and step buckets of the mass kept, per radius / rho; None when
    this block or tile was not calibrated. With `from_step` > 0 only the buckets holding a
    step >= from_step count (the steps that run substituted after `dense_steps`)."""
    all_blocks = masses_by_step(ctx, key, tile)
    if all_blocks is None:
        return None
    by_step = all_blocks[:, block]  # [buckets, heads, n]
    if from_step > 0:
        keep = [i for i, (_, end) in enumerate(step_buckets(ctx.stats, by_step.shape[0])) if end > from_step]
        by_step = by_step[keep]
    if by_step.numel() == 0 or torch.isnan(by_step).all():
        return None
    return by_step.nan_to_num(nan=1.0).amin(dim=(0, 1))


def step_buckets(stats: Any, count: int) -> list[tuple[int, int]]:
    """[start, end) steps of each calibrated step bucket: the collector's meta, or the same split
    of the calibrated step count (stats made by hand carry no meta)."""
    saved = ((getattr(stats, "meta", None) or {}).get("attention") or {}).get("step_buckets")
    if saved and len(saved) == count:
        return [(int(a), int(b)) for a, b in saved]
    steps = int(stats.num_steps)
    return [(i * steps // count, (i + 1) * steps // count) for i in range(count)]


def dense_step_options(config: Any, ctx: PassContext, key: str, tile: int) -> list[int] | str:
    """The dense-step counts to try, fewest first, or why none can leave a step substituted:
    the configured count, or with "auto" 0 and every later bucket start."""
    stats, masses = ctx.stats, masses_by_step(ctx, key, tile)
    steps = int(stats.num_steps) if masses is not None else None
    if config.dense_steps != "auto":
        n = int(config.dense_steps)
        if n > 0 and steps is not None and n >= steps:
            return f"dense_steps {n} covers all {steps} calibrated steps: no step would run substituted"
        return [n]
    if masses is None:
        return [0]
    starts = {start for start, end in step_buckets(stats, masses.shape[0]) if end > start}
    return sorted(starts | {0})


def attention_flops(site: AttentionSite) -> float:
    """Multiply-adds x2 of QK^T and PV for one batch row."""
    return 4.0 * site.heads * site.query_tokens * site.key_tokens * site.head_dim


def substitute_cost(site: AttentionSite, record: dict[str, Any]) -> float:
    """The substitute's multiply-adds per row as a share of dense attention's, counted by the same
    formulas the flop counter uses. PISA's first-order compensation costs about
    head_dim / (2 * block_size) of dense attention by itself, so small blocks can cost more than
    they skip."""
    q_shape = (1, site.heads, site.query_tokens, site.head_dim)
    if record["pattern"] == "neighborhood":
        h, w = record["grid"]
        macs = neighborhood_attention_macs(q_shape, h, w, record["tile"], record["radius"], site.text_tokens)
    else:
        macs = block_sparse_attention_macs(q_shape, record["block_size"], record["rho"], site.text_tokens, record["compensate"])
    return macs / (attention_flops(site) / 2.0)


def _too_costly(site: AttentionSite, record: dict[str, Any], max_cost: float | None) -> str | None:
    record["cost"] = substitute_cost(site, record)
    if max_cost is None or record["cost"] <= max_cost:
        return None
    what = (f"radius {record['radius']}" if record["pattern"] == "neighborhood"
            else f"rho {record['rho']} with {record['block_size']}-token blocks")
    return (f"{what} at tile {record['tile']} would cost {record['cost']:.2f}x the multiply-adds of dense attention "
            f"over {site.query_tokens} tokens (max_cost {max_cost}): nothing to save; a larger tile or grid pays off")


def _sites(graph: DiTGraph, blocks: tuple[int, ...] | None) -> list[tuple[int, AttentionSite]]:
    return [(b.index, s) for b in graph.blocks for s in b.attention if blocks is None or b.index in blocks]


# Speed per multiply-add of the CPU kernels at a tile edge, relative to 8x8 tiles (64-token blocks),
# from `ditopt bench attention --grid 32 32 --heads 4 --head-dim 32 --tile T --radius R`:
# speedup x density is 0.62 at tile 8 r1 and 0.33-0.44 at tile 4 r1/r2 (0.14 at tile 2 r2).
# Auto tile picks the smaller tile only when its kept multiply-adds are that much fewer.
TILE_MAC_EFFICIENCY = {8: 1.0, 4: 0.6}


def _kept_flops(flops: float, record: dict[str, Any], steps: int | None) -> float:
    # Dense steps run the whole attention: average over the calibrated steps when known.
    dense = min(record.get("dense_steps", 0), steps) / steps if steps else 0.0
    return flops * (dense + (1.0 - dense) * record.get("cost", record["density"]))


def _candidate_tiles(graph: DiTGraph, config: Any, ctx: PassContext) -> list[int]:
    """The configured tile, or for "auto" the calibrated tiles of 64- and 16-token blocks that
    leave at least 4 tiles per axis (so that a radius-1 window skips something); smaller tiles
    cost more per multiply-add than they skip."""
    if config.tile != "auto":
        return [config.tile]
    calibrated = (getattr(ctx.stats, "meta", None) or {}).get("attention", {}).get("tiles")  # None: no stats
    tiles = [t for t in (8, 4) if min(graph.grid) >= 4 * t and (calibrated is None or t in calibrated)]
    return tiles or [auto_tile(graph.grid)]


def _pick_tile(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str, sites: list, steps: int | None) -> int:
    """The candidate tile whose per-layer choices keep the fewest multiply-adds of attention,
    weighed by the kernels' speed per multiply-add at that tile (ties: the larger tile)."""
    tiles = _candidate_tiles(graph, config, ctx)
    if len(tiles) == 1:
        return tiles[0]

    def cost(tile: int) -> float:
        total = 0.0
        for block, site in sites:
            flops = attention_flops(site)
            choice = _choose(graph, site, block, config, ctx, pattern, tile)
            total += flops if isinstance(choice, str) or choice is None else _kept_flops(flops, choice[2], steps)
        return total / TILE_MAC_EFFICIENCY.get(tile, 1.0)

    costs = {tile: cost(tile) for tile in tiles}
    return min(tiles, key=lambda t: (costs[t], -t))


def substitute(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str) -> PassResult:
    """Shared driver. Under a PSNR budget with `blocks` unset, the one budget search picks which of
    the layers the calibrated mass allows are substituted (`_searched`); otherwise every such layer
    is, as configured."""
    if config.blocks is None and getattr(ctx.budget, "min_psnr_db", None) is not None:
        return _searched(graph, config, ctx, pattern)
    result = _substitute(graph, config, ctx, pattern)
    result.report["chosen_by"] = ("blocks as given" if config.blocks is not None
                                  else "calibrated mass (min_mass; the profile has no PSNR budget)")
    return result


def _searched(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str) -> PassResult:
    """The layers the mass rule allows are the candidates; the budget search bisects over the ladder
    "the k candidates of highest calibrated mass" (k from all to one) and keeps the largest set whose
    samples meet the target. It resolves to `blocks` (and the tile it chose), which replays without
    searching."""
    name = f"{pattern}_attention"
    tile, decisions = _decide(graph, config, ctx, pattern)
    # The mass kept is the calibrated stand-in for a layer's error: most local layers go first.
    chosen_records = {d[1]: d[3][2] for d in decisions if d[0] == "substitute"}
    order = sorted(chosen_records, key=lambda b: (-chosen_records[b]["mass"], chosen_records[b]["cost"], b))
    at_tile = type(config).model_validate({**config.model_dump(), "tile": tile})

    def resolved(plan: list[int]) -> Any:
        return type(config).model_validate({**at_tile.model_dump(), "blocks": list(plan)})

    info: dict[str, Any] = {"chosen_by": "budget search", "candidates": order}
    if not order:
        result = _rewrite(graph, config, ctx, pattern, tile, decisions)
        done = [d[1] for d in decisions if d[0] == "done"]
        result.report.update(info, skipped=(
            "no candidate layer, nothing to search: " + (f"blocks {done} are already substituted; " if done else "")
            + f"the calibrated mass (min_mass {config.min_mass}) or the cost guard keeps every other layer dense"))
        return result
    plans = prefix_ladder(order)
    search = BudgetSearch.start(ctx, name, config.margin_db, what="without blocks")
    # Each candidate is what its resolved config replays: the pass with `blocks`, on the capture the
    # evaluator hands it (the sampling shape, after the profile's earlier passes).
    plan = search.cheapest(plans, key=lambda p: resolved(p).model_dump_json(),
                           build=lambda p: (lambda g: _substitute(g, resolved(p), ctx, pattern).graph),
                           describe=lambda p: {"setting": f"blocks {list(p)}"})
    info.update(trials=search.trials, target_psnr_db=search.target_psnr_db)
    if plan is None:
        why = (f"even the one layer of highest calibrated mass (block {order[0]}) misses the target of "
               f"{search.target_psnr_db:.2f} dB on the search's samples; every layer stays dense")
        result = _rewrite(graph, config, ctx, pattern, tile, decisions, allowed=[], why_not=why)
        result.report.update(info, skipped=why)
        return result
    kept = f"the layer of highest calibrated mass (block {plan[0]}) meets" if len(plan) == 1 else (
        f"the {len(plan)} layers of highest calibrated mass (blocks {list(plan)}) meet")
    why = f"left dense by the budget search: {kept} {search.target_psnr_db:.2f} dB and the next larger set missed it"
    result = _rewrite(graph, at_tile, ctx, pattern, tile, decisions, allowed=plan, why_not=why)
    predicted = search.memo[resolved(plan).model_dump_json()]
    result.report.update(info, predicted_psnr_db=predicted)
    outcome = PassOutcome(predicted_psnr_db=predicted, target_psnr_db=search.target_psnr_db,
                          saving=result.report["predicted_attention_flop_saving"])
    return PassResult(result.graph, result.modified, result.report, replay=(name, resolved(plan)), outcome=outcome)


def _substitute(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str) -> PassResult:
    """Every layer the calibrated mass allows, substituted."""
    tile, decisions = _decide(graph, config, ctx, pattern)
    return _rewrite(graph, config, ctx, pattern, tile, decisions)


def _decide(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str) -> tuple[int, list[tuple]]:
    """The tile, and per site of `config.blocks` one of ("done", block, site, record) (an earlier
    substitution), ("dense", block, site, reason) or ("substitute", block, site, (op, args, record))."""
    steps = ctx.stats.num_steps if ctx.stats is not None else ctx.num_steps
    measured = {b for b, _ in measurable_sites(graph)}

    def cannot(block: int, site: AttentionSite) -> str | None:
        # Why a site that is not substituted yet cannot be: the rewrite's reason, or not measured.
        return substitutable(graph, site) or (None if block in measured else "not the block's measured attention")

    open_sites = [(b, s) for b, s in _sites(graph, config.blocks) if substituted(graph, b, s) is None and cannot(b, s) is None]
    tile = _pick_tile(graph, config, ctx, pattern, open_sites, steps)
    decisions: list[tuple] = []
    for block, site in _sites(graph, config.blocks):
        previous = substituted(graph, block, site)
        if previous is not None:
            decisions.append(("done", block, site, previous))
            continue
        reason = cannot(block, site)
        choice = None if reason else _choose(graph, site, block, config, ctx, pattern, tile)
        if isinstance(choice, str) or choice is None:
            decisions.append(("dense", block, site, reason or choice))
        else:
            decisions.append(("substitute", block, site, choice))
    return tile, decisions


def _rewrite(graph: DiTGraph, config: Any, ctx: PassContext, pattern: str, tile: int, decisions: list[tuple],
             allowed: list[int] | None = None, why_not: str = "") -> PassResult:
    """Apply `decisions` (only the blocks in `allowed` when given; the others stay dense for
    `why_not`): reorder tokens once when asked, rewrite, report."""
    original = graph
    steps = ctx.stats.num_steps if ctx.stats is not None else ctx.num_steps
    layers, dense, chosen, total_flops, kept_flops = [], [], [], 0.0, 0.0
    for what, block, site, detail in decisions:
        flops = attention_flops(site)
        total_flops += flops
        if what == "done":
            layers.append({"block": block, **detail, "note": "already substituted"})
            kept_flops += _kept_flops(flops, detail, steps)
        elif what == "dense" or (allowed is not None and block not in allowed):
            dense.append({"block": block, "kind": site.kind, "reason": detail if what == "dense" else why_not})
            kept_flops += flops
        else:
            chosen.append((block, site, detail, flops))
    token_order = graph.meta.get("token_order")
    if chosen and config.reorder == "once" and token_order is None:
        reordered, why = reorder_tokens_once(graph, chosen[0][2][2]["tile"])
        token_order = reordered.meta["token_order"] if reordered is not None else {"unsupported": why}
        graph = reordered if reordered is not None else graph
    for block, site, (op, args, record), flops in chosen:
        new = replace_attention(graph, block, site, op, args, record)
        if new is None:
            dense.append({"block": block, "kind": site.kind, "reason": "attention is masked, causal or has dropout"})
            kept_flops += flops
            continue
        graph = new
        # Copies of the block that an earlier pass made and runs instead of it on some steps
        # (feature forecasting's `:record`) hold the same attention: substitute it there too.
        copies = [s.name for s in graph.segments if s.kind == "variant" and s.block == block and not graph.is_early_variant(s)]
        also = []
        for name in copies:
            copied = replace_attention(graph, block, site, op, args, record, segment=name)
            if copied is not None:
                graph = copied
                also.append(name)
        if also:
            record = {**record, "also_in": also}
        if record["dense_steps"]:
            rule = EarlySteps(block, record["dense_steps"], restore_dense, "dense", f"{pattern} attention dense_steps")
            graph = graph.with_early_steps(rule)
        layers.append({"block": block, **record})
        kept_flops += _kept_flops(flops, record, steps)
    report = {
        "pattern": pattern,
        "tile": tile,
        "substituted": [l["block"] for l in layers],
        "layers": layers,
        "dense": dense,
        "token_order": token_order or "row-major (permuted inside each substituted attention)",
        "attention_flops_per_row": total_flops,
        "predicted_attention_flop_saving": 0.0 if total_flops == 0 else 1.0 - kept_flops / total_flops,
    }
    return PassResult(graph, graph is not original, report)


def _choose(graph: DiTGraph, site: AttentionSite, block: int, config: Any, ctx: PassContext, pattern: str, tile: int):
    """(op, args, record) at `tile` for the fewest dense steps (config.dense_steps) whose later
    steps' calibrated mass allows a substitution, or why the layer stays dense."""
    if tile < 1:
        return f"tile {tile} is not a positive size"
    options = dense_step_options(config, ctx, "window_mass" if pattern == "neighborhood" else "block_mass", tile)
    if isinstance(options, str):
        return options
    reason = None
    for dense_steps in options:
        choice = _choose_from(graph, site, block, config, ctx, pattern, tile, dense_steps)
        if not isinstance(choice, str):
            choice[2]["dense_steps"] = dense_steps
            return choice
        reason = choice
    if len(options) > 1:
        reason += f"; dense_steps='auto' found no later start that keeps it (tried {options})"
    return reason


def _choose_from(graph: DiTGraph, site: AttentionSite, block: int, config: Any, ctx: PassContext, pattern: str, tile: int, from_step: int):
    h, w = graph.grid
    if pattern == "neighborhood":
        masses = calibrated_mass(ctx, block, tile, "window_mass", from_step)
        candidates = RADII if config.radius == "auto" else (config.radius,)
        for radius in candidates:
            mass = _mass_at(masses, RADII, radius)
            if mass is None and not _window_covers_grid(h, w, tile, radius):
                return f"not calibrated for tile {tile}, radius {radius}"
            if mass is None or mass >= config.min_mass:
                density = neighborhood_density(h, w, tile, radius, site.text_tokens)
                if config.radius == "auto" and density >= 1.0:
                    return f"radius {radius} at tile {tile} covers the whole grid: nothing to save"
                record = {"pattern": "neighborhood", "tile": tile, "radius": radius, "mass": 1.0 if mass is None else mass, "density": density, "kind": site.kind, "grid": (h, w)}
                costly = _too_costly(site, record, config.max_cost)
                if costly:
                    return costly
                del record["grid"]
                args = lambda n_text, scale, r=radius: (h, w, tile, r, n_text, scale)  # noqa: E731
                return torch.ops.ditopt.neighborhood_attention.default, args, record
        best = None if masses is None else float(masses.max())
        return f"attention is broad: calibrated window mass {best} < min_mass {config.min_mass}"
    masses = calibrated_mass(ctx, block, tile, "block_mass", from_step)
    if masses is None:
        return f"not calibrated for tile {tile}"
    candidates = RHOS if config.rho == "auto" else (config.rho,)
    for rho in candidates:
        mass = _mass_at(masses, RHOS, rho)
        if mass is None:
            return f"not calibrated for rho {rho}"
        if mass >= config.min_mass:
            bs = tile * tile
            density = _block_density(site, bs, rho)
            record = {"pattern": "block_sparse", "tile": tile, "block_size": bs, "rho": rho, "mass": mass, "density": density, "kind": site.kind, "compensate": config.compensate}
            costly = _too_costly(site, record, config.max_cost)
            if costly:
                return costly
            args = lambda n_text, scale, r=rho: (bs, r, n_text, True, scale, 1e-6, config.compensate)  # noqa: E731
            return torch.ops.ditopt.block_sparse_attention.default, args, record
    return f"attention is not block-sparse: calibrated top-rho mass {float(masses.max()):.4f} < min_mass {config.min_mass}"


def _mass_at(masses: torch.Tensor | None, grid: tuple, value: Any) -> float | None:
    if masses is None or value not in grid:
        return None
    return float(masses[grid.index(value)])


def _window_covers_grid(h: int, w: int, tile: int, radius: int) -> bool:
    th, tw = tile_grid(h, w, tile)
    return 2 * radius + 1 >= max(th, tw)


def _block_density(site: AttentionSite, block_size: int, rho: float) -> float:
    """Share of the dense score matrix computed exactly (compensation terms not counted)."""
    m, t = site.image_tokens, site.text_tokens
    n = m + t
    kept_keys = min(m, num_selected(math.ceil(m / block_size), rho) * block_size)
    return (t * n + m * t + m * kept_keys) / float(n * n)
