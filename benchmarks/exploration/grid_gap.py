"""The one grid gap of the 2026-11-23 matrix on dit-digits, measured side by side in one run:
cache-dit DBCache+TaylorSeer F1B0 thr=0.4 (26.4 dB in the matrix) against ditopt's `fast`,
`balanced` and a 27.5 dB budget, which the matrix did not run. Same protocol as the matrix
(32 held-out samples, 5 interleaved repeats, batch 4, 2 threads, 4 calibration and 16
validation samples); only these settings.

    python benchmarks/exploration/grid_gap.py

Output: benchmarks/results/exploration/grid_gap/ (models.json, models.md, models_pareto.png).
"""
import sys
from pathlib import Path

from ditopt.bench import methods as M
from ditopt.bench.runner import run_models

out = Path(__file__).resolve().parents[1] / "results" / "exploration" / "grid_gap"
only = {"cachedit-dbcache-taylorseer": ("F1B0,thr=0.4,o1",), "ditopt-preset": ("fast", "balanced")}
for name, labels in only.items():
    M.METHODS[name] = {**M.METHODS[name], "settings": [s for s in M.METHODS[name]["settings"] if s[0] in labels]}
M.METHODS["ditopt-budget"] = {**M.METHODS["ditopt-budget"], "settings": [("27.5 dB", {"profile": M._budget_profile(27.5)})]}
run_models(["dit-digits"], ["baseline", *only, "ditopt-budget"], samples=32, repeats=5, batch=4, threads=2,
           calibration_samples=4, validation_samples=16, out_dir=out, progress=False,
           command=" ".join(["python benchmarks/exploration/grid_gap.py", *sys.argv[1:]]))
