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

Distilled mode (`--distill-steps N`, issue 30's distillation target): `--ratio` of the blocks
removed in measured order (or `--blocks`), with the linear bridge, then `distill_steps` of
distillation on calibration activations; rows `original`, `bridge only` (the same blocks, no
training) and `distilled`, on `--unseen` (class, seed) pairs from seed 460000 (none used by
calibration or validation): class accuracy (the zoo's digit classifier, on the requested
classes) and the classifier-feature Fréchet distance to the zoo's held-out real digits, each
against the original's, PSNR against the original (reported, not gated), speedup interleaved.

    python benchmarks/bench_layer_prune.py --model dit-digits --ratio 0.5 --distill-steps 300 --distill-lr 1e-4 \
        --unseen 160 --threads 1 --out benchmarks/results/layer_prune_distill.json
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
    p.add_argument("--distill-steps", type=int, default=0, help="> 0: the distilled mode (see the docstring)")
    p.add_argument("--distill-lr", type=float, default=3e-4)
    p.add_argument("--distill-scope", choices=("adjacent", "all"), default="adjacent")
    p.add_argument("--distill-rows", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.5, help="distilled mode: fraction of the blocks removed")
    p.add_argument("--blocks", type=str, default=None, help="distilled mode: explicit blocks, e.g. 1,3,5,7")
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
    if args.distill_steps:
        return distilled_mode(args, argv)
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


DISTILL_SEED0 = 460_000  # apart from calibration (1000+), validation (5000+) and the row above (450000+)


def distilled_mode(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch

    import ditopt
    from ditopt import metrics, zoo
    from ditopt.bench.measure import script_run_record
    from ditopt.costs import mac_counter
    from ditopt.io import atomic_write_text

    bundle = zoo.load(args.model)
    clf = zoo.load_classifier()
    real, _ = zoo.heldout_digits()
    classes = [(7 * i + 2) % bundle.num_classes for i in range(args.unseen)]
    seeds = [DISTILL_SEED0 + i for i in range(args.unseen)]
    select = ({"blocks": [int(b) for b in args.blocks.split(",")]} if args.blocks else {"ratio": args.ratio})

    def optimize(cfg: dict) -> tuple[object, dict, float]:
        profile = {"name": "layer-prune-distill-bench", "budget": {"max_rel_err": 1.0},
                   "passes": [{"name": "layer_prune", "bridge": "linear", **select, **cfg}]}
        start = time.perf_counter()
        opt = ditopt.optimize(bundle.model, ditopt.load_profile(profile), example_inputs=bundle.make_inputs(2),
                              calibration=bundle.calibration_fn(), on_gate_miss="return")
        record = next(r for r in opt.report.passes if r.name == "layer_prune")
        return opt, record.report, time.perf_counter() - start

    methods: dict[str, dict] = {"original": {"model": bundle.model}}
    opt, rep, s = optimize({})
    methods["bridge only"] = {"model": opt, "optimize_s": round(s, 1), "report": {
        "removed": rep["removed"], "replayed_error": rep.get("replayed_error")}}
    cfg = {"distill_steps": args.distill_steps, "distill_lr": args.distill_lr, "distill_scope": args.distill_scope,
           "distill_rows": args.distill_rows}
    opt, rep, s = optimize(cfg)
    methods["distilled"] = {"model": opt, "optimize_s": round(s, 1), "config": cfg, "report": {
        "removed": rep["removed"], "replayed_error": rep.get("replayed_error"),
        "replayed_error_before_distill": rep.get("replayed_error_before_distill"), "distillation": rep["distillation"]}}
    print(json.dumps({k: m.get("report") for k, m in methods.items()}, default=str), flush=True)

    timing_classes, timing_seeds = classes[: args.batch], seeds[: args.batch]
    times: dict[str, list[float]] = {k: [] for k in methods}
    for name, m in methods.items():  # warm-up (first call at this shape captures it)
        bundle.sample(timing_classes, timing_seeds, model=m["model"])
    for _ in range(args.repeats):
        for name, m in methods.items():  # interleaved: load drifts hit every method alike
            start = time.perf_counter()
            bundle.sample(timing_classes, timing_seeds, model=m["model"])
            times[name].append(time.perf_counter() - start)
    rows, reference = [], None
    for name, m in methods.items():
        with mac_counter() as macs:
            bundle.sample(timing_classes, timing_seeds, model=m["model"])
        chunk = 25
        images = torch.cat([bundle.sample(classes[i:i + chunk], seeds[i:i + chunk], model=m["model"])
                            for i in range(0, len(classes), chunk)])
        reference = images if reference is None else reference
        row = {"method": name, "macs_per_sample": macs() / len(timing_seeds),
               "seconds_per_generation": statistics.median(times[name]),
               "speedup": statistics.median(times["original"]) / statistics.median(times[name]),
               "class_accuracy": metrics.class_accuracy(images, classes, clf),
               "ffd": metrics.feature_frechet_distance(images, real, clf),
               "psnr_vs_original_db": metrics.psnr(images, reference) if name != "original" else None,
               **{k: v for k, v in m.items() if k != "model"}}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    base = rows[0]
    for row in rows:
        row["accuracy_ratio"] = row["class_accuracy"] / base["class_accuracy"]
        row["ffd_ratio"] = row["ffd"] / base["ffd"]
        row["macs_saved"] = 1.0 - row["macs_per_sample"] / base["macs_per_sample"]
    d = next(r for r in rows if r["method"] == "distilled")
    result = {"run": script_run_record("benchmarks/bench_layer_prune.py", argv, args.threads), "model": args.model,
              "mode": "distilled", "target": "accuracy >= 0.95x and FFD <= 1.25x the original's, <= 15 CPU minutes",
              "target_met": bool(d["accuracy_ratio"] >= 0.95 and d["ffd_ratio"] <= 1.25
                                 and d["report"]["distillation"]["seconds"] <= 900),
              "unseen": {"samples": args.unseen, "seeds": [seeds[0], seeds[-1]], "classes": "7i+2 mod classes"},
              "ffd_reference": f"zoo.heldout_digits() ({real.shape[0]} real digits)",
              "timing": {"batch": args.batch, "repeats": args.repeats, "seconds": times}, "rows": rows}
    print(json.dumps({"target_met": result["target_met"], "accuracy_ratio": d["accuracy_ratio"],
                      "ffd_ratio": d["ffd_ratio"]}), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
