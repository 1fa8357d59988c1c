#!/usr/bin/env python
"""Class accuracy and feature Frechet distance of ditopt presets on many samples.

The model benchmark measures quality on 32 samples per setting, where the feature Frechet
distance (FFD) is dominated by sampling noise (128-d features, rank-deficient covariance). This
script generates ``--samples`` held-out (class, seed) pairs with the unoptimized model and with
each preset (calibrated on the benchmark's calibration seeds, disjoint from the evaluation seeds),
and reports class accuracy, FFD against the held-out real digits and PSNR against the baseline.
The FFD of two disjoint halves of the baseline's own samples gives the noise scale.

    python benchmarks/quality_at_scale.py --model dit-digits --profiles balanced --samples 200 \
        --out benchmarks/results/quality_at_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="zoo model (repeatable; default: dit-digits and flux-digits)")
    p.add_argument("--profiles", nargs="+", default=["balanced"])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--calibration-samples", type=int, default=4)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON to merge this run's models into")
    args = p.parse_args(argv)

    import torch

    import ditopt
    from ditopt import metrics, zoo
    from ditopt.bench.runner import CAL_SEED0, EVAL_SEED0, VAL_SEED0
    from ditopt.io import atomic_write_text

    torch.set_num_threads(args.threads)
    clf = zoo.load_classifier()
    real, _ = zoo.heldout_digits()
    n, ncal = args.samples, args.calibration_samples
    classes, seeds = [i % 10 for i in range(n)], [EVAL_SEED0 + i for i in range(n)]
    run = {
        "command": "python benchmarks/quality_at_scale.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": os.getloadavg(), "threads": args.threads,
    }
    result: dict = {
        "runs": [run], "samples": n,
        "fd_real_train_vs_heldout": metrics.feature_frechet_distance(zoo.train_digits()[0], real, clf),
        "models": {},
    }

    def quality(images: torch.Tensor, reference: torch.Tensor | None) -> dict:
        q = {"class_accuracy": metrics.class_accuracy(images, classes, clf),
             "ffd": metrics.feature_frechet_distance(images, real, clf)}
        if reference is not None:
            q["psnr_db"] = metrics.psnr(images, reference)
        return q

    for name in args.model or ["dit-digits", "flux-digits"]:
        bundle = zoo.load(name)
        t0 = time.time()
        base = bundle.sample(classes, seeds, batch_size=args.batch)
        rows = {"baseline": {**quality(base, None), "sampling_s": round(time.time() - t0, 1), "run": run["date"]}}
        half = n // 2  # classes cycle 0..9, so both halves hold every class equally often when n % 20 == 0
        rows["baseline"]["ffd_half_vs_half_real"] = [metrics.feature_frechet_distance(base[:half], real, clf),
                                                     metrics.feature_frechet_distance(base[half:], real, clf)]
        for profile in args.profiles:
            opt = ditopt.optimize(
                bundle.model, profile, example_inputs=bundle.make_inputs(2),
                calibration=lambda m: bundle.sample([i % 10 for i in range(ncal)], [CAL_SEED0 + i for i in range(ncal)], model=m),
                validation=lambda m: bundle.sample([(i + 5) % 10 for i in range(ncal)], [VAL_SEED0 + i for i in range(ncal)], model=m),
                on_gate_miss="warn",
            )
            t0 = time.time()
            imgs = bundle.sample(classes, seeds, batch_size=args.batch, model=opt)
            rows[profile] = {**quality(imgs, base), "sampling_s": round(time.time() - t0, 1), "run": run["date"],
                             "computed_steps": _computed_steps(opt.report.to_dict())}
            b, r = rows["baseline"], rows[profile]
            r["class_accuracy_delta"] = r["class_accuracy"] - b["class_accuracy"]
            r["ffd_rel_delta"] = (r["ffd"] - b["ffd"]) / b["ffd"]
        result["models"][name] = rows
        print(name, json.dumps(rows, indent=1), flush=True)
    run["loadavg_at_end"] = os.getloadavg()
    if args.out:
        if args.out.exists():
            result = merge_runs(json.loads(args.out.read_text()), result)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


def _computed_steps(report: dict) -> list[int] | None:
    """The steps the chosen schedule computes (None without a calibrated schedule)."""
    for record in report.get("passes", []):
        stages = (record.get("report") or {}).get("stages") or []
        if record.get("name") == "calibrated_schedule" and stages:
            return stages[0].get("compute_steps")
    return None


def merge_runs(old: dict, new: dict) -> dict:
    """`new` merged into an earlier result: models only the old run measured are kept, and so
    are its presets of a model whose baseline this run reproduced (same class accuracy and FFD:
    sampling is seeded, so the samples are the same); a model whose baseline differs is
    replaced whole. Every row names the run it came from (`run`: that run's date), and `runs`
    keeps the runs some row still comes from."""
    if old.get("samples") != new["samples"] or old.get("fd_real_train_vs_heldout") != new["fd_real_train_vs_heldout"]:
        return new  # another sample count or real-digit split: nothing comparable to keep
    models = dict(old.get("models", {}))
    for name, rows in new["models"].items():
        before = models.get(name, {}).get("baseline", {})
        same = all(before.get(k) == rows["baseline"][k] for k in ("class_accuracy", "ffd"))
        models[name] = {**models[name], **rows} if same else rows
    used = {row.get("run") for rows in models.values() for row in rows.values()}
    fresh = {r["date"] for r in new["runs"]}
    runs = [r for r in old.get("runs", []) if r["date"] in used and r["date"] not in fresh]
    return {**new, "runs": runs + new["runs"], "models": models}


if __name__ == "__main__":
    sys.exit(main())
