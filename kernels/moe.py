"""The routed-expert FFN (MoE split of a dense FFN), as a custom op.

Layout: the FFN's hidden neurons are permuted so that the shared expert's `shared` neurons come
first, then `experts` routed experts of `h` neurons each, contiguous. `w1` [H, D] and `b1` [H]
are the up projection's rows in that order, `w2t` [H, D] the down projection transposed (rows
again, so that an expert's slice is contiguous). A token runs the shared neurons and the
`top_k` routed experts its router scores highest (`x @ router_w^T + router_b`); the outputs are
summed without gates. `offsets` [E, D] compensates the experts a token skips: a selected expert
contributes its output minus offsets[e], and the caller folds sum_e offsets[e] into `b2` (with
offsets = each expert's mean output on calibration tokens, a skipped expert counts as its mean
rather than as zero). With every expert selected the op equals the dense FFN exactly.

Three formulations of the same arithmetic:
* `moe_ffn` (the op, CPU and GPU): tokens grouped by expert (one stable sort), one GEMM pair per
  expert on its tokens, scattered back with `index_add_`; on CUDA with Triton, the two grouped
  GEMMs run as Triton kernels (ditopt.kernels.moe_triton).
* `moe_ffn_reference`: per token, in float64: what the tests compare against.
* `_moe_ffn_exportable`: dense with a per-neuron 0/1 mask from the top-k (TopK + scatter), in
  standard ops the ONNX exporter translates; it computes every expert, so an exported artifact
  matches the routed model but does not run faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ditopt.registry import register_export_lowering

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"moe_ffn: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")


def route(x: Tensor, router_w: Tensor, router_b: Tensor, top_k: int) -> Tensor:
    """[T, D] tokens -> [T, top_k] expert indices."""
    return F.linear(x, router_w, router_b).topk(top_k, dim=1).indices


def _check(x: Tensor, w1: Tensor, w2t: Tensor, router_w: Tensor, shared: int, experts: int, top_k: int) -> int:
    hidden = w1.shape[0]
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"moe_ffn: top_k = {top_k} must be between 1 and experts = {experts}")
    if (hidden - shared) % experts or shared < 0:
        raise ValueError(f"moe_ffn: {hidden} hidden neurons minus {shared} shared do not split into {experts} experts")
    if w2t.shape != w1.shape or router_w.shape != (experts, x.shape[-1]):
        raise ValueError(f"moe_ffn: weights of shapes {tuple(w1.shape)}, {tuple(w2t.shape)}, router {tuple(router_w.shape)} "
                         f"do not fit {experts} experts on width {x.shape[-1]}")
    return (hidden - shared) // experts


def group_by_expert(idx: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """[T, k] expert indices -> (token of each routed row, sorted by expert; rows per expert)."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order // idx.shape[1], torch.bincount(flat, minlength=experts)


def moe_ffn_grouped(x: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, b2: Tensor | None, offsets: Tensor,
                    router_w: Tensor, router_b: Tensor, shared: int, experts: int, top_k: int, activation: str,
                    grouped_mm=None) -> Tensor:
    """The op's arithmetic: grouped by expert. `grouped_mm(rows, weight [E, K, N], counts, bias)`
    replaces the per-expert loop (the Triton path); None runs the loop with torch GEMMs."""
    h = _check(x, w1, w2t, router_w, shared, experts, top_k)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    y = xf.new_zeros(xf.shape) if b2 is None else b2.expand(xf.shape).clone()
    if shared:
        y += activate(F.linear(xf, w1[:shared], b1[:shared]), activation) @ w2t[:shared]
    tokens, counts = group_by_expert(route(xf, router_w, router_b, top_k), experts)
    rows = xf.index_select(0, tokens)
    if grouped_mm is not None:
        up = grouped_mm(rows, w1[shared:].reshape(experts, h, -1).transpose(1, 2), counts, b1[shared:].reshape(experts, h))
        out = grouped_mm(activate(up, activation), w2t[shared:].reshape(experts, h, -1), counts, -offsets)
    else:
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                lo, hi = shared + e * h, shared + (e + 1) * h
                part = activate(F.linear(rows[start:start + n], w1[lo:hi], b1[lo:hi]), activation)
                torch.addmm(offsets[e], part, w2t[lo:hi], beta=-1, out=out[start:start + n])
                start += n
    y.index_add_(0, tokens, out)
    return y.reshape(shape)


@torch.library.custom_op("ditopt::moe_ffn", mutates_args=())
def moe_ffn(x: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, b2: Tensor | None, offsets: Tensor, router_w: Tensor,
            router_b: Tensor, shared: int, experts: int, top_k: int, activation: str) -> Tensor:
    """The routed FFN: x [..., D] -> [..., D] (see the module docstring for the layout)."""
    grouped = None
    if x.is_cuda:
        from ditopt.kernels.moe_triton import HAS_TRITON, grouped_matmul_triton

        grouped = grouped_matmul_triton if HAS_TRITON else None
    return moe_ffn_grouped(x, w1, b1, w2t, b2, offsets, router_w, router_b, shared, experts, top_k, activation, grouped)


