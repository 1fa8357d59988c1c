#!/usr/bin/env python
"""Width pruning (`width_prune`, issue 30): realized wall-clock gain against the multiply-add
reduction on a DiT-XL-wide stack, and (optionally) what a PSNR budget buys on a zoo model.

Speed (always): a diffusers DiTTransformer2DModel with DiT-XL's width (hidden 1152, 16 heads of
72, FFN 4608) at 256 tokens (32 x 32 latent, patch 2), `--blocks` blocks, random weights under a
fixed seed. `width_prune` with explicit `ffn_ratio` / `head_ratio` (default 0.5 / 0.25) after a
short calibration; the dense capture and the pruned graph run the same way (every segment once,
`DiTGraph.run_segments`), interleaved, median of `--repeats`, one thread. The target: realized
gain (1 - t_pruned / t_dense) >= 85% of the multiply-add reduction (1 - macs_pruned / macs_dense).

Quality (`--zoo dit-digits`): the pass with only `min_psnr_db = --budget` (the search picks the
per-layer amounts), judged on unseen (class, seed) pairs against the original's samples, with the
generation wall-clock of both.

    python benchmarks/bench_width_prune.py --out benchmarks/results/width_prune.json [--zoo dit-digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

UNSEEN_SEED0 = 470_000  # apart from the zoo's calibration/validation seeds and other benchmarks'


def speed(args) -> dict:
    import torch
    import torch.utils._pytree as pytree
    from diffusers import DiTTransformer2DModel

    import ditopt
    from ditopt.costs import segment_macs

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=4,
                                  num_layers=args.blocks, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # diffusers zero-initialises adaLN-Zero gates: random ones make every block count
        for name, p in model.named_parameters():
            if p.dim() == 2 and "norm1.linear" in name:
                p.normal_(0, 0.02)
    n = args.batch_size
    kw = {"hidden_states": torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(1)),
          "timestep": torch.full((n,), 500), "class_labels": torch.arange(n) + 3, "return_dict": False}

    def sampler(m):
        g = torch.Generator().manual_seed(2)
        outs = []
        for i in range(args.calibration_samples):
            x = torch.randn(n, 4, 32, 32, generator=g)
            for t in torch.linspace(950, 50, args.calibration_steps):
                x = x - 0.1 * m(**{**kw, "hidden_states": x, "timestep": t.long().repeat(n),
                                   "class_labels": (torch.arange(n) + 10 * i) % 1000})[0]
            outs.append(x)
        return torch.cat(outs)

    cfg = {"ffn_ratio": args.ffn_ratio, "head_ratio": args.head_ratio, "correction": "least_squares",
           "rows": n * args.calibration_samples * args.calibration_steps, "tokens_per_row": 256}
    profile = {"name": "width-bench", "budget": {"max_rel_err": 10.0}, "passes": [{"name": "width_prune", **cfg}]}
    start = time.perf_counter()
    opt = ditopt.optimize(model, profile, example_inputs=kw, calibration=sampler, on_gate_miss="return")
    optimize_s = time.perf_counter() - start
    rep = next(r for r in opt.report.passes if r.name == "width_prune").report
    graphs = {"dense": ditopt.capture(model, kw), "pruned": opt.programs[0]}
    leaves, _ = pytree.tree_flatten(((), kw))  # as the runtime binds a call

    def run(g):
        return g.run_segments(g.bind(leaves))

    def blocks_macs(g) -> int:
        return sum(segment_macs(s) for s in g.block_segments)

    macs = {k: sum(segment_macs(s) for s in g.main_segments) for k, g in graphs.items()}
    bmacs = {k: blocks_macs(g) for k, g in graphs.items()}
    times: dict[str, list[float]] = {k: [] for k in graphs}
    with torch.inference_mode():
        for g in graphs.values():  # warm up allocator and kernels
            run(g)
            run(g)
        for _ in range(args.repeats):
            for k, g in graphs.items():  # interleaved: load drifts hit both alike
                t0 = time.perf_counter()
                run(g)
                times[k].append(time.perf_counter() - t0)
        out = {k: graphs[k].collect_outputs(run(g)) for k, g in graphs.items()}
    a, b = out["pruned"][0], out["dense"][0]
    med = {k: statistics.median(v) for k, v in times.items()}
    mac_cut = 1 - macs["pruned"] / macs["dense"]
    gain = 1 - med["pruned"] / med["dense"]
    return {
        "stack": {"hidden": 1152, "heads": 16, "head_dim": 72, "ffn": 4608, "tokens": 256, "blocks": args.blocks,
                  "batch": n, "weights": "random, seed 0"},
        "config": cfg, "optimize_s": round(optimize_s, 1),
        "rows": [{"method": k, "macs": macs[k], "block_macs": bmacs[k], "parameters": p,
                  "seconds_per_call": med[k], "speedup": med["dense"] / med[k]}
                 for k, p in (("dense", rep["parameters_before"]), ("pruned", rep["parameters_after"]))],
        "mac_reduction": mac_cut, "block_mac_reduction": 1 - bmacs["pruned"] / bmacs["dense"],
        "wall_clock_gain": gain, "gain_over_mac_reduction": gain / mac_cut if mac_cut else None,
        "target": ">= 0.85", "met": bool(mac_cut and gain / mac_cut >= 0.85),
        "heads_removed": rep["heads_removed"], "neurons_removed": rep["neurons_removed"],
        "output_rel_err": float((a - b).norm() / b.norm()), "replayed_error": rep["replayed_error"],
        "timing": {"repeats": args.repeats, "seconds": times},
    }


def quality(args) -> dict:
    import torch  # noqa: F401

    import ditopt
    from ditopt import zoo
    from ditopt.verify import psnr_lower_bound, psnr_samples

    bundle = zoo.load(args.zoo)
    classes = [(7 * i + 2) % bundle.num_classes for i in range(args.unseen)]
    seeds = [UNSEEN_SEED0 + i for i in range(args.unseen)]
    reference = bundle.sample(classes, seeds)
    profile = {"name": "width-zoo", "budget": {"min_psnr_db": args.budget}, "passes": [{"name": "width_prune"}]}
    start = time.perf_counter()
    opt = ditopt.optimize(bundle.model, ditopt.load_profile(profile), example_inputs=bundle.make_inputs(2),
                          calibration=bundle.calibration_fn(), validation=bundle.validation_fn(), on_gate_miss="return")
    seconds = time.perf_counter() - start
    rec = next(r for r in opt.report.passes if r.name == "width_prune")
    rep = rec.report
    check = next((v for v in opt.report.verification if v["kind"] == "end-to-end"), {})
    values = psnr_samples(bundle.sample(classes, seeds, model=opt), reference)
    finite = [v for v in values if v != float("inf")] or [float("inf")]
    times: dict[str, list[float]] = {"original": [], "width_prune": []}
    tc, ts = classes[: args.batch], seeds[: args.batch]
    for m in (bundle.model, opt):
        bundle.sample(tc, ts, model=m)  # warm (and capture at the timed shape)
    for _ in range(args.repeats):
        for name, m in (("original", bundle.model), ("width_prune", opt)):
            t0 = time.perf_counter()
            bundle.sample(tc, ts, model=m)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": args.zoo, "budget_db": args.budget, "optimize_s": round(seconds, 1), "applied": rec.modified,
        "skipped": rep.get("skipped"), "layers": rep.get("layers"), "heads_removed": rep.get("heads_removed"),
        "neurons_removed": rep.get("neurons_removed"), "macs_before": rep.get("macs_before"),
        "macs_after": rep.get("macs_after"), "predicted_psnr_db": rep.get("predicted_psnr_db"),
        "target_psnr_db": rep.get("target_psnr_db"), "held_out_mean_db": check.get("psnr_db"),
        "held_out_lower_db": check.get("psnr_lower_db"), "passed": opt.report.passed,
        "unseen_mean_db": sum(finite) / len(finite), "unseen_lower90_db": psnr_lower_bound(values, 0.9),
        "unseen_min_db": min(values), "seconds_per_generation": med, "speedup": med["original"] / med["width_prune"],
        "unseen": {"samples": args.unseen, "seeds": [seeds[0], seeds[-1]], "classes": "7i+2 mod classes"},
        "timing": {"batch": args.batch, "repeats": args.repeats, "seconds": times},
    }


def table(result: dict) -> str:
    s = result["speed"]
    lines = [f"Width pruning, DiT-XL-wide stack ({s['stack']['blocks']} blocks, hidden 1152, 16 heads, FFN 4608, "
             f"256 tokens, batch {s['stack']['batch']}, {result['run']['machine']['torch_threads']} thread(s)): FFN {s['config']['ffn_ratio']:.0%} and heads {s['config']['head_ratio']:.0%} removed",
             "", "| method | GMACs | parameters | ms / call | speedup |", "|---|---:|---:|---:|---:|"]
    for r in s["rows"]:
        lines.append(f"| {r['method']} | {r['macs'] / 1e9:.2f} | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['seconds_per_call'] * 1e3:.1f} | {r['speedup']:.2f}x |")
    lines += ["", f"multiply-adds -{s['mac_reduction']:.1%}, wall clock -{s['wall_clock_gain']:.1%}: "
              f"gain / MAC reduction = {s['gain_over_mac_reduction']:.2f} (target >= 0.85: "
              f"{'met' if s['met'] else 'missed'})"]
    if "quality" in result:
        q = result["quality"]
        lines += ["", f"{q['model']} at min_psnr_db = {q['budget_db']:g} (searched): "
                  + (f"skipped ({q['skipped']})" if not q["applied"] else
                     f"{q['heads_removed']} heads and {q['neurons_removed']} neurons removed, MACs "
                     f"-{1 - q['macs_after'] / q['macs_before']:.1%}, predicted {q['predicted_psnr_db']:.1f} dB, "
                     f"unseen mean {q['unseen_mean_db']:.1f} dB (lower90 {q['unseen_lower90_db']:.1f}), "
                     f"{q['speedup']:.2f}x wall clock")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--ffn-ratio", type=float, default=0.5)
    p.add_argument("--head-ratio", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=2, help="samples per timed call (2: a CFG pair)")
    p.add_argument("--calibration-samples", type=int, default=2)
    p.add_argument("--calibration-steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zoo", default=None, help="also search a PSNR budget on this zoo model (e.g. dit-digits)")
    p.add_argument("--budget", type=float, default=30.0)
    p.add_argument("--unseen", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from ditopt.bench.measure import script_run_record
    from ditopt.io import atomic_write_text

    torch.set_num_threads(args.threads)
    result = {"speed": speed(args)}
    if args.zoo:
        result["quality"] = quality(args)
    result["run"] = script_run_record("benchmarks/bench_width_prune.py", argv, args.threads)
    text = table(result)
    result["table"] = text
    print(text, flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
