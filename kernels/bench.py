"""Attention kernel benchmark: dense SDPA vs the CPU neighbourhood path, interleaved.

``bench_attention`` is what ``ditopt bench attention`` calls.  Both methods run on the same
random inputs, alternating call by call (so load from other processes hits both alike);
the reported time is the median over ``repeats`` after ``warmup`` rounds.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .neighborhood import (neighborhood_attention_cpu, neighborhood_attention_reference,
                           neighborhood_density)

__all__ = ["bench_attention"]


def _max_rel_err(out: torch.Tensor, q, k, v, H, W, tile, radius, n_check: int, seed: int) -> float:
    """max |out - ref| / max |ref| over (a sample of) query rows; ref = float64 masked dense."""
    N = q.shape[2]
    if N <= n_check:
        idx = None
    else:
        g = torch.Generator().manual_seed(seed + 1)
        idx = torch.randperm(N, generator=g)[:n_check].sort().values
    ref = neighborhood_attention_reference(q, k, v, H, W, tile, radius, 0, query_index=idx)
    o = out.double() if idx is None else out.double().index_select(2, idx)
    return float((o - ref).abs().max() / ref.abs().max())


def bench_attention(grid: Sequence[int] = (64, 64), heads: int = 4, head_dim: int = 64, tile: int = 8,
                    radius: int = 1, batch: int = 1, repeats: int = 7, warmup: int = 2, seed: int = 0,
                    threads: Optional[int] = None, n_check: int = 512) -> Dict:
    """Time dense ``scaled_dot_product_attention`` vs :func:`neighborhood_attention_cpu`.

    Returns ``{"grid", "dense_ms", "sparse_ms", "speedup", "density", "max_rel_err", "threads",
    "tile", "radius", ...}``.  ``density`` is the fraction of the dense score matrix the sparse
    path computes (it computes exactly the mask, no padding waste on tile-multiple grids);
    ``max_rel_err`` is ``max|sparse - ref| / max|ref|`` against float64 dense attention restricted
    to the same mask, over all query rows or a random sample of ``n_check`` rows for big grids.
    """
    H, W = int(grid[0]), int(grid[1])
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        g = torch.Generator().manual_seed(seed)
        N = H * W
        q, k, v = (torch.randn(batch, heads, N, head_dim, generator=g) for _ in range(3))

        def dense():
            return F.scaled_dot_product_attention(q, k, v)

        def sparse():
            return neighborhood_attention_cpu(q, k, v, H, W, tile, radius)

        with torch.inference_mode():
            for _ in range(max(warmup, 0)):
                dense()
                sparse()
            td, ts = [], []
            for i in range(max(repeats, 1)):
                # alternate the order too, so neither method always runs right after the other
                order = (("d", dense), ("s", sparse)) if i % 2 == 0 else (("s", sparse), ("d", dense))
                for name, fn in order:
                    t0 = time.perf_counter()
                    fn()
                    dt = (time.perf_counter() - t0) * 1e3
                    (td if name == "d" else ts).append(dt)
            out = sparse()
            err = _max_rel_err(out, q, k, v, H, W, tile, radius, n_check, seed)
        dense_ms, sparse_ms = statistics.median(td), statistics.median(ts)
        return {
            "grid": [H, W],
            "dense_ms": round(dense_ms, 3),
            "sparse_ms": round(sparse_ms, 3),
            "speedup": round(dense_ms / sparse_ms, 3),
            "density": neighborhood_density(H, W, tile, radius, 0),
            "max_rel_err": err,
            "threads": torch.get_num_threads(),
            "tile": tile,
            "radius": radius,
            "heads": heads,
            "head_dim": head_dim,
            "batch": batch,
            "repeats": repeats,
            "dense_ms_all": [round(x, 3) for x in td],
            "sparse_ms_all": [round(x, 3) for x in ts],
        }
    finally:
        torch.set_num_threads(old_threads)
