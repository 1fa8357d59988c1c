"""Exploration: at fixed computed-step masks, PSNR of the forecasts calibrated_schedule could
use: fitted per-channel weights on the stack residual (the default), Taylor order 1 on the
residual, and Taylor order 1 / 2 on each block's pre-gate features with the adaLN gate
recomputed (TaylorSeer's target). 4 calibration seeds, 16 held-out seeds.

    python benchmarks/exploration/forecast_targets.py dit-digits 11,17

Output: benchmarks/results/exploration/forecast_targets_<model>.log (stdout, as run).
"""
import sys, torch, ditopt
from ditopt import zoo
from ditopt.metrics import psnr_per_sample
from ditopt.passes.caching.schedule import quantile_schedule, step_changes, span_residual_sketch
torch.set_num_threads(2)
name = sys.argv[1]; ks = [int(x) for x in sys.argv[2].split(',')]
placements = [(1, 0.0), (2, 0.0), (2, 1.0)]
b = zoo.load(name); m = b.model
fn = lambda classes, seeds: (lambda mm: b.sample(classes, seeds, model=mm))
calA = fn([i % 10 for i in range(4)], [200000 + i for i in range(4)])
val = fn([(i + 5) % 10 for i in range(16)], [300000 + i for i in range(16)])
refA = calA(m); refV = val(m)
base = {"name": "x", "passes": [{"name": "calibrated_schedule", "computed_steps": 3, "forecast": "fitted", "order": 1, "alpha": 0.0}]}
opt = ditopt.optimize(m, base, example_inputs=b.make_inputs(2), calibration=calA)
stats = opt.stats
res = span_residual_sketch(stats, 0, stats.require("block_residual_sketch").shape[2] - 1)
changes = step_changes(res)
forecasts = [("fitted", 1, "residual"), ("taylor", 1, "residual"), ("taylor", 1, "features"), ("taylor", 2, "features")]
for k in ks:
    for w, a in placements:
        cs = tuple(i for i, c in enumerate(quantile_schedule(changes, k, w, a)) if c)
        for f, o, tgt in forecasts:
            prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": cs, "forecast": f, "order": o, "target": tgt}]}
            o_ = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
            pa = torch.tensor(psnr_per_sample(calA(o_), refA)); o_.reset()
            pv = torch.tensor(psnr_per_sample(val(o_), refV))
            print(f"k={k:2d} w{w} a{a} {f:6s} o{o} {tgt:8s} cal {pa.mean():6.2f} val {pv.mean():6.2f}", flush=True)
