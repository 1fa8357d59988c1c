"""Exploration: dit-digits `balanced` exported to ONNX and sampled by the artifact runner
(onnxruntime, CPU) against the PyTorch runtime and the eager model: same seeds, per-sample PSNR
against the eager model, and generation time (median of 3, interleaved).

    python benchmarks/exploration/export_balanced.py

Output: benchmarks/results/exploration/export_balanced_dit-digits.log (stdout, as run).
"""
import time, statistics, shutil, tempfile, os  # noqa: E401

import ditopt
from ditopt.export import export_artifact, load_artifact
from ditopt.metrics import psnr_per_sample
from explore_setup import setup

ARTIFACT = os.path.join(tempfile.mkdtemp(), "art-balanced")
b, m, calA, val = setup("dit-digits")
ex = {**b.make_inputs(4), "return_dict": False}
print({k: (tuple(v.shape) if hasattr(v, "shape") else v) for k, v in ex.items()})
opt = ditopt.optimize(m, "balanced", example_inputs=ex, calibration=calA, validation=val)
print("report passed", opt.report.passed)
shutil.rmtree(ARTIFACT, ignore_errors=True)
t0 = time.time()
path = export_artifact(opt, ARTIFACT, example_inputs=ex)
print("export s", round(time.time() - t0, 1))
runner = load_artifact(path)
classes, seeds = [i % 10 for i in range(4)], [700 + i for i in range(4)]
gen = lambda model: b.sample(classes, seeds, model=model)
ref = gen(m); opt.reset(); ours = gen(opt); runner.reset(); onnx = gen(runner)
print("PSNR torch-runtime vs eager", [round(x, 2) for x in psnr_per_sample(ours, ref)])
print("PSNR onnx-runner vs eager", [round(x, 2) for x in psnr_per_sample(onnx, ref)])
print("max abs diff onnx vs torch runtime", float((onnx - ours).abs().max()))
times = {"eager": [], "torch runtime": [], "onnx runner": []}
for r in range(3):
    for k, mod in (("eager", m), ("torch runtime", opt), ("onnx runner", runner)):
        if hasattr(mod, "reset"): mod.reset()
        t0 = time.perf_counter(); gen(mod); times[k].append(time.perf_counter() - t0)
d = statistics.median(times["eager"])
for k, v in times.items():
    print(f"{k:14s} median {statistics.median(v):.3f}s per generation of 4 samples, speedup vs eager {d / statistics.median(v):.2f}x")
