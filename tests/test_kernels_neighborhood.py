"""Tiled 2-D neighbourhood attention: layout, reference semantics, fast CPU path, Triton
(interpreter, in a subprocess so TRITON_INTERPRET is set before triton is imported), custom op."""

import textwrap

import pytest
import torch
from triton_interpreter import needs_triton, run_interpreted

from ditopt.kernels import (inverse_tile_permutation, neighborhood_attention, neighborhood_attention_cpu,
                            neighborhood_attention_reference, neighborhood_density, neighborhood_mask,
                            permute_from_tiles, permute_to_tiles, tile_grid, tile_major_coords, tile_permutation)

TOL = 2e-5


def _qkv(B, h, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g) for _ in range(3)]


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("H,W,t", [(8, 8, 4), (16, 12, 4), (13, 18, 4), (7, 5, 8), (9, 9, 3)])
def test_tile_permutation_roundtrip_and_structure(H, W, t):
    perm = tile_permutation(H, W, t)
    inv = inverse_tile_permutation(H, W, t)
    assert sorted(perm.tolist()) == list(range(H * W))
    assert torch.equal(perm[inv], torch.arange(H * W))
    x = torch.randn(2, H * W, 3)
    assert torch.equal(permute_from_tiles(permute_to_tiles(x, H, W, t), H, W, t), x)
    y, xx = tile_major_coords(H, W, t)
    assert torch.equal(y * W + xx, perm)
    # tiles are consecutive runs, row-major inside, tiles row-major; partial tiles at the edges
    TH, TW = tile_grid(H, W, t)
    pos = 0
    for ty in range(TH):
        for tx in range(TW):
            th, tw = min(t, H - ty * t), min(t, W - tx * t)
            run_y, run_x = y[pos:pos + th * tw], xx[pos:pos + th * tw]
            exp_y = torch.arange(ty * t, ty * t + th).repeat_interleave(tw)
            exp_x = torch.arange(tx * t, tx * t + tw).repeat(th)
            assert torch.equal(run_y, exp_y) and torch.equal(run_x, exp_x)
            pos += th * tw
    assert pos == H * W


def test_mask_semantics_clamped_centre():
    H = W = 32
    t, r = 4, 1
    m = neighborhood_mask(H, W, t, r)
    y, x = tile_major_coords(H, W, t)
    TH = H // t
    for qi in range(0, H * W, 37):
        ty, tx = int(y[qi]) // t, int(x[qi]) // t
        cy, cx = min(max(ty, r), TH - 1 - r), min(max(tx, r), TH - 1 - r)
        keys = m[qi].nonzero().flatten()
        kty, ktx = y[keys] // t, x[keys] // t
        assert set(kty.tolist()) == set(range(cy - r, cy + r + 1))
        assert set(ktx.tolist()) == set(range(cx - r, cx + r + 1))
        assert keys.numel() == (2 * r + 1) ** 2 * t * t  # every query sees exactly (2r+1)^2 tiles
    mt = neighborhood_mask(8, 8, 4, 1, n_text=3)
    assert mt[:3].all() and mt[:, :3].all()


@pytest.mark.parametrize("H,W,t,r,nt", [(16, 16, 4, 1, 0), (13, 18, 4, 2, 3), (32, 24, 8, 1, 5), (4, 4, 4, 1, 2)])
def test_density_matches_mask(H, W, t, r, nt):
    assert neighborhood_density(H, W, t, r, nt) == pytest.approx(neighborhood_mask(H, W, t, r, nt).double().mean().item())


# ----------------------------------------------------------------------------- CPU fast path
CASES = [
    # H, W, tile, radius, n_text, B, heads, D
    (16, 16, 4, 1, 0, 1, 2, 16),    # regular
    (32, 32, 4, 1, 0, 1, 2, 32),    # regular, interior windows
    (24, 24, 4, 2, 0, 1, 2, 16),    # r = 2
    (13, 18, 4, 1, 0, 1, 2, 16),    # not a multiple of the tile
    (21, 19, 4, 2, 7, 2, 2, 16),    # not a multiple, r = 2, text, batch > 1
    (16, 16, 4, 1, 9, 2, 3, 16),    # MMDiT text + image, batch > 1
    (8, 12, 4, 2, 0, 1, 1, 16),     # grid smaller than the window (window shrinks to the grid)
    (32, 16, 8, 1, 4, 2, 2, 64),    # 8x8 tiles, head_dim 64
]


@pytest.mark.parametrize("H,W,t,r,nt,B,h,D", CASES)
def test_cpu_fast_path_matches_float64_reference(H, W, t, r, nt, B, h, D):
    q, k, v = _qkv(B, h, nt + H * W, D, seed=H * 100 + W + r)
    ref = neighborhood_attention_reference(q, k, v, H, W, t, r, nt)
    out = neighborhood_attention_cpu(q, k, v, H, W, t, r, nt)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert (out.double() - ref).abs().max().item() < TOL


def test_cpu_fast_path_noncontiguous_inputs_and_scale():
    H, W, t, nt, B, h, D = 16, 12, 4, 3, 2, 2, 16
    N = nt + H * W
    g = torch.Generator().manual_seed(1)
    # diffusers layout: [B, N, heads, D] transposed to [B, heads, N, D]
    q, k, v = (torch.randn(B, N, h, D, generator=g).transpose(1, 2) for _ in range(3))
    ref = neighborhood_attention_reference(q, k, v, H, W, t, 1, nt, scale=0.3)
    out = neighborhood_attention_cpu(q, k, v, H, W, t, 1, nt, scale=0.3)
    assert (out.double() - ref).abs().max().item() < TOL


