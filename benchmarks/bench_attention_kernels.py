#!/usr/bin/env python
"""Benchmark dense SDPA vs the tiled neighbourhood CPU path on 32x32, 64x64, 128x128 grids.

Usage:  python benchmarks/bench_attention_kernels.py OUT.json [--threads 2] [--repeats 7]
        [--heads 4] [--head-dim 64] [--tile 8] [--radius 1] [--grids 32 64 128]

Both methods run interleaved in one process on the same inputs (see
``ditopt.kernels.bench.bench_attention``); the JSON holds one record per grid plus the
environment (torch version, threads, OMP_WAIT_POLICY, load average at start and end --
the dev/CI boxes are shared, so read the numbers with the load in mind).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="path of the JSON file to write")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tile", type=int, default=8)
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grids", type=int, nargs="+", default=[32, 64, 128])
    args = ap.parse_args(argv)

    import torch
    from ditopt.kernels.bench import bench_attention

    def load():
        try:
            return list(os.getloadavg())
        except OSError:
            return None

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": load(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python benchmarks/bench_attention_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results = []
    for g in args.grids:
        r = bench_attention(grid=(g, g), heads=args.heads, head_dim=args.head_dim, tile=args.tile,
                            radius=args.radius, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                            threads=args.threads)
        results.append(r)
        print(f"{g:>4}x{g:<4} dense {r['dense_ms']:9.2f} ms  sparse {r['sparse_ms']:8.2f} ms  "
              f"speedup {r['speedup']:6.2f}x  density {r['density']:.4f}  max_rel_err {r['max_rel_err']:.2e}",
              flush=True)
    env["loadavg_end"] = load()
    from ditopt.io import atomic_write_text
    atomic_write_text(args.out, json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
