"""Attention locality of the zoo models, as ditopt's "attention" calibration measures it.

Per block and head: the share of attention mass inside a 2-D neighbourhood window of radius r
tiles around the query's tile (the window the `neighborhood_attention` pass would run), per step
bucket (first / middle / last third of the trajectory), on real sampling trajectories. The window's
share of the keys is printed beside it: a mass far above that share is locality; a mass equal to
it is attention spread evenly.

    python benchmarks/attention_locality.py --out benchmarks/results/attention_locality.json

Fixed classes and seeds; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone

import torch

from ditopt import zoo
from ditopt.calibration import calibrate
from ditopt.capture import capture
from ditopt.io import atomic_write_text

import ditopt.passes  # noqa: F401  (registers the "attention" collector)
from ditopt.bench.measure import script_run_record

MODELS = ("dit-digits", "dit-digits-p1", "dit-canvas", "flux-digits")


def window_key_share(grid: list[int], tile: int, radius: int) -> float:
    """Share of the (query, key) pairs the window keeps: the kernel's own count (NATTEN-style
    clamped window, so a window wider than the grid keeps every key)."""
    from ditopt.kernels.neighborhood import neighborhood_density

    return neighborhood_density(grid[0], grid[1], tile, radius)


def locality(name: str, samples: int, tile: int) -> dict:
    bundle = zoo.load(name)
    classes = [(3 * i + 1) % 10 for i in range(samples)]
    seeds = [7000 + i for i in range(samples)]  # apart from the calibration and validation seeds
    kw = bundle.make_inputs(samples)
    graph = capture(bundle.model, kw)
    t0 = time.perf_counter()
    stats = calibrate(bundle.model, graph, ["attention"], lambda m: bundle.sample(classes, seeds, model=m), progress=False)
    meta = stats.meta["attention"]
    masses = stats.tensors[f"attention.window_mass_by_step.tile{tile}"]  # [bucket, blocks, heads, radii]
    rows = []
    for i, radius in enumerate(meta["radii"]):
        m = masses[..., i]
        rows.append({
            "radius": radius,
            "window_tokens": (2 * radius + 1) * tile,
            "key_share": window_key_share(meta["grid"], tile, radius),
            "mean_by_bucket": m.nanmean(dim=(1, 2)).tolist(),
            "worst_head_by_bucket": m.nan_to_num(nan=1.0).amin(dim=(1, 2)).tolist(),
            "heads_at_95_share": float((m.nan_to_num(nan=0.0) >= 0.95).float().mean()),
            "per_block_head_worst_bucket": m.nan_to_num(nan=1.0).amin(dim=0).tolist(),
        })
    return {"model": name, "grid": meta["grid"], "tile": tile, "step_buckets": meta["step_buckets"],
            "samples": samples, "steps": bundle.default_steps, "calibration_s": round(time.perf_counter() - t0, 1),
            "rows": rows}


def markdown(out: dict) -> str:
    """The BENCHMARKS.md section, from this script's own JSON."""
    m = out["machine"]
    lines = [
        "## Attention locality of the zoo models", "",
        "Per block and head, the share of attention mass inside a 2-D neighbourhood window of radius r tiles (tile "
        f"{out['results'][0]['tile']} tokens, NATTEN-style clamped window), from ditopt's `attention` calibration on real "
        "sampling trajectories, per step bucket (first / middle / last third). \"keys\" is the share of (query, key) "
        "pairs the window keeps: mass well above it is locality. Command: "
        f"`{out['command']}`; {out['date']} (UTC); {m['cpu_model']}, {m['torch_threads']} thread(s), torch {m['torch']}; "
        f"load average at start {[round(v, 2) for v in out['loadavg_at_start']]}.", "",
        "| model | grid | r | keys | mean mass (first / middle / last third) | worst head | block-heads >= 0.95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        for row in r["rows"]:
            mean = " / ".join(f"{v:.3f}" for v in row["mean_by_bucket"])
            worst = " / ".join(f"{v:.3f}" for v in row["worst_head_by_bucket"])
            lines.append(f"| {r['model']} | {r['grid'][0]}x{r['grid'][1]} | {row['radius']} | {row['key_share']:.1%} | "
                         f"{mean} | {worst} | {row['heads_at_95_share']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tile", type=int, default=4, help="tile edge in tokens (one the collector measures: 2, 4, 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None, help="also write the BENCHMARKS.md section here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started, load = datetime.now(timezone.utc).isoformat(timespec="seconds"), os.getloadavg()
    results = []
    for name in args.models:
        r = locality(name, args.samples, args.tile)
        results.append(r)
        for row in r["rows"]:
            mean = ", ".join(f"{v:.3f}" for v in row["mean_by_bucket"])
            worst = ", ".join(f"{v:.3f}" for v in row["worst_head_by_bucket"])
            print(f"{name:14s} grid {r['grid']} r={row['radius']} window {row['window_tokens']} tokens, "
                  f"{row['key_share']:.1%} of keys: mean mass by bucket [{mean}], worst head [{worst}], "
                  f">=0.95: {row['heads_at_95_share']:.0%}", flush=True)
    # The project's run record (command, machine, load at the end), with this run's start beside it.
    out = {**script_run_record("benchmarks/attention_locality.py", None, args.threads), "date": started, "loadavg_at_start": load,
           "results": results}
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, markdown(out))


if __name__ == "__main__":
    main()
