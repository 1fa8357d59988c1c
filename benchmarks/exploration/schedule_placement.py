"""Exploration behind the calibrated_schedule placement search (docs/design.md): PSNR of
fixed-count schedules over nine placements (warm-up 1-3 x alpha 0/0.5/1, plus "+last": the
last step forced computed) on 4 calibration seeds and 16 held-out seeds, fitted forecast.

    python benchmarks/exploration/schedule_placement.py flux-digits 7,8,11

Output: benchmarks/results/exploration/schedule_placement_<model>.log (stdout, as run).
"""
import sys, ditopt
from ditopt.passes.caching.schedule import quantile_schedule
from explore_setup import calibrated, psnr_both, setup

name = sys.argv[1]; ks = [int(x) for x in sys.argv[2].split(',')]
b, m, calA, val = setup(name)
refA = calA(m); refV = val(m)
stats, changes = calibrated(b, m, calA)
def run(mask, label):
    cs = tuple(i for i, c in enumerate(mask) if c)
    prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": cs, "forecast": "fitted", "order": 1}]}
    o = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
    pa, pv = psnr_both(o, calA, refA, val, refV)
    print(f"{label:28s} k={len(cs):2d} cal {pa.mean():6.2f} val {pv.mean():6.2f} {cs}", flush=True)
for k in ks:
    for w in (1, 2, 3):
        for a in (0.0, 0.5, 1.0):
            mask = quantile_schedule(changes, k, w, a)
            run(mask, f"w{w} a{a}")
            if not mask[-1]:
                m2 = quantile_schedule(changes, k - 1, w, a); m2[-1] = True
                run(m2, f"w{w} a{a} +last")
