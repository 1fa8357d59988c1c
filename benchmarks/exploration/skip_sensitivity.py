"""Exploration: does placing the skipped steps by their measured cost beat the quantile
schedule at high PSNR? Per step, the calibration-seed MSE of skipping that step alone (every
other step computed, fitted forecast); then, per step count, skip the cheapest steps (no two
adjacent where the count allows) and compare held-out PSNR with the best of six quantile
placements at the same count. "pred" adds the single-skip MSEs as if independent.

    python benchmarks/exploration/skip_sensitivity.py dit-digits 26,28,30,32,35

Output: benchmarks/results/exploration/skip_sensitivity_dit-digits.log (stdout, as run; that
run was stopped after 26 and 28: the placement read no better than the quantile schedule).
"""
import sys, time, math  # noqa: E401
import ditopt
from ditopt.passes.caching.schedule import quantile_schedule
from explore_setup import calibrated, psnr_both, setup
name = sys.argv[1] if len(sys.argv) > 1 else "dit-digits"
b, m, calA, val = setup(name)
refA, refV = calA(m), val(m)
stats, changes = calibrated(b, m, calA)
steps = stats.num_steps
def run(cs, held=False):
    prof = {"name": "x", "passes": [{"name": "calibrated_schedule", "compute_steps": tuple(cs), "forecast": "fitted", "order": 1}]}
    o = ditopt.optimize(m, prof, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
    if held:
        pa, pv = psnr_both(o, calA, refA, val, refV)
        return float(pa.mean()), float(pv.mean())
    x = calA(o)
    mse = float(((x - refA) ** 2).mean())
    return mse
t0 = time.time()
cost = {}
for s in range(2, steps):
    cs = [i for i in range(steps) if i != s]
    cost[s] = run(cs)
print("time", time.time() - t0, flush=True)
print("single-skip mse x1e9 by step:", {s: round(v * 1e9, 2) for s, v in cost.items()}, flush=True)
order = sorted(cost, key=cost.get)
for k in [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "26,28,30,32,35").split(",")]:
    skip_n = steps - k
    chosen = []
    for s in order:  # cheapest first, no two adjacent skips
        if len(chosen) == skip_n: break
        if s - 1 in chosen or s + 1 in chosen: continue
        chosen.append(s)
    if len(chosen) < skip_n:
        chosen += [s for s in order if s not in chosen][: skip_n - len(chosen)]
    cs = [i for i in range(steps) if i not in chosen]
    pred = 10 * math.log10(4 / sum(cost[s] for s in chosen))  # range [-1,1] -> MAX^2 = 4
    sens = run(cs, held=True)
    best_q = max((run([i for i, c in enumerate(quantile_schedule(changes, k, w, a)) if c], held=True), f"w{w}a{a}") for w in (1, 2, 3) for a in (0.0, 0.5))
    print(f"k={k} sensitivity-greedy cal/val {sens[0]:.1f}/{sens[1]:.1f} (pred {pred:.1f}) skipped {sorted(chosen)} | best quantile {best_q[1]} cal/val {best_q[0][0]:.1f}/{best_q[0][1]:.1f}", flush=True)
