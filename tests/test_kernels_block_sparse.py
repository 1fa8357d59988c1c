"""PISA block-sparse top-rho attention with first-order compensation: CPU path and Triton
(interpreter, subprocess) against the float64 reference; rho=1 == dense; compensation helps."""
import math
import textwrap

import pytest
import torch
from triton_interpreter import needs_triton, run_interpreted

from ditopt.kernels import (block_sparse_attention, block_sparse_attention_cpu, block_sparse_attention_reference,
                            block_stats, select_blocks)

TOL = 2e-5


def _qkv(B, h, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g) for _ in range(3)]


def _dense(q, k, v, scale=None):
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


def test_block_stats_definition():
    k, v, _ = _qkv(1, 1, 40, 8, 0)
    kc, vs, n, Hm = block_stats(k.double(), v.double(), 16)
    assert n.tolist() == [16, 16, 8]
    for j, (a, b) in enumerate([(0, 16), (16, 32), (32, 40)]):
        kb, vb = k[0, 0, a:b].double(), v[0, 0, a:b].double()
        c = kb.mean(0)
        assert torch.allclose(kc[0, 0, j], c)
        assert torch.allclose(vs[0, 0, j], vb.sum(0))
        assert torch.allclose(Hm[0, 0, j], (kb - c).T @ vb)


@pytest.mark.parametrize("rho,diag", [(0.25, True), (0.5, False), (0.1, True)])
def test_selection_count_and_diagonal(rho, diag):
    q, k, v = _qkv(2, 2, 160, 16, 1)
    kc, _, _, Hm = block_stats(k, v, 16)
    idx, sel = select_blocks(q, kc, Hm, 16, rho, 0.25, include_diagonal=diag)
    nb = 10
    assert idx.shape[-1] == max(1, math.ceil(rho * nb))
    assert (sel.sum(-1) == idx.shape[-1]).all()
    if diag:
        assert sel.diagonal(dim1=-2, dim2=-1).all()


CASES = [
    # M (image tokens), block, rho, n_text, B, heads, D, include_diagonal
    (256, 16, 0.25, 0, 1, 2, 16, True),
    (250, 16, 0.3, 5, 2, 2, 16, True),    # partial last block, text, batch > 1
    (200, 32, 0.5, 3, 1, 2, 16, False),
    (512, 64, 0.25, 0, 1, 2, 64, True),   # 8x8-tile blocks, head_dim 64
    (64, 16, 0.1, 0, 1, 1, 16, True),     # only the diagonal block is exact
]


@pytest.mark.parametrize("M,bs,rho,nt,B,h,D,diag", CASES)
@pytest.mark.parametrize("compensate", [True, False])
def test_cpu_path_matches_float64_reference(M, bs, rho, nt, B, h, D, diag, compensate):
    q, k, v = _qkv(B, h, nt + M, D, seed=M + bs)
    ref = block_sparse_attention_reference(q, k, v, bs, rho, nt, diag, compensate=compensate)
    out = block_sparse_attention_cpu(q, k, v, bs, rho, nt, diag, compensate=compensate)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - ref).abs().max().item() < TOL


@pytest.mark.parametrize("nt", [0, 4])
def test_rho_one_is_dense(nt):
    q, k, v = _qkv(2, 2, nt + 200, 16, 7)
    dense = _dense(q, k, v)
    ref = block_sparse_attention_reference(q, k, v, 16, 1.0, nt)
    out = block_sparse_attention_cpu(q, k, v, 16, 1.0, nt)
    assert (ref - dense).abs().max().item() < 1e-12
    assert (out.double() - dense).abs().max().item() < TOL


