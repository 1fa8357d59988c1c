#!/usr/bin/env python
"""Backends (issue 33): one denoiser call at parity, eager vs inductor vs the onnxruntime artifact,
and inductor under a caching profile end to end.

per-call: for each model, the same call (fixed seeds) through
  eager                     the user's model
  pytorch runtime           ditopt.optimize(model, "identity") (eager segments)
  inductor                  the same with backend="inductor" (segments through torch.compile)
  inductor + freezing       backend="inductor", compile_options={"freezing": True} (weights become
                            constants of the compiled code: Inductor prepacks them for its GEMMs)
  onnxruntime artifact      the identity profile exported and run by load_artifact
  on a DiT-XL-wide stack (diffusers DiTTransformer2DModel, hidden 1152 = 16 heads x 72, FFN 4608,
  256 tokens, batch 2, 2 blocks, random weights) and on dit-digits (a CFG call of `--batch`
  samples, as its sampler makes it). Interleaved rounds, median of `--repeats` after a warm-up;
  relative L2 error of each output against eager; compile seconds from the optimize report.
end-to-end: dit-digits sampled `--batch` samples per generation with `--profile` (default
  balanced, a calibrated cache schedule) through the PyTorch and the inductor backends, beside
  eager: seconds per sample (interleaved, median of `--e2e-repeats`) and PSNR against eager.

    python benchmarks/bench_backends.py --out benchmarks/results/backends.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _xl_wide(blocks: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=blocks, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                  norm_num_groups=1).eval()
    g = torch.Generator().manual_seed(1)
    kw = {"hidden_states": torch.randn(2, 4, 32, 32, generator=g), "timestep": torch.tensor([500, 500]),
          "class_labels": torch.tensor([1, 2]), "return_dict": False}
    return model, kw


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(1 + repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[k].append(time.perf_counter() - start)
    return times


def per_call(name: str, model: torch.nn.Module, kw: dict[str, Any], repeats: int, tmp: Path) -> dict[str, Any]:
    import ditopt
    from ditopt.export import export_artifact, load_artifact

    settings: dict[str, Any] = {"eager": model}
    t0 = time.perf_counter()
    settings["pytorch runtime"] = identity = ditopt.optimize(model, "identity", example_inputs=kw)
    optimize_s = {"pytorch runtime": time.perf_counter() - t0}
    for label, options in (("inductor", None), ("inductor + freezing", {"freezing": True})):
        t0 = time.perf_counter()
        settings[label] = ditopt.optimize(model, "identity", example_inputs=kw, backend="inductor", compile_options=options)
        optimize_s[label] = time.perf_counter() - t0
    settings["onnxruntime artifact"] = load_artifact(export_artifact(identity, tmp / f"{name}-identity", example_inputs=kw))
    with torch.no_grad():
        reference = _first(model(**kw))
        errors = {k: float((_first(m(**kw)) - reference).norm() / reference.norm()) for k, m in settings.items()}
        for m in settings.values():
            if hasattr(m, "reset"):
                m.reset()
        times = _interleaved({k: (lambda m=m: m(**kw)) for k, m in settings.items()}, repeats)
    eager_s = statistics.median(times["eager"])
    load = os.getloadavg()  # another job on the cores slows OpenMP (torch) far more than onnxruntime's pool
    rows = []
    for k, m in settings.items():
        med = statistics.median(times[k])
        backend = m.report.to_dict()["backend"] if isinstance(getattr(m, "report", None), ditopt.OptimizationReport) else {}
        row = {"setting": k, "ms_per_call": med * 1e3, "speedup_vs_eager": eager_s / med, "rel_err_vs_eager": errors[k],
               "times_s": times[k], "optimize_s": optimize_s.get(k), "compile_s": backend.get("compile_s"),
               "compiles": backend.get("compiles"), "eager_fallbacks": len(backend.get("eager_fallbacks", []))}
        rows.append(row)
        print(f"{name:12s} {k:22s} {med * 1e3:8.1f} ms/call  {eager_s / med:5.2f}x  rel err {errors[k]:.1e}"
              + (f"  compile {row['compile_s']:.1f} s" if row["compile_s"] else ""), flush=True)
    return {"rows": rows, "loadavg_after_timing": list(load)}


def end_to_end(profile: str, batch: int, repeats: int) -> dict[str, Any]:
    import ditopt
    from ditopt import zoo
    from ditopt.metrics import psnr_per_sample

    bundle = zoo.load("dit-digits")
    eager = bundle.model
    example = {**bundle.make_inputs(batch), "return_dict": False}
    classes, seeds = [(i + 5) % 10 for i in range(batch)], [300000 + i for i in range(batch)]
    settings: dict[str, Any] = {"eager": eager}
    plans = {}
    for backend in ("pytorch", "inductor"):
        t0 = time.perf_counter()
        opt = ditopt.optimize(eager, profile, example_inputs=example, calibration=bundle.calibration_fn(),
                              validation=bundle.validation_fn(), backend=backend)
        report = opt.report.to_dict()
        settings[f"{profile}: {backend}"] = opt
        plans[backend] = {"optimize_s": time.perf_counter() - t0, "gate_passed": report["passed"],
                          "passes": [p["resolved"] for p in report["passes"]], "backend": {
                              k: v for k, v in report["backend"].items() if k != "segments"}}

    def generate(model: Any) -> torch.Tensor:
        if hasattr(model, "reset"):
            model.reset()
        return bundle.sample(classes, seeds, model=model, batch_size=batch)

    with torch.no_grad():
        samples = {k: generate(m) for k, m in settings.items()}
        times = _interleaved({k: (lambda m=m: generate(m)) for k, m in settings.items()}, repeats)
    eager_s = statistics.median(times["eager"]) / batch
    rows = []
    for k in settings:
        med = statistics.median(times[k]) / batch
        psnr = psnr_per_sample(samples[k], samples["eager"]) if k != "eager" else None
        rows.append({"setting": k, "s_per_sample": med, "speedup_vs_eager": eager_s / med,
                     "psnr_db_mean": sum(psnr) / len(psnr) if psnr else None, "times_s": times[k]})
        print(f"dit-digits   {k:22s} {med:7.3f} s/sample  {eager_s / med:5.2f}x"
              + (f"  PSNR {rows[-1]['psnr_db_mean']:.2f} dB" if psnr else ""), flush=True)
    inductor, pytorch = samples[f"{profile}: inductor"], samples[f"{profile}: pytorch"]
    return {"profile": profile, "batch": batch, "rows": rows, "plans": plans, "loadavg_after_timing": list(os.getloadavg()),
            "same_plan": plans["pytorch"]["passes"] == plans["inductor"]["passes"],
            "max_abs_diff_inductor_vs_pytorch": float((inductor - pytorch).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="dit-digits samples per call (CFG doubles the rows)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", default="balanced")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from ditopt import zoo
    from ditopt.bench.measure import script_run_record
    from ditopt.io import atomic_write_text

    torch.set_num_threads(args.threads)
    started = time.time()
    result: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}, "per_call": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model, kw = _xl_wide(args.blocks)
        result["per_call"]["dit-xl-wide"] = {"stack": {"hidden": 1152, "heads": 16, "ffn": 4608, "tokens": 256, "batch": 2,
                                                       "blocks": args.blocks}, **per_call("dit-xl-wide", model, kw, args.repeats, Path(tmp))}
        bundle = zoo.load("dit-digits")
        kw = {**bundle.make_inputs(args.batch), "return_dict": False}
        result["per_call"]["dit-digits"] = {"rows_per_call": 2 * args.batch,
                                            **per_call("dit-digits", bundle.model, kw, args.repeats, Path(tmp))}
    if not args.skip_e2e:
        result["end_to_end"] = end_to_end(args.profile, args.batch, args.e2e_repeats)
    result = {**script_run_record("benchmarks/bench_backends.py", argv, args.threads),
              "wall_s": round(time.time() - started, 1), **result}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
