"""Exploration: does picking, at a step count, the placement that reads highest on the 4
calibration seeds (calibrated_schedule's rule) also pick the best one on the 16 held-out seeds?
All nine placements (warm-up 1-3 x alpha 0/0.5/1, fitted forecast) at each step count: mean
per-sample PSNR on calibration / held-out seeds, then the calibration argmax against the mean.

    python benchmarks/exploration/placement_selection.py 10,20,35,40

Output: benchmarks/results/exploration/placement_selection_dit-digits.log (stdout, as run).
"""
import sys
import ditopt
from ditopt.passes.caching.schedule import quantile_schedule
from explore_setup import calibrated, psnr_both, setup
b, m, calA, val = setup("dit-digits")
refA, refV = calA(m), val(m)
stats, changes = calibrated(b, m, calA)
ks = [int(x) for x in sys.argv[1].split(",")]
for k in ks:
    rows = []
    for w in (2, 1, 3):
        for a in (0.0, 0.5, 1.0):
            cs = tuple(i for i, c in enumerate(quantile_schedule(changes, k, w, a)) if c)
            prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": cs, "forecast": "fitted", "order": 1}]}
            o = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
            pa, pv = psnr_both(o, calA, refA, val, refV)
            rows.append((float(pa.mean()), float(pv.mean()), f"w{w} a{a}"))
    best = max(rows)
    mean_v = sum(r[1] for r in rows) / len(rows)
    print(f"k={k} " + " ".join(f"{n}:{c:.1f}/{v:.1f}" for c, v, n in rows), flush=True)
    print(f"k={k} argmax-cal {best[2]} cal {best[0]:.1f} val {best[1]:.1f} | mean val over placements {mean_v:.1f} | mean cal {sum(r[0] for r in rows)/len(rows):.1f}", flush=True)
