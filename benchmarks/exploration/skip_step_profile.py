"""Where a skipped step's time goes: cProfile of 3 generations of 4 samples of dit-digits with
the `balanced` schedule (10 of 50 steps, replayed, fitted forecast), after one warm-up generation.
Prints each captured segment's cumulative time per call; the two called on every step are the\nprologue and epilogue, the eight called on computed steps only are the blocks.

    python benchmarks/exploration/skip_step_profile.py

Output: benchmarks/results/exploration/skip_step_profile.log (stdout, as run).
"""
import cProfile, pstats, ditopt
from explore_setup import setup

b, m, calA, _ = setup("dit-digits")
profile = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": (0, 1, 7, 12, 18, 23, 29, 34, 40, 45),
                                    "forecast": "fitted", "order": 1}]}
opt = ditopt.optimize(m, profile, example_inputs=b.make_inputs(4), calibration=calA)
classes, seeds = [i % 10 for i in range(4)], [500 + i for i in range(4)]
b.sample(classes, seeds, model=opt)
prof = cProfile.Profile()
prof.enable()
for _ in range(3):
    b.sample(classes, seeds, model=opt)
prof.disable()
stats = pstats.Stats(prof).stats
sample_total = next(v[3] for k, v in stats.items() if k[2] == "_sample_batch")
print(f"3 generations x 4 samples x 50 steps: {sample_total:.3f} s ({sample_total / 3:.3f} s per generation)")
# Captured segments are fx GraphModules (code file "<eval_with_key>.N"): called 150 times = every
# step (prologue, epilogue), 30 times = the computed steps (blocks).
for (fname, _, func), (_, calls, _, cumulative, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
    if func == "forward" and fname.startswith("<eval_with_key>"):
        role = "every step" if calls == 150 else "computed steps" if calls == 30 else "other"
        print(f"{fname:18s} {role:15s} calls {calls:4d}  cumulative {cumulative:.3f} s  per call {cumulative / calls * 1e3:.2f} ms")