def test_reference_query_index_subset():
    H = W = 8
    q, k, v = _qkv(1, 1, H * W, 8, 3)
    idx = torch.tensor([0, 5, 17, 63])
    full = neighborhood_attention_reference(q, k, v, H, W, 4, 1)
    sub = neighborhood_attention_reference(q, k, v, H, W, 4, 1, query_index=idx)
    assert torch.allclose(full[:, :, idx], sub)


def test_bf16_runs_close():
    H = W = 16
    q, k, v = _qkv(1, 2, H * W, 32, 4)
    ref = neighborhood_attention_reference(q, k, v, H, W, 4, 1)
    out = neighborhood_attention_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16(), H, W, 4, 1)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max().item() < 5e-2


# ----------------------------------------------------------------------------- custom op / export
def test_custom_op_dispatch_and_export():
    H, W, t, nt = 8, 8, 4, 2
    q, k, v = _qkv(1, 2, nt + H * W, 16, 5)

    class Tiny(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.ditopt.neighborhood_attention(q, k, v, H, W, t, 1, nt) * 2.0

    eager = Tiny()(q, k, v)
    assert torch.allclose(eager, 2.0 * neighborhood_attention(q, k, v, H, W, t, 1, nt))
    ep = torch.export.export(Tiny(), (q, k, v))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.ditopt.neighborhood_attention.default]
    assert len(nodes) == 1
    assert not any("flash" in str(n.target) for n in ep.graph.nodes)  # the op stays opaque
    q2, k2, v2 = _qkv(1, 2, nt + H * W, 16, 6)
    ref = neighborhood_attention_reference(q2, k2, v2, H, W, t, 1, nt)
    assert (ep.module()(q2, k2, v2).double() - 2 * ref).abs().max().item() < 2 * TOL


def test_flop_counter_counts_kept_pairs():
    # a custom op is opaque to torch.utils.flop_counter; the registered formula must count the
    # kept pairs: 32x32 grid, 8x8 tiles, r=1 -> each axis keeps 8*24 of 32*32 ... = (768/1024)^2
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(1, 4, 1024, 64)
    with FlopCounterMode(display=False) as counter:
        torch.ops.ditopt.neighborhood_attention(q, q, q, 32, 32, 8, 1)
    dense_flops = 2 * 2 * 4 * 1024 * 1024 * 64  # QK^T + PV, 2 flops per MAC
    assert counter.get_total_flops() == dense_flops * 768 * 768 // (1024 * 1024)
    # a window covering the whole grid is dense attention
    with FlopCounterMode(display=False) as counter:
        torch.ops.ditopt.neighborhood_attention(q, q, q, 32, 32, 8, 2)
    assert counter.get_total_flops() == dense_flops


def test_custom_op_backward_matches_reference_grads():
    H, W, t, nt = 8, 12, 4, 2
    q, k, v = (x.double().requires_grad_() for x in _qkv(1, 2, nt + H * W, 8, 11))
    g = torch.randn(1, 2, nt + H * W, 8, dtype=torch.float64)
    grads = torch.autograd.grad(neighborhood_attention(q, k, v, H, W, t, 1, nt), (q, k, v), g)
    ref = torch.autograd.grad(neighborhood_attention_reference(q, k, v, H, W, t, 1, nt), (q, k, v), g)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-10)


def test_bench_attention_contract():
    from ditopt.kernels.bench import bench_attention
    r = bench_attention(grid=(16, 16), heads=2, head_dim=16, tile=4, radius=1, repeats=1, warmup=0)
    for key in ("grid", "dense_ms", "sparse_ms", "speedup", "density", "max_rel_err", "threads", "tile", "radius"):
        assert key in r
    assert r["grid"] == [16, 16] and r["max_rel_err"] < 1e-4
    assert r["density"] == pytest.approx(neighborhood_density(16, 16, 4, 1))


# ----------------------------------------------------------------------------- Triton (interpreter)
_TRITON_SCRIPT = textwrap.dedent("""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from ditopt.kernels.triton_kernels import neighborhood_attention_triton
    from ditopt.kernels.neighborhood import neighborhood_attention_reference
    cases = [(8, 8, 4, 1, 0, 1, 1, 16), (10, 7, 4, 1, 3, 2, 1, 16), (12, 12, 4, 2, 0, 1, 1, 16),
             (9, 8, 4, 1, 0, 1, 2, 24), (16, 16, 8, 1, 2, 1, 1, 64)]
    errs = []
    for i, (H, W, t, r, nt, B, h, D) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, h, nt + H * W, D, generator=g) for _ in range(3))
        o = neighborhood_attention_triton(q, k, v, H, W, t, r, nt)
        ref = neighborhood_attention_reference(q, k, v, H, W, t, r, nt)
        errs.append((o.double() - ref).abs().max().item())
    print("RESULT" + json.dumps(errs))
""")


@needs_triton
def test_triton_kernel_interpreter_matches_reference():
    errs = run_interpreted(_TRITON_SCRIPT)
    assert len(errs) == 5 and max(errs) < TOL, errs
