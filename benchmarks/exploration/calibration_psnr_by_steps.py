"""Exploration: mean per-sample PSNR on the 4 calibration seeds of dit-digits for every
placement (warm-up 1-3 x alpha 0/0.5/1, fitted forecast) at 32..42 computed steps of 50: is it
monotone in the step count, as the budget search's bisection assumes?

    python benchmarks/exploration/calibration_psnr_by_steps.py

Output: benchmarks/results/exploration/calibration_psnr_by_steps_dit-digits.log (stdout, as run).
"""
import ditopt
from ditopt.metrics import psnr
from ditopt.passes.caching.schedule import quantile_schedule
from explore_setup import calibrated, setup
b, m, calA, val = setup("dit-digits")
refA = calA(m)
stats, changes = calibrated(b, m, calA)
for w in (2, 1, 3):
    for a in (0.0, 0.5, 1.0):
        row = []
        for k in range(32, 43):
            cs = tuple(i for i, c in enumerate(quantile_schedule(changes, k, w, a)) if c)
            prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": cs, "forecast": "fitted", "order": 1}]}
            o = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
            row.append(psnr(calA(o), refA))
        print(f"w{w} a{a}", " ".join(f"{k}:{p:.1f}" for k, p in zip(range(32, 43), row)), flush=True)
