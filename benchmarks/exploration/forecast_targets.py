"""Exploration: at fixed computed-step masks, PSNR of the forecasts calibrated_schedule could
use: fitted per-channel weights on the stack residual (the default), Taylor order 1 on the
residual, and Taylor order 1 / 2 on each block's pre-gate features with the adaLN gate
recomputed (TaylorSeer's target). 4 calibration seeds, 16 held-out seeds.

    python benchmarks/exploration/forecast_targets.py dit-digits 11,17

Output: benchmarks/results/exploration/forecast_targets_<model>.log (stdout, as run).
"""
import sys, ditopt
from ditopt.passes.caching.schedule import quantile_schedule
from explore_setup import calibrated, psnr_both, setup

name = sys.argv[1]; ks = [int(x) for x in sys.argv[2].split(',')]
placements = [(1, 0.0), (2, 0.0), (2, 1.0)]
b, m, calA, val = setup(name)
refA = calA(m); refV = val(m)
stats, changes = calibrated(b, m, calA)
forecasts = [("fitted", 1, "residual"), ("taylor", 1, "residual"), ("taylor", 1, "features"), ("taylor", 2, "features")]
for k in ks:
    for w, a in placements:
        cs = tuple(i for i, c in enumerate(quantile_schedule(changes, k, w, a)) if c)
        for f, o, tgt in forecasts:
            prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": cs, "forecast": f, "order": o, "target": tgt}]}
            o_ = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
            pa, pv = psnr_both(o_, calA, refA, val, refV)
            print(f"k={k:2d} w{w} a{a} {f:6s} o{o} {tgt:8s} cal {pa.mean():6.2f} val {pv.mean():6.2f}", flush=True)
