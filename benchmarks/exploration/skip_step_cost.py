"""Where a cached generation's time goes, by wall clock: each forward call of the optimized model
is timed and filed as computed or skipped (the runtime's record says which), the rest of the
generation is the sampler. The fixed schedule (computed step indices) is given, with the fitted
forecast, alone, with `conditioning_memo` and with `patch_layout` too; the eager model is timed
in the same rounds.
4 samples (CFG batch 8) per generation, 1 warm-up then 7 rounds round-robin; medians.

    python benchmarks/exploration/skip_step_cost.py dit-digits 0,1,7,12,18,23,29,34,40,45

Output: benchmarks/results/exploration/skip_step_cost_MODEL.log (stdout, as run).
"""
import statistics
import sys
import time

import torch

import ditopt
from ditopt.bench.measure import mac_counter
from explore_setup import setup

name, steps = sys.argv[1], tuple(int(s) for s in sys.argv[2].split(","))
bundle, model, calibration, _ = setup(name)
schedule = {"name": "calibrated_schedule", "compute_steps": steps, "forecast": "fitted", "order": 1}
plain = ditopt.optimize(model, {"name": "s", "passes": [schedule]}, example_inputs=bundle.make_inputs(4), calibration=calibration)
memo = ditopt.optimize(model, {"name": "s+m", "passes": [schedule, {"name": "conditioning_memo"}]},
                       example_inputs=bundle.make_inputs(4), calibration=calibration, stats=plain.stats)
laid = ditopt.optimize(model, {"name": "s+m+l", "passes": [schedule, {"name": "conditioning_memo"}, {"name": "patch_layout"}]},
                       example_inputs=bundle.make_inputs(4), calibration=calibration, stats=plain.stats)


class Timed(torch.nn.Module):
    """Times every call of `inner`; files it as computed / skipped by the runtime's record."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        record = getattr(self.inner, "last_record", {})
        self.calls.append(("skipped" if record.get("cached") else "computed", time.perf_counter() - t0))
        return out


classes, seeds = [i % 10 for i in range(4)], [500 + i for i in range(4)]
runs = {"eager": Timed(model), "schedule": Timed(plain), "schedule+memo": Timed(memo), "schedule+memo+layout": Timed(laid)}
macs = {}
for key, timed in runs.items():
    bundle.sample(classes, seeds, model=timed)  # warm-up: captures this call shape, fills the memo
    with mac_counter() as count:
        bundle.sample(classes, seeds, model=timed)
        macs[key] = count()
rows: dict[str, list[tuple[float, float, float, int, int]]] = {k: [] for k in runs}
for _ in range(7):
    for key, timed in runs.items():
        timed.calls = []
        t0 = time.perf_counter()
        bundle.sample(classes, seeds, model=timed)
        total = time.perf_counter() - t0
        computed = [t for kind, t in timed.calls if kind == "computed"]
        skipped = [t for kind, t in timed.calls if kind == "skipped"]
        rows[key].append((total, sum(computed), sum(skipped), len(computed), len(skipped)))
eager_total = statistics.median(r[0] for r in rows["eager"])
eager_call = statistics.median(r[1] / r[3] for r in rows["eager"])
print(f"{name}: compute steps {list(steps)} of {rows['eager'][0][3]}, fitted forecast, "
      f"{torch.get_num_threads()} threads, 7 rounds; medians per generation of 4 samples")
print(f"eager: {eager_total * 1e3:.1f} ms per generation, {eager_call * 1e3:.2f} ms per call")
for key in ("schedule", "schedule+memo", "schedule+memo+layout"):
    total = statistics.median(r[0] for r in rows[key])
    n_c, n_s = rows[key][0][3], rows[key][0][4]
    per_c = statistics.median(r[1] / r[3] for r in rows[key])
    per_s = statistics.median(r[2] / r[4] for r in rows[key]) if n_s else 0.0
    outside = statistics.median(r[0] - r[1] - r[2] for r in rows[key])
    mac_speedup = macs["eager"] / macs[key]
    speedup = eager_total / total
    print(f"{key}: {total * 1e3:.1f} ms per generation = {n_c} computed calls x {per_c * 1e3:.2f} ms "
          f"+ {n_s} skipped x {per_s * 1e3:.2f} ms + {outside * 1e3:.1f} ms sampler; "
          f"speedup {speedup:.2f}x, MAC ratio {mac_speedup:.2f}x, realized/MAC {speedup / mac_speedup:.0%}")
