#!/usr/bin/env python
"""How much of the MAC saving of ditopt's caching passes turns into wall-clock, by model width.

The zoo models are 128 wide: there a forecast step's elementwise work (Taylor factors, adaLN
gates, residual adds) costs as much as a good share of the skipped matmuls, so TaylorSeer-style
forecasting realizes well under its MAC ratio. The elementwise work grows with width, the
matmuls with width squared, so at DiT-XL's width the same schedule should realize nearly all of
it. This script measures that instead of arguing it: a `DiTTransformer2DModel` (random weights:
timing only) at the zoo width and at DiT-XL's width (1152 = 16 heads x 72), same token count
(16x16 patches) and batch, a plain denoising loop of `--steps` calls with decreasing
timesteps, dense vs `taylor_forecast` (order 2) vs `residual_cache` at a fixed interval, timed
interleaved in one run (median of `--repeats` after a warm-up), MACs from the flop counter.

    python benchmarks/bench_forecast_overhead.py --out benchmarks/results/forecast_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

WIDTHS = {"zoo (4 x 32)": (4, 32), "DiT-XL (16 x 72)": (16, 72)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="rows per call (the zoo bench: 4 samples x 2 CFG branches)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from diffusers import DiTTransformer2DModel

    import ditopt
    from ditopt.bench.measure import mac_counter, script_run_record
    from ditopt.io import atomic_write_text

    torch.set_num_threads(args.threads)
    warmup = 2
    profiles = {
        "dense": None,
        f"taylor o2 N={args.interval}": {"name": "taylor", "passes": [
            {"name": "taylor_forecast", "order": 2, "interval": args.interval, "warmup": warmup}]},
        f"residual N={args.interval}": {"name": "residual", "passes": [
            {"name": "residual_cache", "interval": args.interval, "warmup": warmup, "order": 0}]},
    }
    timesteps = torch.linspace(999, 0, args.steps).round().long()
    rows = []
    for label, (heads, head_dim) in WIDTHS.items():
        torch.manual_seed(0)
        model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=1,
                                      out_channels=2, num_layers=args.blocks, sample_size=32, patch_size=2,
                                      num_embeds_ada_norm=1000, norm_num_groups=1).eval()
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(args.batch, 1, 32, 32, generator=g)
        labels = torch.arange(args.batch) % 10

        def example(t: torch.Tensor) -> dict:
            return {"hidden_states": x0, "timestep": t.repeat(args.batch), "class_labels": labels}

        variants = {}
        for name, prof in profiles.items():
            if prof is None:
                variants[name] = (model, lambda: None)
            else:
                opt = ditopt.optimize(model, prof, example_inputs=example(timesteps[0]), num_steps=args.steps)
                variants[name] = (opt, opt.reset)

        def generate(m, reset) -> torch.Tensor:
            reset()
            x = x0
            for t in timesteps:  # an Euler-like update: the features change step to step
                eps = m(hidden_states=x, timestep=t.repeat(args.batch), class_labels=labels).sample[:, :1]
                x = x - 0.02 * eps
            return x

        macs, outs = {}, {}
        with torch.no_grad():
            for name, (m, reset) in variants.items():
                with mac_counter() as count:
                    outs[name] = generate(m, reset)
                macs[name] = count()
            times: dict[str, list[float]] = {k: [] for k in variants}
            for rep in range(1 + args.repeats):
                for name, (m, reset) in variants.items():  # interleaved: machine noise hits all alike
                    t0 = time.perf_counter()
                    generate(m, reset)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
        dense_s, dense_macs = statistics.median(times["dense"]), macs["dense"]
        for name in variants:
            med = statistics.median(times[name])
            speedup, mac_ratio = dense_s / med, macs[name] / dense_macs
            rows.append({"width": label, "hidden": heads * head_dim, "variant": name, "median_s": med,
                         "times_s": times[name], "macs": macs[name], "mac_ratio": mac_ratio, "speedup": speedup,
                         "realized_over_mac": speedup * mac_ratio})
            print(f"{label:18s} {name:16s} {med:8.3f} s  speedup {speedup:5.2f}x  MACs {mac_ratio:.3f}  "
                  f"realized/MAC {speedup * mac_ratio:5.0%}", flush=True)
    result = {
        **script_run_record("benchmarks/bench_forecast_overhead.py", argv, args.threads),
        "config": {"blocks": args.blocks, "batch": args.batch, "tokens": 256, "steps": args.steps,
                   "interval": args.interval, "warmup": warmup, "repeats": args.repeats},
        "rows": rows,
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
