"""Per-layer speed of ditopt's linear attention vs dense SDPA, on CPU.

    python benchmarks/bench_linear_attention_kernel.py --out benchmarks/results/linear_attention_kernel.json

Both run through the dispatcher as a rewritten graph runs them (`torch.ops.ditopt.linear_attention`,
its CPU path, vs `F.scaled_dot_product_attention`) on the same random q/k/v, alternating call by
call, median of the repeats after warm-up. Default shapes: DiT-XL's attention (16 heads x 72) at
32x32, 64x64 (4096 tokens: the issue's target shape) and 96x96 image tokens, 3x3 value convolution.
The error column is the op's max |out - ref| / max |ref| against the float64 formula on the same
inputs (this checks the CPU path computes linear attention; how far linear attention is from dense
attention is a model's distillation question, measured by the pass).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import ditopt.kernels.ops  # noqa: F401  (registers torch.ops.ditopt.linear_attention)
from ditopt.bench.measure import script_run_record
from ditopt.io import atomic_write_text
from ditopt.kernels.linear_attention import linear_attention_macs, linear_attention_reference


def bench(grid: int, heads: int, head_dim: int, conv: int, feature: str, repeats: int, warmup: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
    w = torch.randn(heads, head_dim, conv, conv, generator=g) * 0.1

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    def linear():
        return torch.ops.ditopt.linear_attention(q, k, v, w, grid, grid, 0, feature, 1e-6)

    with torch.inference_mode():
        for _ in range(warmup):
            dense(), linear()
        times: dict[str, list[float]] = {"dense": [], "linear": []}
        for i in range(repeats):
            order = (("dense", dense), ("linear", linear)) if i % 2 == 0 else (("linear", linear), ("dense", dense))
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        out = linear()
        ref = linear_attention_reference(q.double(), k.double(), v.double(), w.double(), grid, grid, 0, feature)
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    dense_ms, linear_ms = statistics.median(times["dense"]), statistics.median(times["linear"])
    dense_macs = 2 * heads * n * n * head_dim  # QK^T and PV
    return {"grid": [grid, grid], "tokens": n, "heads": heads, "head_dim": head_dim, "conv": conv, "feature": feature,
            "dense_ms": round(dense_ms, 3), "linear_ms": round(linear_ms, 3), "speedup": round(dense_ms / linear_ms, 2),
            "dense_macs": dense_macs, "linear_macs": linear_attention_macs(q.shape, v.shape, conv),
            "max_rel_err_vs_float64": err,
            "dense_ms_all": [round(t, 3) for t in times["dense"]], "linear_ms_all": [round(t, 3) for t in times["linear"]]}


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"Command: `{out['command']}`; {out['date']} (UTC); {m['cpu_model']}, {m['torch_threads']} thread(s), "
             f"torch {m['torch']}; load average at start {[round(x, 2) for x in out['loadavg_at_start']]}, "
             f"at end {[round(x, 2) for x in out['loadavg_at_end']]}.", "",
             "| image tokens | heads x dim | dense SDPA ms | linear ms | speedup | MAC ratio | max rel. err vs float64 |",
             "|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['grid'][0]}x{r['grid'][1]} = {r['tokens']} | {r['heads']} x {r['head_dim']} | {r['dense_ms']:.1f} | "
                     f"{r['linear_ms']:.1f} | {r['speedup']:.1f}x | {r['dense_macs'] / r['linear_macs']:.1f} | "
                     f"{r['max_rel_err_vs_float64']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[32, 64, 96])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--conv", type=int, default=3)
    p.add_argument("--feature", choices=("relu", "elu"), default="relu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None, help="also write the BENCHMARKS.md table here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started, load = datetime.now(timezone.utc).isoformat(timespec="seconds"), os.getloadavg()
    results = []
    for grid in args.grids:
        r = bench(grid, args.heads, args.head_dim, args.conv, args.feature, args.repeats, args.warmup, seed=grid)
        results.append(r)
        print(f"{grid}x{grid} ({r['tokens']} tokens): dense {r['dense_ms']:.1f} ms, linear {r['linear_ms']:.1f} ms, "
              f"{r['speedup']:.1f}x, err {r['max_rel_err_vs_float64']:.1e}", flush=True)
    # The project's run record (command, machine, load at the end), with this run's start beside it.
    out = {**script_run_record("benchmarks/bench_linear_attention_kernel.py", None, args.threads), "date": started, "loadavg_at_start": load,
           "results": results}
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, markdown(out))


if __name__ == "__main__":
    main()
