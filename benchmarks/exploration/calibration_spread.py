"""How well do 4 calibration samples stand for other seeds? Per-sample PSNR of fixed schedules
(k computed steps, warm-up 1, even spacing, fitted forecast) on the benchmark's 4 calibration
seeds (classes 0-3), its 16 held-out seeds (classes 5.., other seeds) and 16 further seeds of
classes 0-9 (seeds 500000+, neither set).

    python benchmarks/exploration/calibration_spread.py dit-digits 10,33,40

Output: benchmarks/results/exploration/calibration_spread_<model>.log (stdout, as run).
"""
import sys
import time

import torch
import ditopt
from ditopt.metrics import psnr_per_sample
from ditopt.passes.caching.schedule import quantile_schedule
from explore_setup import calibrated, psnr_both, sampler, setup

name = sys.argv[1]
ks = [int(x) for x in sys.argv[2].split(",")]
b, m, calA, val = setup(name)
calC = sampler(b, [i % 10 for i in range(16)], [500000 + i for i in range(16)])
t = time.time()
refA, refV, refC = calA(m), val(m), calC(m)
print("refs", time.time() - t, flush=True)
stats, changes = calibrated(b, m, calA)


def summary(p: torch.Tensor) -> str:
    return f"mean {p.mean():6.2f} sd {p.std():5.2f} min {p.min():6.2f} max {p.max():6.2f}"


for k in ks:
    mask = quantile_schedule(changes, k, 1, 0.0)
    cs = tuple(i for i, c in enumerate(mask) if c)
    prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": cs, "forecast": "fitted", "order": 1}]}
    o = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
    pa, pv = psnr_both(o, calA, refA, val, refV)
    o.reset()
    pc = torch.tensor(psnr_per_sample(calC(o), refC))
    print(f"k={k} cal4 {summary(pa)} | ho16 {summary(pv)} | other16 {summary(pc)}", flush=True)
    for label, p in (("cal4", pa), ("ho16", pv), ("other16", pc)):
        print(f"  {label}", [round(x, 1) for x in p.tolist()])
