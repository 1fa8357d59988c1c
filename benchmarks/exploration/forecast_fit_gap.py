"""Is the calibration-to-held-out PSNR gap of the fitted forecast over-fitting? Fits the
weights on the 4 calibration seeds (A4) or on 12 other samples (B12), same schedule, and
measures both on the calibration seeds and on 16 held-out seeds.

    python benchmarks/exploration/forecast_fit_gap.py dit-digits 26

Output: benchmarks/results/exploration/forecast_fit_gap_<model>_<k>.log (stdout, as run).
"""
import sys, time, ditopt
from explore_setup import psnr_both, sampler, setup

name = sys.argv[1]; k = int(sys.argv[2])
b, m, calA, val = setup(name)
calB = sampler(b, [(i+3) % 10 for i in range(12)], [400000 + i for i in range(12)])
t=time.time()
refA = calA(m); refV = val(m)
print('refs', time.time()-t, flush=True)
prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "computed_steps": k, "forecast": "fitted", "order": 1, "alpha": 0.0}]}
for label, cal in [("A4", calA), ("B12", calB)]:
    opt = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), calibration=cal)
    pa, pv = psnr_both(opt, calA, refA, val, refV)
    print(label, 'k', k, 'calA mean %.2f' % pa.mean(), 'val mean %.2f sd %.2f' % (pv.mean(), pv.std()), flush=True)