@moe_ffn.register_fake
def _moe_ffn_fake(x, w1, b1, w2t, b2, offsets, router_w, router_b, shared, experts, top_k, activation):
    return torch.empty_like(x)


def activated_neurons(hidden: int, shared: int, experts: int, top_k: int) -> int:
    return shared + top_k * ((hidden - shared) // experts)


def activated_parameters(width: int, hidden: int, shared: int, experts: int, top_k: int) -> int:
    """Weights one token multiplies by (= its multiply-adds): its neurons' up and down rows and
    the router."""
    return width * (2 * activated_neurons(hidden, shared, experts, top_k) + experts)


@register_flop_formula(torch.ops.ditopt.moe_ffn)
def _moe_ffn_flops(x_shape, w1_shape, b1_shape, w2t_shape, b2_shape, offsets_shape, router_shape, router_b_shape,
                   shared, experts, top_k, activation, out_shape=None, **kwargs) -> int:
    """What the routed FFN multiplies per call: the router and each token's active neurons."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * activated_parameters(x_shape[-1], w1_shape[0], shared, experts, top_k)


def expert_mask(x: Tensor, router_w: Tensor, router_b: Tensor, experts: int, top_k: int) -> Tensor:
    """[T, E] 0/1: the routed experts each token runs."""
    idx = route(x, router_w, router_b, top_k)
    return torch.zeros(x.shape[0], experts, dtype=x.dtype, device=x.device).scatter(1, idx, 1.0)


def masked_ffn(xf: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, b2: Tensor | None, offsets: Tensor, chosen: Tensor,
               shared: int, activation: str) -> Tensor:
    """The routed FFN with every expert computed and the unselected ones masked ([T, E] 0/1
    `chosen`): standard, differentiable ops (export; distillation)."""
    experts = chosen.shape[1]
    h = (w1.shape[0] - shared) // experts
    mask = torch.cat([chosen.new_ones(chosen.shape[0], shared), chosen.repeat_interleave(h, dim=1)], 1)
    y = (activate(F.linear(xf, w1, b1), activation) * mask) @ w2t - chosen @ offsets
    return y + b2 if b2 is not None else y


def _moe_ffn_exportable(x: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, b2: Tensor | None, offsets: Tensor,
                        router_w: Tensor, router_b: Tensor, shared: int, experts: int, top_k: int, activation: str) -> Tensor:
    """Standard ops for ONNX (TopK, ScatterElements): every expert computed, the unselected masked."""
    xf = x.reshape(-1, x.shape[-1])
    chosen = expert_mask(xf, router_w, router_b, experts, top_k)
    return masked_ffn(xf, w1, b1, w2t, b2, offsets, chosen, shared, activation).reshape(x.shape)


register_export_lowering(torch.ops.ditopt.moe_ffn.default, _moe_ffn_exportable)


def moe_ffn_reference(x: Tensor, w1: Tensor, b1: Tensor, w2t: Tensor, b2: Tensor | None, offsets: Tensor,
                      router_w: Tensor, router_b: Tensor, shared: int, experts: int, top_k: int, activation: str) -> Tensor:
    """Token by token in float64: the shared neurons plus each chosen expert's FFN, summed."""
    h = _check(x, w1, w2t, router_w, shared, experts, top_k)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    xf, w1, b1, w2t, b2, offsets = (d(t) for t in (x.reshape(-1, x.shape[-1]), w1, b1, w2t, b2, offsets))
    out = torch.zeros_like(xf)
    # The routing decision in the op's own precision (ties aside, float64 scores could order
    # near-equal experts differently); the arithmetic after it in float64.
    routed = route(x.reshape(-1, x.shape[-1]), router_w, router_b, top_k)
    for t in range(xf.shape[0]):
        xt = xf[t]
        chosen = routed[t].tolist()
        acc = b2.clone() if b2 is not None else torch.zeros_like(xt)
        if shared:
            acc += activate(w1[:shared] @ xt + b1[:shared], activation) @ w2t[:shared]
        for e in chosen:
            lo, hi = shared + e * h, shared + (e + 1) * h
            acc += activate(w1[lo:hi] @ xt + b1[lo:hi], activation) @ w2t[lo:hi] - offsets[e]
        out[t] = acc
    return out.reshape(x.shape)


__all__ = ["ACTIVATIONS", "activate", "activated_neurons", "activated_parameters", "moe_ffn", "moe_ffn_grouped", "moe_ffn_reference",
           "expert_mask", "masked_ffn", "route", "group_by_expert"]
