"""Exploration: does giving the front and rear halves of the block stack their own computed
steps (Δ-DiT's observation, calibrated) buy PSNR per MAC over whole-step schedules?
Mean per-sample PSNR on the 4 calibration seeds and 16 held-out seeds, fitted forecast, and
MACs of the calibration run relative to the unoptimized model.

    python benchmarks/exploration/span_schedule.py dit-digits 35
    python benchmarks/exploration/span_schedule.py flux-digits 8

Output: benchmarks/results/exploration/span_schedule_<model>.log (stdout, as run).
"""
import sys, ditopt
from ditopt.passes.caching.schedule import quantile_schedule, span_residual_sketch, step_changes
from explore_setup import calibrated, macs_of, print_row, setup

name = sys.argv[1]; ks = [int(x) for x in sys.argv[2].split(',')]
b, m, calA, val = setup(name)
refA = calA(m); refV = val(m)
base = macs_of(calA, m)
stats, changes = calibrated(b, m, calA)
blocks = stats.require("block_residual_sketch").shape[2]
split = blocks // 2
front = step_changes(span_residual_sketch(stats, 0, split - 1))
rear = step_changes(span_residual_sketch(stats, split, blocks - 1))


def run(label, masks):
    steps_per_span = [tuple(i for i, c in enumerate(mk) if c) for mk in masks]
    if len(masks) == 1:
        p = {"name": "calibrated_schedule", "compute_steps": steps_per_span[0], "forecast": "fitted", "order": 1}
    else:
        p = {"name": "calibrated_schedule", "span_starts": (split,), "span_compute_steps": steps_per_span, "forecast": "fitted", "order": 1}
    o = ditopt.optimize(m, {"name": "x", "passes": [p]}, example_inputs=b.make_inputs(2), stats=stats, calibration=calA)
    print_row(label, o, base, calA, refA, val, refV)


for k in ks:
    for w in (2,):
        for a in (0.0, 1.0):
            run(f"whole k={k} w{w} a{a}", [quantile_schedule(changes, k, w, a)])
            for kf, kr in ((k - 1, k + 1), (k + 1, k - 1), (k - 2, k + 2), (k + 2, k - 2), (k - 4, k + 4), (k + 4, k - 4)):
                run(f"span f={kf} r={kr} w{w} a{a}", [quantile_schedule(front, kf, w, a), quantile_schedule(rear, kr, w, a)])
