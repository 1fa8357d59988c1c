#!/usr/bin/env python
"""Does a PSNR budget hold on seeds and classes nobody has seen? (issue 28)

README's two ways to call `optimize` with a budget preset, on a zoo model:

* `calibration-only`: `optimize(model, PRESET, calibration=fn)` with a plain sampling function
  of `--calibration-samples` seeds and no `validation=` (the check then holds out every other
  calibration sample);
* `with-validation`: the same plus `validation=` on `--validation-samples` other seeds.

Each is run `--trials` times with other calibration (and validation) seeds and classes, and the
result is sampled on `--unseen` (class, seed) pairs none of those runs used. Reported per run: what
the report said (passed, the held-out bound), and the unseen samples' mean, one-sided 90% lower
bound and worst PSNR against the original model. The budget holds when the unseen mean meets it.

    python benchmarks/trust_unseen_seeds.py --model dit-digits --preset balanced --trials 3 \\
        --out benchmarks/results/trust_unseen_seeds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

UNSEEN_SEED0, TRIAL_SEED0 = 430_000, 410_000  # apart from the zoo's and the model benchmark's seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-digits")
    p.add_argument("--preset", default="balanced")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--calibration-samples", type=int, default=10)
    p.add_argument("--validation-samples", type=int, default=12)
    p.add_argument("--unseen", type=int, default=40)
    p.add_argument("--modes", nargs="+", default=["calibration-only", "with-validation"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    import ditopt
    from ditopt import zoo
    from ditopt.bench.measure import script_run_record
    from ditopt.io import atomic_write_text
    from ditopt.verify import psnr_lower_bound, psnr_samples

    torch.set_num_threads(args.threads)
    bundle = zoo.load(args.model)
    budget = ditopt.load_profile(args.preset).budget.min_psnr_db
    unseen_classes = [(3 * i + 1) % bundle.num_classes for i in range(args.unseen)]
    unseen_seeds = [UNSEEN_SEED0 + i for i in range(args.unseen)]
    reference = bundle.sample(unseen_classes, unseen_seeds)
    rows = []
    for trial in range(args.trials):
        base = TRIAL_SEED0 + 1000 * trial
        cal = ([(i + trial) % 10 for i in range(args.calibration_samples)], [base + i for i in range(args.calibration_samples)])
        val = ([(i + 5 + trial) % 10 for i in range(args.validation_samples)], [base + 500 + i for i in range(args.validation_samples)])
        for mode in args.modes:
            calibration = lambda m, c=cal: bundle.sample(*c, model=m)  # noqa: E731 (a plain function: no held_out())
            validation = (lambda m, v=val: bundle.sample(*v, model=m)) if mode == "with-validation" else None
            start = time.perf_counter()
            opt = ditopt.optimize(bundle.model, args.preset, example_inputs=bundle.make_inputs(2), calibration=calibration,
                                  validation=validation, on_gate_miss="return")
            seconds = time.perf_counter() - start
            check = next(v for v in opt.report.verification if v["kind"] == "end-to-end")
            values = psnr_samples(bundle.sample(unseen_classes, unseen_seeds, model=opt), reference)
            schedule = next((r.report for r in opt.report.passes if "computed_steps" in r.report), {})
            row = {
                "trial": trial, "mode": mode, "budget_db": budget, "optimize_s": round(seconds, 1),
                "report_passed": opt.report.passed, "held_out_from": check["details"][0].get("samples_from"),
                "held_out_samples": check["details"][0].get("samples"),
                "held_out_mean_db": check.get("psnr_db"), "held_out_lower_db": check.get("psnr_lower_db"),
                "retries": len(opt.report.retries), "computed_steps": schedule.get("computed_steps"),
                "predicted_psnr_db": schedule.get("predicted_psnr_db"),
                "unseen_samples": len(values), "unseen_mean_db": sum(values) / len(values),
                "unseen_lower90_db": psnr_lower_bound(values, 0.9), "unseen_min_db": min(values),
            }
            row["budget_holds_on_unseen"] = row["unseen_mean_db"] >= budget
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"run": script_run_record("benchmarks/trust_unseen_seeds.py", argv, args.threads), "model": args.model,
              "preset": args.preset, "unseen": {"seeds": [unseen_seeds[0], unseen_seeds[-1]], "classes": "3i+1 mod 10"},
              "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    held = sum(r["budget_holds_on_unseen"] for r in rows)
    flagged_misses = sum(1 for r in rows if not r["budget_holds_on_unseen"] and not r["report_passed"])
    print(f"budget held on unseen seeds in {held}/{len(rows)} runs; of the misses, {flagged_misses} were flagged by the report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