def _clustered(B, h, nb, bs, D, seed, spread=0.05):
    """Keys clustered per block around a centre (+ small noise), smooth values."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, h, nb, 1, D, generator=g) * 1.5
    k = (centres + spread * torch.randn(B, h, nb, bs, D, generator=g)).reshape(B, h, nb * bs, D)
    basis = torch.randn(B, h, 1, D, generator=g)
    pos = torch.linspace(0, 3, nb * bs).view(1, 1, -1, 1)
    v = torch.sin(pos + basis) + 0.05 * torch.randn(B, h, nb * bs, D, generator=g)
    q = torch.randn(B, h, nb * bs, D, generator=g) * 1.5
    return q, k, v


@pytest.mark.parametrize("spread", [0.05, 0.2])
def test_compensation_reduces_error_on_clustered_keys(spread):
    q, k, v = _clustered(1, 2, 16, 16, 16, seed=3, spread=spread)
    dense = _dense(q, k, v)
    comp = block_sparse_attention_cpu(q, k, v, 16, 0.25, compensate=True).double()
    drop = block_sparse_attention_cpu(q, k, v, 16, 0.25, compensate=False).double()
    e_comp = (comp - dense).norm() / dense.norm()
    e_drop = (drop - dense).norm() / dense.norm()
    assert e_comp < 0.5 * e_drop, (e_comp.item(), e_drop.item())


def test_custom_op_and_export():
    q, k, v = _qkv(1, 2, 3 + 64, 16, 9)

    class Tiny(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.ditopt.block_sparse_attention(q, k, v, 16, 0.5, 3) + 1.0

    ep = torch.export.export(Tiny(), (q, k, v))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.ditopt.block_sparse_attention.default]
    assert len(nodes) == 1
    ref = block_sparse_attention_reference(q, k, v, 16, 0.5, 3)
    assert (ep.module()(q, k, v).double() - 1.0 - ref).abs().max().item() < TOL
    assert torch.allclose(block_sparse_attention(q, k, v, 16, 0.5, 3), block_sparse_attention_cpu(q, k, v, 16, 0.5, 3))


def test_flop_counter_counts_selected_blocks_and_compensation():
    from torch.utils.flop_counter import FlopCounterMode
    B, h, N, D, bs = 1, 2, 1024, 32, 64  # 16 key blocks, rho 0.25 -> 4 exact blocks per query block
    q = torch.randn(B, h, N, D)
    with FlopCounterMode(display=False) as counter:
        torch.ops.ditopt.block_sparse_attention(q, q, q, bs, 0.25)
    stats = N * D * D + 16 * 16 * D                    # H_j, selection logits
    exact = 2 * N * (4 * bs) * D                       # QK^T + PV on 4 blocks of 64 keys
    comp = N * 16 * (2 * D + 1) + N * 16 * D * D       # centroid scores, sums, first-order term
    assert counter.get_total_flops() == 2 * B * h * (stats + exact + comp)
    with FlopCounterMode(display=False) as counter:
        torch.ops.ditopt.block_sparse_attention(q, q, q, bs, 0.25, compensate=False)
    assert counter.get_total_flops() == 2 * B * h * (stats + exact)


def test_custom_op_backward_runs_and_matches_reference_grads():
    q, k, v = (x.double().requires_grad_() for x in _qkv(1, 2, 2 + 64, 8, 12))
    g = torch.randn(1, 2, 66, 8, dtype=torch.float64)
    grads = torch.autograd.grad(block_sparse_attention(q, k, v, 16, 0.5, 2), (q, k, v), g)
    ref = torch.autograd.grad(block_sparse_attention_reference(q, k, v, 16, 0.5, 2), (q, k, v), g)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-10)


_TRITON_SCRIPT = textwrap.dedent("""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from ditopt.kernels.triton_kernels import block_sparse_attention_triton
    from ditopt.kernels.block_sparse import block_sparse_attention_reference
    cases = [(64, 16, 0.5, 0, 1, 1, 16, True), (60, 16, 0.25, 3, 2, 1, 16, True),
             (64, 16, 1.0, 0, 1, 1, 16, True), (80, 16, 0.4, 0, 1, 2, 16, False),
             (256, 64, 0.5, 2, 1, 1, 64, True)]
    errs = []
    for i, (M, bs, rho, nt, B, h, D, comp) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, h, nt + M, D, generator=g) for _ in range(3))
        o = block_sparse_attention_triton(q, k, v, bs, rho, nt, compensate=comp)
        ref = block_sparse_attention_reference(q, k, v, bs, rho, nt, compensate=comp)
        errs.append((o.double() - ref).abs().max().item())
    print("RESULT" + json.dumps(errs))
""")


@needs_triton
def test_triton_kernel_interpreter_matches_reference():
    errs = run_interpreted(_TRITON_SCRIPT)
    assert len(errs) == 5 and max(errs) < TOL, errs
