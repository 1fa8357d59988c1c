"""A/B: TaylorSeer feature forecasting (taylor_forecast, target='features', order 2) with the
stacked forecast of additive blocks against the per-block path, interleaved with the eager
model; dit-digits, 4 samples (CFG batch 8) x 50 steps, 7 rounds, medians. Each computed / skipped
call is timed too. MACs by torch's flop counter (the stacked path's batched products included).

    python benchmarks/exploration/stacked_forecast_ab.py

Output: benchmarks/results/exploration/stacked_forecast_ab_dit-digits.log (stdout, as run)."""
import dataclasses
import os
import statistics
import time

import torch

import ditopt
from ditopt import zoo
from ditopt.bench.measure import mac_counter
from ditopt.passes.caching.features import FeatureForecast

torch.set_num_threads(2)
bundle = zoo.load("dit-digits")
classes, seeds = [0, 1, 2, 3], [500, 501, 502, 503]
calls: list[tuple[str, str, float]] = []


class Timed(torch.nn.Module):
    def __init__(self, key, inner):
        super().__init__()
        self.key, self.inner = key, inner

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        record = getattr(self.inner, "last_record", {})
        calls.append((self.key, "skipped" if record.get("cached") else "computed", time.perf_counter() - t0))
        return out


def build(interval: int, stacked: bool):
    profile = {"name": "t", "passes": [{"name": "taylor_forecast", "order": 2, "interval": interval, "warmup": 3}]}
    opt = ditopt.optimize(bundle.model, profile, example_inputs=bundle.make_inputs(4), num_steps=50)
    bundle.sample(classes, [1, 2, 3, 4], model=opt)  # captures the sampler's call shape
    for program in opt.programs:
        plan = list(program.plan)
        for i, stage in enumerate(plan):
            if isinstance(stage, FeatureForecast):
                assert stage.additive is not None
                if not stacked:
                    plan[i] = dataclasses.replace(stage, additive=None)
        program.plan = tuple(plan)
    return opt


runs = {"eager": bundle.model}
for n in (2, 3, 5):
    runs[f"N={n} per-block"] = build(n, False)
    runs[f"N={n} stacked"] = build(n, True)
runs = {k: Timed(k, m) for k, m in runs.items()}
outs, macs = {}, {}
for key, model in runs.items():
    with mac_counter() as count:
        outs[key] = bundle.sample(classes, seeds, model=model)
        macs[key] = count()
times: dict[str, list[float]] = {k: [] for k in runs}
keys = list(runs)
calls.clear()
for r in range(7):
    for key in keys[r % len(keys):] + keys[: r % len(keys)]:
        t0 = time.perf_counter()
        bundle.sample(classes, seeds, model=runs[key])
        times[key].append(time.perf_counter() - t0)
ref = statistics.median(times["eager"])
print(f"dit-digits, taylor_forecast order 2 features, warm-up 3; {torch.get_num_threads()} threads; "
      f"load average {os.getloadavg()}")
for key in runs:
    med = statistics.median(times[key])
    speed, mac_ratio = ref / med, macs["eager"] / macs[key]
    per = {kind: [d for k, kk, d in calls if k == key and kk == kind] for kind in ("computed", "skipped")}
    split = ", ".join(f"{len(v) // 7} {kind} x {statistics.median(v) * 1e3:.2f} ms" for kind, v in per.items() if v)
    diff = ""
    if "stacked" in key:
        diff = f"; max |stacked - per-block| {(outs[key] - outs[key.replace('stacked', 'per-block')]).abs().max().item():.1e}"
    print(f"{key:16s} {med * 1e3:7.1f} ms per generation ({split}); speedup {speed:.2f}x, MAC ratio {mac_ratio:.2f}x, "
          f"realized/MAC {speed / mac_ratio * 100:.1f}%{diff}")
