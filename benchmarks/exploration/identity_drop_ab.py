"""A/B: capture with and without dropping identity ops (x / 1, x * 1, eval dropout, same-dtype casts), interleaved, dit-digits, 4 samples x 50 steps, 7 rounds.

    python benchmarks/exploration/identity_drop_ab.py

Output: benchmarks/results/exploration/identity_drop_ab_dit-digits.log (stdout, as run)."""
import time, statistics  # noqa: E401
import ditopt, importlib  # noqa: E401
cap = importlib.import_module("ditopt.capture")
from explore_setup import setup
b, m, calA, _ = setup("dit-digits")
classes, seeds = [i % 10 for i in range(4)], [500 + i for i in range(4)]
gen = lambda model: b.sample(classes, seeds, model=model)
profiles = {
    "exact passes only": [{"name": "conditioning_memo"}, {"name": "patch_layout"}],
    "taylor o2 N=5 +exact": [{"name": "taylor_forecast", "order": 2, "interval": 5, "warmup": 3}, {"name": "conditioning_memo"}, {"name": "patch_layout"}],
    "balanced steps +exact": [{"name": "calibrated_schedule", "compute_steps": (0, 1, 7, 12, 18, 23, 29, 34, 40, 45), "forecast": "taylor", "order": 1}, {"name": "conditioning_memo"}, {"name": "patch_layout"}],
}
real = cap.drop_identity_ops
variants = {"eager": m}
for drop in (True, False):
    cap.drop_identity_ops = real if drop else (lambda gm: 0)
    for k, passes in profiles.items():
        o = ditopt.optimize(m, {"name": "t", "passes": passes}, example_inputs=b.make_inputs(4), num_steps=50, calibration=calA)
        gen(o); o.reset()
        variants[f"{k} [{'drop' if drop else 'keep'}]"] = o
cap.drop_identity_ops = real
ref = gen(m)
times = {k: [] for k in variants}
for r in range(7):
    for k, v in variants.items():
        t0 = time.perf_counter(); out = gen(v); times[k].append(time.perf_counter() - t0)
        if hasattr(v, "reset"): v.reset()
d = statistics.median(times["eager"])
for k in variants:
    print(f"{k:36s} median {statistics.median(times[k]):.3f}s  speedup vs eager {d / statistics.median(times[k]):.3f}x")
for k in profiles:
    a, bb = statistics.median(times[f"{k} [drop]"]), statistics.median(times[f"{k} [keep]"])
    print(f"{k:36s} drop/keep time ratio {a / bb:.3f}")
