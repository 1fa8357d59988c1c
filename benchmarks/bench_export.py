#!/usr/bin/env python
"""The exported artifact against the PyTorch runtime: same samples, and how fast onnxruntime runs them.

For each zoo model: the eager model; the `identity` profile exported (dense ONNX segments: what
onnxruntime itself costs against eager PyTorch); and for each profile (default `balanced`) the
PyTorch runtime (`ditopt.optimize`) and its exported artifact run by `ditopt.export.load_artifact`,
which replays the calibrated cache schedule on the host between onnxruntime segments.

Quality: `--samples` held-out (class, seed) pairs (classes 5..9,0..4; seeds 300000+) in
generations of `--batch` samples (the artifacts are exported for that call shape); per-sample
PSNR against the eager model, and the largest absolute difference between the artifact's and
the PyTorch runtime's samples. Timing: one generation of `--batch` samples per setting,
interleaved rounds (each round times every setting once), median of `--repeats` after one
warm-up round. Optimization calibrates on the zoo's calibration seeds and gates on its
validation seeds, as `ditopt export` does.

    python benchmarks/bench_export.py --out benchmarks/results/export.json
    python benchmarks/bench_export.py --profiles balanced benchmarks/exploration/profiles/balanced-cfg-reuse.toml --out ...
    python benchmarks/bench_export.py --profiles --out benchmarks/results/export_identity.json   # eager vs identity artifact only

A profile given as a TOML file is labelled by its file name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit-digits", "flux-digits"])
    p.add_argument("--profiles", nargs="*", default=["balanced"],
                   help="profiles to run beside eager and the identity artifact (none: --profiles with no value)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.samples % args.batch:
        p.error("--samples must be a multiple of --batch (the artifacts take one call shape)")

    import ditopt
    from ditopt import zoo
    from ditopt.bench.measure import script_run_record
    from ditopt.export import export_artifact, load_artifact
    from ditopt.io import atomic_write_text
    from ditopt.metrics import psnr_per_sample

    torch.set_num_threads(args.threads)
    started = time.time()
    classes = [(i + 5) % 10 for i in range(args.samples)]
    seeds = [300000 + i for i in range(args.samples)]
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bundle = zoo.load(name)
            eager = bundle.model
            example = {**bundle.make_inputs(args.batch), "return_dict": False}

            def generate(model, reset=True, cls=classes[: args.batch], sd=seeds[: args.batch]):
                if reset and hasattr(model, "reset"):
                    model.reset()
                return bundle.sample(cls, sd, model=model, batch_size=args.batch)

            settings: dict[str, object] = {"eager": eager}
            identity = ditopt.optimize(eager, "identity", example_inputs=example)
            settings["identity artifact (onnxruntime)"] = load_artifact(
                export_artifact(identity, Path(tmp) / f"{name}-identity", example_inputs=example))
            plans = {}
            for profile_arg in args.profiles:
                profile = Path(profile_arg).stem if profile_arg.endswith(".toml") else profile_arg
                opt = ditopt.optimize(eager, profile_arg, example_inputs=example, calibration=bundle.calibration_fn(),
                                      validation=bundle.validation_fn())
                t0 = time.perf_counter()
                path = export_artifact(opt, Path(tmp) / f"{name}-{profile}", example_inputs=example)
                export_s = time.perf_counter() - t0
                runner = load_artifact(path)
                settings[f"{profile}: PyTorch runtime"] = opt
                settings[f"{profile}: artifact (onnxruntime)"] = runner
                stage = next(e for e in runner.manifest["plan"] if e.get("kind") == "cached-span")
                plans[profile] = {"export_s": export_s, "gate_passed": opt.report.passed, "files": sorted(
                    str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and not f.name.endswith(".data")),
                    "compute_steps": stage.get("compute_steps"), "steps": stage.get("steps"),
                    "cond_only_steps": stage.get("cond_only_steps", []), "notes": runner.manifest["notes"],
                    "budget_db": opt.report.to_dict()["profile"]["budget"].get("min_psnr_db")}

            reference = bundle.sample(classes, seeds, model=eager, batch_size=args.batch)
            samples = {k: (reference if k == "eager" else generate(m, cls=classes, sd=seeds)) for k, m in settings.items()}
            times: dict[str, list[float]] = {k: [] for k in settings}
            for rep in range(1 + args.repeats):
                for k, m in settings.items():
                    t0 = time.perf_counter()
                    generate(m)
                    if rep:
                        times[k].append((time.perf_counter() - t0) / args.batch)
            eager_s = statistics.median(times["eager"])
            rows = []
            for k in settings:
                med = statistics.median(times[k])
                psnr = psnr_per_sample(samples[k], reference) if k != "eager" else None
                finite = [x for x in (psnr or []) if x != float("inf")]
                row = {"setting": k, "s_per_sample": med, "times_s": times[k], "speedup_vs_eager": eager_s / med,
                       "psnr_db_mean": (sum(finite) / len(finite)) if finite else None,
                       "psnr_identical": bool(psnr) and not finite}
                profile = k.split(":")[0]
                if k.endswith("artifact (onnxruntime)") and profile in plans:
                    runtime = samples[f"{profile}: PyTorch runtime"]
                    row["max_abs_diff_vs_runtime"] = float((samples[k] - runtime).abs().max())
                    row["psnr_db_runtime_mean"] = sum(psnr_per_sample(runtime, reference)) / args.samples
                elif k.startswith("identity"):
                    row["max_abs_diff_vs_eager"] = float((samples[k] - reference).abs().max())
                rows.append(row)
                print(f"{name:12s} {k:36s} {med:7.3f} s/sample  {eager_s / med:5.2f}x  "
                      f"PSNR {row['psnr_db_mean'] if row['psnr_db_mean'] is not None else '-'}", flush=True)
            models[name] = {"rows": rows, "plans": plans}
    result = {
        **script_run_record("benchmarks/bench_export.py", argv, args.threads),
        "wall_s": round(time.time() - started, 1),
        "config": {"samples": args.samples, "batch": args.batch, "repeats": args.repeats, "profiles": args.profiles},
        "models": models,
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
