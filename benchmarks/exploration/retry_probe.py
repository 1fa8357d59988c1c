"""One calibrated_schedule budget, optimize's attempts printed: each attempt's chosen schedule
(computed and conditional-only steps), calibration PSNR, and the held-out gate's mean and bound.

    python benchmarks/exploration/retry_probe.py dit-digits 30 [cfg_reuse auto|off] [key=value ...]

key=value pairs (JSON values) override calibrated_schedule's config, e.g. alpha=0;
calibration_samples=N calibrates on N seeds (classes 0..N-1 cycling) instead of 4.
"""
import json
import sys
import time

from explore_setup import setup
import ditopt

name, budget = sys.argv[1], float(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "auto"
overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
calibration_samples = int(overrides.pop("calibration_samples", 4))
bundle, model, calibration, held_out = setup(name, calibration_samples)
profile = {"name": f"b{budget}", "budget": {"min_psnr_db": budget, "max_rel_err": 1e-4},
           "passes": [{"name": "calibrated_schedule", "order": "auto", "cfg_reuse": mode, **overrides},
                      {"name": "conditioning_memo"}, {"name": "patch_layout"}]}
t0 = time.perf_counter()
opt = ditopt.optimize(model, profile, example_inputs=bundle.make_inputs(2), calibration=calibration, validation=held_out, on_gate_miss="return")
report = opt.report.to_dict()
print(f"build {time.perf_counter() - t0:.0f} s")
for attempt in report.get("retries", []) + [v for v in report["verification"] if v["kind"] == "end-to-end"]:
    print("gate:", {k: attempt.get(k) for k in ("passed", "psnr_db", "psnr_lower_db")}, attempt.get("details", [])[-1:])
rep = next(p for p in report["passes"] if p["name"] == "calibrated_schedule")["report"]
print("final:", {k: rep.get(k) for k in ("computed_steps", "cond_only_steps", "target_psnr_db", "predicted_psnr_db")})
