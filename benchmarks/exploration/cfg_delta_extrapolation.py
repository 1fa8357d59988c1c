"""Does extrapolating the CFG difference help conditional-only steps? Same wrapper as
cfg_reuse_probe.py (model-output level, every unmarked step computed in full), but the
unconditional half on a marked step is rebuilt from the conditional output plus the difference
(unconditional minus conditional) either frozen at the last full step (order 0, what the pass
does) or extrapolated linearly in the step index from the last two full steps (order 1).

    python benchmarks/exploration/cfg_delta_extrapolation.py dit-digits
"""
import sys, torch
from explore_setup import CondOnlyOutput, cond_only_patterns, setup
from ditopt.metrics import psnr_per_sample

name = sys.argv[1]
bundle, model, calibration, held_out = setup(name)

ref = held_out(model)
steps = bundle.default_steps
patterns = [p for p in cond_only_patterns(steps) if p[0] != "every other, last third"]
for label, pat in patterns:
    for order in (0, 1):
        x = held_out(CondOnlyOutput(model, pat, order))
        p = torch.tensor(psnr_per_sample(x, ref))
        full = sum(1 for s in range(steps) if pat(s) or s == 0)
        print(f"{label:22s} order {order} full {full}/{steps}  psnr mean {p.mean():.2f} min {p.min():.2f}", flush=True)
