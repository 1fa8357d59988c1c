#!/usr/bin/env python
"""Depth pruning (`layer_prune`, issue 30) on a zoo model, side by side in one run.

Rows, all sampled on the same unseen (class, seed) pairs (none used by calibration or the
search's validation) and compared with the original model's samples:

* `original`: the model as trained;
* `searched`: `layer_prune` with only a PSNR budget (the search chooses blocks and full steps,
  with the linear bridge); its report's predicted and held-out PSNR are given beside the unseen one;
* `searched, no bridge`: the same blocks and full steps passed through (what the bridge buys);
* `searched, whole steps`: the same blocks with the bridge removed on every step (what
  step-ranged removal buys);
* `cosine rule`: the rule peers suggest (remove the k blocks whose output is most similar to
  their input, cos prior from calibration), at the searched k and full steps, no bridge.

Speed: wall-clock of one generation of `--batch` samples, the methods interleaved, median of
`--repeats`; MACs per generation from the flop counter (ditopt.costs). Fixed seeds; writes JSON.

    python benchmarks/bench_layer_prune.py --model dit-digits --budget 30 --out benchmarks/results/layer_prune.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

UNSEEN_SEED0 = 450_000  # apart from the zoo's calibration/validation seeds and other benchmarks'


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-digits")
    p.add_argument("--budget", type=float, default=30.0, help="min_psnr_db of the searched row")
    p.add_argument("--unseen", type=int, default=24)
    p.add_argument("--batch", type=int, default=4, help="samples per timed generation")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    import ditopt
    from ditopt import zoo
    from ditopt.bench.measure import script_run_record
    from ditopt.costs import mac_counter
    from ditopt.io import atomic_write_text
    from ditopt.verify import psnr_lower_bound, psnr_samples

    torch.set_num_threads(args.threads)
    bundle = zoo.load(args.model)
    classes = [(7 * i + 2) % bundle.num_classes for i in range(args.unseen)]
    seeds = [UNSEEN_SEED0 + i for i in range(args.unseen)]
    reference = bundle.sample(classes, seeds)

    def optimize(cfg: dict, budget: dict) -> tuple[object, dict, float]:
        profile = {"name": "layer-prune-bench", "budget": budget, "passes": [{"name": "layer_prune", **cfg}]}
        start = time.perf_counter()
        opt = ditopt.optimize(bundle.model, ditopt.load_profile(profile), example_inputs=bundle.make_inputs(2),
                              calibration=bundle.calibration_fn(), validation=bundle.validation_fn(),
                              on_gate_miss="return")
        seconds = time.perf_counter() - start
        record = next(r for r in opt.report.passes if r.name == "layer_prune")
        return opt, record.report, seconds

    searched, rep, seconds = optimize({}, {"min_psnr_db": args.budget})
    check = next((v for v in searched.report.verification if v["kind"] == "end-to-end"), {})
    methods: dict[str, dict] = {"original": {"model": bundle.model}}
    methods["searched"] = {"model": searched, "optimize_s": round(seconds, 1), "report": {
        "removed": rep.get("removed"), "full_steps": rep.get("full_steps"), "predicted_psnr_db": rep.get("predicted_psnr_db"),
        "target_psnr_db": rep.get("target_psnr_db"), "held_out_mean_db": check.get("psnr_db"),
        "held_out_lower_db": check.get("psnr_lower_db"), "passed": searched.report.passed,
        "bridges": rep.get("bridges"), "skipped": rep.get("skipped")}}
    removed, full = rep.get("removed"), rep.get("full_steps", 0)
    loose = {"max_rel_err": 1.0}  # explicit settings apply as written; the unseen PSNR judges them
    if removed:
        for name, cfg in {"searched, no bridge": {"blocks": removed, "full_steps": full, "bridge": "none"},
                          "searched, whole steps": {"blocks": removed, "full_steps": 0, "bridge": "linear"}}.items():
            opt, r, s = optimize(cfg, loose)
            methods[name] = {"model": opt, "optimize_s": round(s, 1)}
        prior = sorted(rep["cosine_prior"].items(), key=lambda kv: -kv[1])
        naive = sorted(int(b) for b, _ in prior[: len(removed)])
        opt, r, s = optimize({"blocks": naive, "full_steps": full, "bridge": "none"}, loose)
        methods["cosine rule"] = {"model": opt, "optimize_s": round(s, 1), "report": {"removed": naive, "full_steps": full}}

    timing_classes, timing_seeds = classes[: args.batch], seeds[: args.batch]
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, m in methods.items():  # interleaved: load drifts hit every method alike
            start = time.perf_counter()
            bundle.sample(timing_classes, timing_seeds, model=m["model"])
            times[name].append(time.perf_counter() - start)
    rows = []
    base_time = statistics.median(times["original"])
    for name, m in methods.items():
        # Counted on the timed batch, whose shapes the runtime has captured already: a first call
        # at a new shape captures it, and the counter would count the capture's trace too.
        with mac_counter() as macs:
            bundle.sample(timing_classes, timing_seeds, model=m["model"])
        values = psnr_samples(bundle.sample(classes, seeds, model=m["model"]), reference)
        finite = [v for v in values if v != float("inf")] or [float("inf")]
        row = {"method": name, "macs_per_sample": macs() / len(timing_seeds), "seconds_per_generation": statistics.median(times[name]),
               "speedup": base_time / statistics.median(times[name]),
               "unseen_mean_db": sum(finite) / len(finite) if name != "original" else None,
               "unseen_lower90_db": psnr_lower_bound(values, 0.9) if name != "original" else None,
               "unseen_min_db": min(values) if name != "original" else None,
               **{k: v for k, v in m.items() if k != "model"}}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    macs0 = rows[0]["macs_per_sample"]
    for row in rows:
        row["macs_saved"] = 1.0 - row["macs_per_sample"] / macs0
    result = {"run": script_run_record("benchmarks/bench_layer_prune.py", argv, args.threads), "model": args.model,
              "budget_db": args.budget, "unseen": {"samples": args.unseen, "seeds": [seeds[0], seeds[-1]],
                                                   "classes": "7i+2 mod classes"},
              "timing": {"batch": args.batch, "repeats": args.repeats, "seconds": times}, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
