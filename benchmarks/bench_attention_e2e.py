"""End-to-end benchmark of the attention substitution passes.

speed:   a DiT-XL-shaped stack (diffusers DiTTransformer2DModel, width 1152 = 16 heads x 72,
         64x64 = 4096 image tokens, random weights, a few blocks) timed dense vs with
         neighbourhood attention (radius 1, tile 8) on every layer, interleaved in the same run,
         median of several repeats. The substitution is forced (random weights have no local
         attention to calibrate): this measures speed only.
quality: on the trained zoo models, PSNR of final samples against the unoptimized model (same
         seeds) for each radius / rho and for the calibrated `auto` choice, plus the per-call
         relative error and the calibrated mass each choice keeps.

    python benchmarks/bench_attention_e2e.py speed --blocks 2 --repeats 5 --out speed.json
    python benchmarks/bench_attention_e2e.py quality --samples 4 --steps 20 --out quality.json

Fixed seeds; prints a table and writes JSON (the speed rows also carry the flop counter's MACs
per forward, so each speedup can be read against its bound: the linears keep their dense cost).
The committed results and their commands are in BENCHMARKS.md. An earlier, loaded-machine run
(2026-11-22) at 96x96 tokens, 1 block (`--blocks 1 --latent 192 --repeats 3`) gave 1.92-2.02x:
the gain grows with the token count, as attention's share of the block does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import statistics
import time
from datetime import datetime, timezone
from typing import Any

import torch
import torch.utils._pytree as pytree

from ditopt.calibration import CalibStats, calibrate
from ditopt.capture import capture
from ditopt.registry import PassContext, get_pass
from ditopt.verify import psnr


def run_graph(graph, kwargs):
    leaves, _ = pytree.tree_flatten(((), kwargs))
    out = graph.collect_outputs(graph.run_segments(graph.bind(leaves)))
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def forced_stats(graph) -> CalibStats:
    """Stats saying every layer is perfectly local, so that the pass substitutes everywhere."""
    blocks, heads = len(graph.blocks), max(s.heads for b in graph.blocks for s in b.attention)
    tensors = {f"attention.window_mass_by_step.tile{t}": torch.ones(3, blocks, heads, 3) for t in (2, 4, 8)}
    return CalibStats(graph.structure_hash(), graph.model_class, 1, [0.0], tensors)


def speed(args) -> dict[str, Any]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=args.blocks,
        sample_size=args.latent, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    ).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = {
        "hidden_states": torch.randn(1, 4, args.latent, args.latent, generator=g),
        "timestep": torch.tensor([500]),
        "class_labels": torch.tensor([1]),
    }
    graph = capture(model, kwargs)
    spec = get_pass("neighborhood_attention")
    ctx = PassContext(model=model, stats=forced_stats(graph))
    # Every window size in one interleaved run: tile t, radius r -> (2r+1)t x (2r+1)t-token windows.
    variants = {"dense": graph}
    substitutions = []
    for tile in args.tile:
        window = f"{(2 * args.radius + 1) * tile}x{(2 * args.radius + 1) * tile} windows"
        per_layer = spec.apply(graph, spec.config(tile=tile, radius=args.radius, reorder="per_layer"), ctx)
        result = spec.apply(graph, spec.config(tile=tile, radius=args.radius, reorder="once"), ctx)
        assert result.report["token_order"].get("tile") == tile, result.report["token_order"]
        variants[f"tile {tile} r {args.radius} ({window}), permute per layer"] = per_layer.graph
        variants[f"tile {tile} r {args.radius} ({window}), reorder once"] = result.graph
        substitutions.append({"tile": tile, "radius": args.radius, "layers": result.report["layers"],
                              "token_order": result.report["token_order"],
                              "predicted_attention_flop_saving": result.report["predicted_attention_flop_saving"]})
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    # MACs per forward (the ditopt ops carry their own flop formulas): the bound a wall-clock
    # speedup can reach when the linears, which no attention pass touches, run at dense speed.
    from ditopt.bench.measure import mac_counter

    macs = {}
    with torch.no_grad():
        for name, gr in variants.items():
            with mac_counter() as count:
                run_graph(gr, kwargs)
            macs[name] = count()
        for rep in range(args.warmup + args.repeats):
            for name, gr in variants.items():  # interleaved: load from other processes hits both alike
                t0 = time.perf_counter()
                outputs[name] = run_graph(gr, kwargs)
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    rows = []
    for name, ts in times.items():
        out = outputs[name]
        rows.append({
            "variant": name,
            "median_s": statistics.median(ts),
            "times_s": ts,
            "speedup": dense / statistics.median(ts),
            "macs": macs[name],
            "mac_speedup_bound": macs["dense"] / macs[name],
            "rel_err_vs_dense": float((out - outputs["dense"]).norm() / outputs["dense"].norm()),
        })
    print(f"{'variant':52s} {'median s':>9s} {'speedup':>8s} {'MAC bound':>9s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['variant']:52s} {r['median_s']:9.3f} {r['speedup']:8.2f} {r['mac_speedup_bound']:9.2f} "
              f"{r['rel_err_vs_dense']:9.2e}", flush=True)
    return {
        "model": {"class": "DiTTransformer2DModel", "blocks": args.blocks, "heads": 16, "head_dim": 72, "width": 1152,
                  "grid": list(graph.grid), "tokens": graph.image_tokens},
        "substitutions": substitutions,
        "repeats": args.repeats, "warmup": args.warmup, "rows": rows,
    }


QUALITY_GRID = (
    [("neighborhood_attention", {"tile": 4, "radius": 1})]
    + [("neighborhood_attention", {"tile": 2, "radius": r}) for r in (1, 2, 3)]
    + [("block_sparse_attention", {"tile": 4, "rho": rho}) for rho in (0.25, 0.5)]
    + [("block_sparse_attention", {"tile": 2, "rho": 0.5})]
    + [("neighborhood_attention", {"radius": "auto", "min_mass": 0.95})]
)


def _sampled(bundle, classes, seeds, steps, model):
    from ditopt.kernels import clear_workspace

    try:
        with torch.no_grad():
            return bundle.sample(classes, seeds, steps=steps, model=model)
    finally:
        # The CPU neighbourhood kernel keeps scratch buffers per thread; one allocated under the
        # zoo's inference_mode cannot be written outside it (the verification that follows).
        clear_workspace()


def quality(args) -> dict[str, Any]:
    from ditopt import optimize, zoo
    from ditopt.kernels import clear_workspace

    results = []
    for name in args.models:
        bundle = zoo.load(name)
        model = bundle.model
        classes, seeds = list(range(args.samples)), list(range(args.samples))
        # Calibrate on other seeds at the same batch shape (stats are tied to the captured shape).
        cal_seeds = [1000 + s for s in range(args.samples)]

        def calib_fn(m):
            return _sampled(bundle, classes, cal_seeds, args.steps, m)

        kwargs = bundle.make_inputs(args.samples)
        graph = capture(model, kwargs)
        t0 = time.perf_counter()
        stats = calibrate(model, graph, ["attention"], calib_fn)
        calib_s = time.perf_counter() - t0
        if args.heatmap:
            from ditopt.passes.attention import attention_heatmap

            attention_heatmap(stats, f"{args.heatmap}-{name}.png")
        reference = _sampled(bundle, classes, seeds, args.steps, model)
        for pass_name, params in QUALITY_GRID:
            profile = {
                "name": "bench", "budget": {"max_rel_err": 10.0}, "verify": {"enabled": True, "timesteps": 3},
                "passes": [{"name": pass_name, "min_mass": 0.0, **params}],
            }
            opt = optimize(model, profile, example_inputs=kwargs, stats=stats)
            clear_workspace()
            record = opt.report.passes[0]
            rep = record.report
            t0 = time.perf_counter()
            samples = _sampled(bundle, classes, seeds, args.steps, opt)
            row = {
                "model": name, "pass": pass_name, **{k: v for k, v in params.items()},
                "substituted": rep["substituted"],
                "per_layer": [{k: l.get(k) for k in ("block", "tile", "radius", "rho", "mass", "density")} for l in rep["layers"]],
                "predicted_attention_flop_saving": rep["predicted_attention_flop_saving"],
                "per_call_rel_err": (record.verification or {}).get("max_rel_err"),
                "psnr_db": psnr(samples, reference),
                "sample_s": time.perf_counter() - t0,
            }
            results.append(row)
            label = ",".join(f"{k}={v}" for k, v in params.items())
            print(f"{name:12s} {pass_name:23s} {label:28s} layers={len(row['substituted']):2d} "
                  f"saving={row['predicted_attention_flop_saving']:.2f} psnr={row['psnr_db']:.2f} dB", flush=True)
        results.append({"model": name, "calibration_s": calib_s, "calibration_meta": stats.meta["attention"],
                        "window_mass_tile4_min_over_heads": stats.tensors["attention.window_mass.tile4"].amin(1).tolist(),
                        "window_mass_tile2_min_over_heads": stats.tensors["attention.window_mass.tile2"].amin(1).tolist()})
    return {"samples": args.samples, "steps": args.steps, "rows": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["speed", "quality"])
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--latent", type=int, default=128, help="latent size; patch 2 -> (latent/2)^2 tokens")
    p.add_argument("--tile", type=int, nargs="+", default=[8], help="speed: one or more tile sizes, timed in one run")
    p.add_argument("--radius", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["dit-digits", "flux-digits"])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the zoo model's)")
    p.add_argument("--heatmap", default=None, help="path prefix for the calibration heatmaps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    result = speed(args) if args.part == "speed" else quality(args)
    result["run"] = {"command": "python benchmarks/bench_attention_e2e.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "date": started, "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()}
    result["machine"] = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                         "processor": platform.processor(), "logical_cpus": os.cpu_count()}
    if args.out:
        from ditopt.io import atomic_write_text
        atomic_write_text(args.out, json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
