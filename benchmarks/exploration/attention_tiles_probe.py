"""Exploration: which tile and radius the neighbourhood attention should use on a model, from
its calibrated attention masses, the end PSNR of forcing each choice on every layer, and the
time of one transformer call (batch 8 with CFG, the benchmark's shape) against the dense model.

    python benchmarks/exploration/attention_tiles_probe.py dit-digits-p1
    python benchmarks/exploration/attention_tiles_probe.py dit-digits-p1 pisa   # block-sparse (PISA) instead

Output: benchmarks/results/exploration/attention_tiles_probe_<model>[_pisa].log (stdout, as run).
"""
import statistics
import sys
import time

import torch

import ditopt
from explore_setup import macs_of, print_row, setup


def profile(attention):
    return {"name": "x", "budget": {"max_rel_err": 1.0}, "passes": [attention, {"name": "patch_layout"}]}


def call_ms(model, inputs, repeats=7):
    with torch.no_grad():
        model(**inputs, return_dict=False)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


name = sys.argv[1] if len(sys.argv) > 1 else "dit-digits-p1"
pisa = len(sys.argv) > 2 and sys.argv[2] == "pisa"
bundle, model, calibration, held_out = setup(name)
ref_cal, ref_val = calibration(model), held_out(model)
base_macs = macs_of(calibration, model)
kw = {"example_inputs": bundle.make_inputs(2), "calibration": calibration, "validation": held_out}
if pisa:
    forced = lambda tile, rho: {"name": "block_sparse_attention", "tile": tile, "rho": rho, "min_mass": 0.0, "max_cost": None}  # noqa: E731
    variants, key, unit = ((8, 0.5), (8, 0.25), (4, 0.5)), "block_mass", "rho (0.125, 0.25, 0.5)"
else:
    forced = lambda tile, radius: {"name": "neighborhood_attention", "tile": tile, "radius": radius, "min_mass": 0.0, "max_cost": None}  # noqa: E731
    variants, key, unit = ((4, 1), (4, 2), (8, 1)), "window_mass", "radii (1, 2, 3)"
first = ditopt.optimize(model, profile(forced(*variants[0])), **kw)
stats = first.stats
meta = stats.meta["attention"] if "attention" in stats.meta else {}
print("grid", meta.get("grid"), "tiles", meta.get("tiles"), unit)
for tile in meta.get("tiles", (2, 4, 8)):
    w = stats.tensors[f"attention.{key}.tile{tile}"]  # [blocks, heads, radii | rhos]
    for b in range(w.shape[0]):
        print(f"tile {tile} block {b}: {key} mean over heads "
              + " ".join(f"r{r + 1}={float(w[b, :, r].mean()):.3f}" for r in range(w.shape[2]))
              + "  min head " + " ".join(f"{float(w[b, :, r].min()):.3f}" for r in range(w.shape[2])))
inputs = bundle.make_inputs(8)
dense_ms = call_ms(model, inputs)
print(f"dense call {dense_ms:.1f} ms")
for variant in variants:
    opt = first if variant == variants[0] else ditopt.optimize(model, profile(forced(*variant)), stats=stats, **kw)
    opt.reset()
    ms = call_ms(opt, inputs)
    opt.reset()
    label = f"PISA tile {variant[0]} rho {variant[1]}" if pisa else f"NA tile {variant[0]} r{variant[1]}"
    print_row(f"{label} ({dense_ms / ms:.2f}x/call)", opt, base_macs, calibration, ref_cal, held_out, ref_val)
pass_name = "block_sparse_attention" if pisa else "neighborhood_attention"
for tile in (4, 8):
    opt = ditopt.optimize(model, profile({"name": pass_name, "tile": tile}), stats=stats, **kw)
    rep = next(p for p in opt.report.to_dict()["passes"] if p["name"] == pass_name)["report"]
    print(f"{pass_name} auto at tile {tile}: substituted {rep['substituted']}, radius/rho {[l.get('radius', l.get('rho')) for l in rep['layers']]}, "
          f"dense_steps {[l.get('dense_steps') for l in rep['layers']]}, predicted attention saving "
          f"{rep['predicted_attention_flop_saving']:.2f}")
