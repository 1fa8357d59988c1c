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
    """Later inputs replace earlier ones model by model. The header (command, date, wall time,
    merged_from_runs) lists only the runs whose models are kept, so an input that is itself a
    merge can be merged again without carrying along the run a newer one replaced."""
    merged = json.loads(json.dumps(results[0]))
    merged["models"] = {}
    for r in results:
        for name, model in r["models"].items():
            run = model.setdefault("run", {"command": r["command"], "date": r["date"], "config": r["config"]})
            run.setdefault("machine", r["machine"])
            source = next((e for e in r.get("merged_from_runs", []) if name in e.get("models", [])), r)
            run.setdefault("complete", source.get("complete"))
            merged["models"][name] = model
    runs: dict[tuple, dict] = {}
    for name, model in merged["models"].items():
        run = model["run"]
        entry = runs.setdefault((run["command"], run["date"]), {"command": run["command"], "date": run["date"],
                                                                "complete": run.get("complete"), "models": []})
        entry["models"].append(name)
    kept = sorted(runs.values(), key=lambda e: e["date"])
    merged["command"] = " && ".join(dict.fromkeys(e["command"] for e in kept))
    merged["date"] = kept[0]["date"]
    merged["merged_from_runs"] = kept
    merged["complete"] = all(e["complete"] for e in kept)
    walls = [m.get("wall_s") for m in merged["models"].values()]  # each model's own run time
    merged["wall_s"] = round(sum(walls), 1) if all(isinstance(w, (int, float)) for w in walls) else None
    merged["config"]["models"] = list(merged["models"])
    by_date = sorted((m["run"] for m in merged["models"].values()), key=lambda run: run["date"])
    merged["machine"]["loadavg_at_start"] = by_date[0]["machine"].get("loadavg_at_start")
    merged["machine"]["loadavg_at_end"] = by_date[-1]["machine"].get("loadavg_at_end")
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
