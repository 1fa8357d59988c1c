#!/usr/bin/env python
"""Merge model-benchmark JSONs from separate runs (e.g. one process per model) into one
models.json / models.md / models_pareto.png. Each model keeps the command, date, configuration and
load of its own run (``models[name]["run"]``); nothing is re-measured.

    python benchmarks/merge_results.py benchmarks/results/models.json benchmarks/results-dit/models.json \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def merge(results: list[dict]) -> dict:
    merged = json.loads(json.dumps(results[0]))
    merged["models"] = {}
    commands, dates, walls = [], [], []
    for r in results:
        for name, model in r["models"].items():
            model.setdefault("run", {"command": r["command"], "date": r["date"], "config": r["config"]})
            model["run"].setdefault("machine", r["machine"])
            merged["models"][name] = model
        commands.append(r["command"])
        dates.append(r["date"])
        walls.append(r.get("wall_s") or 0)
    merged["command"] = " && ".join(dict.fromkeys(commands))
    merged["date"] = min(dates)
    merged["merged_from_runs"] = [{"command": r["command"], "date": r["date"], "complete": r.get("complete"),
                                   "models": list(r["models"])} for r in results]
    merged["complete"] = all(r.get("complete") for r in results)
    merged["wall_s"] = round(sum(walls), 1)
    merged["config"]["models"] = list(merged["models"])
    la = [r["machine"].get("loadavg_at_end") for r in results if r["machine"].get("loadavg_at_end")]
    merged["machine"]["loadavg_at_end"] = la[-1] if la else None
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from ditopt.bench.runner import write_outputs

    result = merge([json.loads(x.read_text()) for x in args.inputs])
    paths = write_outputs(result, args.out)
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
