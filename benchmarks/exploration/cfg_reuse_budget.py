"""calibrated_schedule at one PSNR budget with and without conditional-only steps (CFG reuse):
chosen schedule, held-out PSNR, and wall-clock per sample timed side by side (alternating).

    python benchmarks/exploration/cfg_reuse_budget.py dit-digits 48 [batch] [repeats]
"""
import statistics
import sys
import time

import torch

from explore_setup import setup
import ditopt
from ditopt.metrics import psnr_per_sample

name, budget = sys.argv[1], float(sys.argv[2])
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 4
repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 5
bundle, model, calibration, held_out = setup(name)
ref = held_out(model)
timing_classes, timing_seeds = [i % 10 for i in range(batch)], [400000 + i for i in range(batch)]

runs = {"eager": model}
for mode in ("off", "auto"):
    profile = {"name": f"b{budget}-{mode}", "budget": {"min_psnr_db": budget, "max_rel_err": 1e-4},
               "passes": [{"name": "calibrated_schedule", "order": "auto", "cfg_reuse": mode},
                          {"name": "conditioning_memo"}, {"name": "patch_layout"}]}
    t0 = time.perf_counter()
    opt = ditopt.optimize(model, profile, example_inputs=bundle.make_inputs(2), calibration=calibration, validation=held_out, on_gate_miss="return")
    build = time.perf_counter() - t0
    rep = next(p for p in opt.report.to_dict()["passes"] if p["name"] == "calibrated_schedule")["report"]
    opt.reset()
    p = torch.tensor(psnr_per_sample(held_out(opt), ref))
    opt.reset()
    opt.prepare(**bundle.make_inputs(batch), return_dict=False)
    print(f"cfg_reuse={mode}: computed {rep.get('computed_steps')} cond-only {rep.get('cond_only_steps', [])} "
          f"calibration {rep.get('predicted_psnr_db'):.2f} dB, held-out mean {p.mean():.2f} dB (min {p.min():.2f}), build {build:.0f} s", flush=True)
    runs[mode] = opt

times = {k: [] for k in runs}
with torch.inference_mode():
    for r in range(repeats + 1):
        for k, m in runs.items():
            if hasattr(m, "reset"):
                m.reset()
            t0 = time.perf_counter()
            bundle.sample(timing_classes, timing_seeds, model=m)
            if r:  # the first round warms up
                times[k].append((time.perf_counter() - t0) / batch)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in med.items():
    print(f"{k:6s} {v * 1e3:8.1f} ms/sample  speedup {med['eager'] / v:.2f}x  (runs: {', '.join(f'{x * 1e3:.0f}' for x in times[k])})")
print(f"auto vs off: {med['off'] / med['auto']:.3f}x")
