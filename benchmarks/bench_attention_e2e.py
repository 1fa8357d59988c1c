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
    python benchmarks/bench_attention_e2e.py quality --out quality.json

Fixed seeds; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
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
    result = spec.apply(graph, spec.config(tile=args.tile, radius=args.radius), PassContext(model=model, stats=forced_stats(graph)))
    variants = {"dense": graph, "neighborhood (permute per layer)": result.graph}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    with torch.no_grad():
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
            "rel_err_vs_dense": float((out - outputs["dense"]).norm() / outputs["dense"].norm()),
        })
    print(f"{'variant':36s} {'median s':>9s} {'speedup':>8s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['variant']:36s} {r['median_s']:9.3f} {r['speedup']:8.2f} {r['rel_err_vs_dense']:9.2e}")
    return {
        "model": {"class": "DiTTransformer2DModel", "blocks": args.blocks, "heads": 16, "head_dim": 72, "width": 1152,
                  "grid": list(graph.grid), "tokens": graph.image_tokens},
        "substitution": {"tile": args.tile, "radius": args.radius, "layers": result.report["layers"],
                         "predicted_attention_flop_saving": result.report["predicted_attention_flop_saving"]},
        "repeats": args.repeats, "warmup": args.warmup, "rows": rows,
    }


QUALITY_GRID = (
    [("neighborhood_attention", {"tile": t, "radius": r}) for t in (2, 4) for r in (1, 2, 3)]
    + [("block_sparse_attention", {"tile": t, "rho": rho}) for t in (2, 4) for rho in (0.125, 0.25, 0.5)]
    + [("neighborhood_attention", {"radius": "auto", "min_mass": m}) for m in (0.95, 0.8)]
    + [("block_sparse_attention", {"rho": "auto", "min_mass": m}) for m in (0.95, 0.8)]
)


def quality(args) -> dict[str, Any]:
    from ditopt import optimize, zoo

    results = []
    for name in args.models:
        bundle = zoo.load(name)
        model = bundle.model
        classes, seeds = list(range(args.samples)), list(range(args.samples))
        cal_classes, cal_seeds = list(range(args.calib_samples)), [1000 + s for s in range(args.calib_samples)]

        def calib_fn(m):
            return bundle.sample(cal_classes, cal_seeds, model=m)

        kwargs = bundle.make_inputs(args.calib_samples)
        graph = capture(model, kwargs)
        t0 = time.perf_counter()
        stats = calibrate(model, graph, ["attention"], calib_fn)
        calib_s = time.perf_counter() - t0
        if args.heatmap:
            from ditopt.passes.attention import attention_heatmap

            attention_heatmap(stats, f"{args.heatmap}-{name}.png")
        with torch.no_grad():
            reference = bundle.sample(classes, seeds, model=model)
        for pass_name, params in QUALITY_GRID:
            profile = {
                "name": "bench", "budget": {"max_rel_err": 10.0}, "verify": {"enabled": True, "timesteps": 3},
                "passes": [{"name": pass_name, "min_mass": 0.0, **params}],
            }
            opt = optimize(model, profile, example_inputs=kwargs, stats=stats)
            record = opt.report.passes[0]
            rep = record.report
            t0 = time.perf_counter()
            with torch.no_grad():
                samples = bundle.sample(classes, seeds, model=opt)
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
                  f"saving={row['predicted_attention_flop_saving']:.2f} psnr={row['psnr_db']:.2f} dB")
        results.append({"model": name, "calibration_s": calib_s, "calibration_meta": stats.meta["attention"]})
    return {"samples": args.samples, "calibration_samples": args.calib_samples, "rows": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["speed", "quality"])
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--latent", type=int, default=128, help="latent size; patch 2 -> (latent/2)^2 tokens")
    p.add_argument("--tile", type=int, default=8)
    p.add_argument("--radius", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["dit-digits", "flux-digits"])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--heatmap", default=None, help="path prefix for the calibration heatmaps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = speed(args) if args.part == "speed" else quality(args)
    result["machine"] = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(), "processor": platform.processor()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
