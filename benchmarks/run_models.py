#!/usr/bin/env python
"""Benchmark ditopt against peer caching methods on the trained zoo models.

Same as `ditopt bench models`; see ditopt/bench/runner.py for what is measured and how.

    python benchmarks/run_models.py --model dit-digits --model flux-digits --samples 32 --repeats 5
    python benchmarks/run_models.py --quick --samples 2 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ditopt.bench import method_names, run_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="zoo model (repeatable; default: dit-digits and flux-digits)")
    p.add_argument("--methods", nargs="+", choices=method_names(), help="methods to compare (default: all)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration samples for ditopt presets / MagCache ratios (default 8; quick 2)")
    p.add_argument("--validation-samples", type=int, default=None,
                   help="held-out samples the ditopt budget gate is checked on (default 16; quick 2)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--setting-index", type=int, default=None,
                   help="run only this setting of every method (0 = gentlest; default: all settings)")
    p.add_argument("--only", nargs="+", default=None, metavar="SETTING",
                   help="run only these settings, named as in the tables, e.g. 'ditopt-preset[balanced]' (the baseline always runs)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other models already in OUT/models.json (run models at different times)")
    args = p.parse_args(argv)
    command = "python benchmarks/run_models.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = run_models(args.model or ["dit-digits", "flux-digits"], args.methods, samples=args.samples,
                        repeats=args.repeats, batch=args.batch, threads=args.threads, quick=args.quick,
                        steps=args.steps, calibration_samples=args.calibration_samples,
                        validation_samples=args.validation_samples, out_dir=args.out, command=command.strip(), progress=not args.no_progress,
                        merge=args.merge, setting_index=args.setting_index, only=args.only)
    from ditopt.bench import markdown_table

    for name in args.model or ["dit-digits", "flux-digits"]:
        res = result["models"][name]
        print(f"## {name} ({res['steps']} steps)\n")
        print(markdown_table(res))
    print(f"wrote {args.out}/models.json, models.md, models_pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
