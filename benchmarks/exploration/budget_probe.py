"""One ditopt.optimize at a preset or PSNR budget with the benchmark's calibration (4) and
validation (16) seeds, printing the chosen schedule, predicted and held-out PSNR (not timed).

    python benchmarks/exploration/budget_probe.py flux-digits 37.5 [RETRY_MARGIN_DB]

Output: benchmarks/results/exploration/budget_probe.log.
"""
import sys, time, ditopt
from explore_setup import setup

name = sys.argv[1]; prof = sys.argv[2]
b, m, calA, val = setup(name)
if prof[0].isdigit():
    budget = {"min_psnr_db": float(prof)}
    if len(sys.argv) > 3:
        budget["retry_margin_db"] = float(sys.argv[3])
    prof = {"name": "b", "budget": budget, "passes": [{"name": "calibrated_schedule", "order": "auto"}]}
start = time.time()
opt = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), calibration=calA, validation=val, on_gate_miss="return")
rep = opt.report.to_dict()
p = rep["passes"][0]["report"]
print(name, prof if isinstance(prof, str) else prof["budget"], 'time %.0fs' % (time.time() - start), 'sampled', sum(trial["sampled"] for trial in p["trials"]), 'trials', len(p["trials"]))
print(' k', p["computed_steps"], 'w', p.get("warmup"), 'a', p.get("alpha"), p["forecast"], 'target %.2f pred %.2f' % (p["target_psnr_db"], p["predicted_psnr_db"]), p["stages"][0]["compute_steps"])
print(' e2e', [(v.get("psnr_db"), v.get("psnr_lower_db")) for v in rep["verification"][1:]], 'retries', [(r["psnr_db"], r["psnr_lower_db"]) for r in rep["retries"]])
