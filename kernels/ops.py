"""``ditopt::`` custom ops wrapping the attention kernels.

Registered with :func:`torch.library.custom_op` (+ ``register_fake``) so that ``torch.export``
and ``torch.compile`` keep each call as ONE opaque node:

* ``torch.ops.ditopt.neighborhood_attention(q, k, v, height, width, tile=8, radius=1, n_text=0, scale=None)``
* ``torch.ops.ditopt.block_sparse_attention(q, k, v, block_size=64, rho=0.25, n_text=0,
  include_diagonal=True, scale=None, eps=1e-6, compensate=True)``
* ``torch.ops.ditopt.linear_attention(q, k, v, conv_weight, height, width, n_text=0, feature="elu",
  eps=1e-6)`` (kernels.linear_attention; its backward is the reference's, O(N D^2) like the forward)

``q, k, v``: ``[B, heads, N, D]``; result: contiguous ``[B, heads, N, D]`` with q's dtype.
Dispatch: CPU tensors -> the PyTorch fast paths; CUDA tensors -> the Triton kernels; any
other device -> the (masked dense) reference in the input dtype.  The forward is the fast
kernel; the backward (registered for distillation / fine-tuning use) recomputes through the
dense masked formulation in the input dtype -- correct, but O(N^2) memory, not a fast path.

Both ops carry a ``torch.utils.flop_counter`` formula: a custom op is opaque to the counter
(it sees the op, not the matmuls inside), so without one the attention would count as free.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.utils.flop_counter import register_flop_formula

from ditopt.registry import register_export_lowering

from .linear_attention import linear_attention_cpu, linear_attention_macs, linear_attention_reference
from .block_sparse import block_sparse_attention_cpu, block_sparse_attention_reference, num_selected
from .neighborhood import (attention_with_lse, neighborhood_attention_cpu, neighborhood_attention_reference, neighborhood_density,
                           neighborhood_mask)

__all__ = ["neighborhood_attention", "block_sparse_attention", "linear_attention", "neighborhood_attention_macs",
           "block_sparse_attention_macs"]


@torch.library.custom_op("ditopt::neighborhood_attention", mutates_args=())
def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, height: int, width: int, tile: int = 8,
                           radius: int = 1, n_text: int = 0, scale: Optional[float] = None) -> Tensor:
    """Tiled 2-D neighbourhood attention on tile-major image tokens (+ optional text prefix)."""
    if q.device.type == "cpu":
        return neighborhood_attention_cpu(q, k, v, height, width, tile, radius, n_text, scale)
    return neighborhood_attention_reference(q, k, v, height, width, tile, radius, n_text, scale,
                                            dtype=q.dtype).contiguous()


@neighborhood_attention.register_kernel("cuda")
def _neighborhood_attention_cuda(q, k, v, height, width, tile=8, radius=1, n_text=0, scale=None):
    from .triton_kernels import neighborhood_attention_triton
    return neighborhood_attention_triton(q, k, v, height, width, tile, radius, n_text, scale)


@neighborhood_attention.register_fake
def _neighborhood_attention_fake(q, k, v, height, width, tile=8, radius=1, n_text=0, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("ditopt::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int = 64, rho: float = 0.25,
                           n_text: int = 0, include_diagonal: bool = True, scale: Optional[float] = None,
                           eps: float = 1e-6, compensate: bool = True) -> Tensor:
    """PISA block-sparse top-rho attention with first-order compensation."""
    if q.device.type == "cpu":
        return block_sparse_attention_cpu(q, k, v, block_size, rho, n_text, include_diagonal, scale, eps,
                                          compensate)
    return block_sparse_attention_reference(q, k, v, block_size, rho, n_text, include_diagonal, scale, eps,
                                            compensate, dtype=q.dtype).contiguous()


@block_sparse_attention.register_kernel("cuda")
def _block_sparse_attention_cuda(q, k, v, block_size=64, rho=0.25, n_text=0, include_diagonal=True,
                                 scale=None, eps=1e-6, compensate=True):
    from .triton_kernels import block_sparse_attention_triton
    return block_sparse_attention_triton(q, k, v, block_size, rho, n_text, include_diagonal, scale, eps,
                                         compensate)


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(q, k, v, block_size=64, rho=0.25, n_text=0, include_diagonal=True,
                                 scale=None, eps=1e-6, compensate=True):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("ditopt::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, conv_weight: Tensor, height: int, width: int, n_text: int = 0,
                     feature: str = "elu", eps: float = 1e-6) -> Tensor:
    """Linear attention (ReLU or ELU+1 feature map) plus a depthwise convolution of the image values."""
    if q.device.type == "cpu":
        return linear_attention_cpu(q, k, v, conv_weight, height, width, n_text, feature, eps)
    return linear_attention_reference(q, k, v, conv_weight, height, width, n_text, feature, eps).contiguous()


@linear_attention.register_kernel("cuda")
def _linear_attention_cuda(q, k, v, conv_weight, height, width, n_text=0, feature="elu", eps=1e-6):
    from .linear_attention_triton import linear_attention_triton
    return linear_attention_triton(q, k, v, conv_weight, height, width, n_text, feature, eps)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, conv_weight, height, width, n_text=0, feature="elu", eps=1e-6):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _save_linear(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.cfg = tuple(inputs[4:])


def _linear_backward(ctx, grad):
    q, k, v, w = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v, w)]
        o = linear_attention_reference(*leaves, *ctx.cfg)
        grads = torch.autograd.grad(o, leaves, grad)
    return (*grads, None, None, None, None, None)


linear_attention.register_autograd(_linear_backward, setup_context=_save_linear)


def _save_qkv(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.cfg = tuple(inputs[3:])


def _neighborhood_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    height, width, tile, radius, n_text, scale = ctx.cfg
    mask = neighborhood_mask(height, width, tile, radius, n_text, device=q.device)
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), grad)
    return gq, gk, gv, None, None, None, None, None, None


def _block_sparse_backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    block_size, rho, n_text, include_diagonal, scale, eps, compensate = ctx.cfg
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o = block_sparse_attention_reference(qq, kk, vv, block_size, rho, n_text, include_diagonal, scale, eps,
                                             compensate, dtype=q.dtype)
        gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), grad)
    return gq, gk, gv, None, None, None, None, None, None, None


neighborhood_attention.register_autograd(_neighborhood_backward, setup_context=_save_qkv)
block_sparse_attention.register_autograd(_block_sparse_backward, setup_context=_save_qkv)


# ------------------------------------------------------------------------------------------
# multiply-accumulate counts (what the kernels compute; the flop counter reports 2 per MAC)
# ------------------------------------------------------------------------------------------
def neighborhood_attention_macs(q_shape, height: int, width: int, tile: int = 8, radius: int = 1,
                                n_text: int = 0) -> int:
    """QK^T and PV over the kept (query, key) pairs: ``2 * B * heads * D * pairs``."""
    B, Hh, N, D = q_shape
    pairs = neighborhood_density(height, width, tile, radius, n_text) * N * N
    return int(round(2 * B * Hh * D * pairs))


def block_sparse_attention_macs(q_shape, block_size: int = 64, rho: float = 0.25, n_text: int = 0,
                                compensate: bool = True) -> int:
    """Block statistics (H_j: D x D per key), block selection (query centroids x key centroids),
    exact attention on the selected blocks and to the text keys, the first-order compensation
    (scores, sums and the ``q H_j`` term against every unselected block), and dense attention of
    the text queries -- each as the CPU path and the Triton kernel compute it (padded blocks)."""
    B, Hh, N, D = q_shape
    M = N - n_text
    nb = -(-M // block_size)
    P = nb * block_size
    ksel = num_selected(nb, rho)
    macs = P * D * D + nb * nb * D                  # H_j statistics, selection logits
    macs += 2 * P * ksel * block_size * D           # exact attention on the selected blocks
    macs += 2 * M * n_text * D + 2 * n_text * N * D  # image -> text keys, text queries -> all keys
    if compensate and ksel < nb:
        macs += P * nb * (2 * D + 1) + P * nb * D * D  # centroid scores, sums, first-order term
    return B * Hh * macs


@register_flop_formula(torch.ops.ditopt.neighborhood_attention)
def _neighborhood_attention_flops(q_shape, k_shape, v_shape, height, width, tile=8, radius=1, n_text=0,
                                  scale=None, *args, **kwargs) -> int:
    return 2 * neighborhood_attention_macs(q_shape, height, width, tile, radius, n_text)


@register_flop_formula(torch.ops.ditopt.block_sparse_attention)
def _block_sparse_attention_flops(q_shape, k_shape, v_shape, block_size=64, rho=0.25, n_text=0,
                                  include_diagonal=True, scale=None, eps=1e-6, compensate=True,
                                  *args, **kwargs) -> int:
    return 2 * block_sparse_attention_macs(q_shape, block_size, rho, n_text, compensate)


@register_flop_formula(torch.ops.ditopt.linear_attention)
def _linear_attention_flops(q_shape, k_shape, v_shape, w_shape, height, width, n_text=0, feature="elu", eps=1e-6,
                            *args, **kwargs) -> int:
    return 2 * linear_attention_macs(q_shape, v_shape, w_shape[-1])


# ONNX has no ditopt ops: export traces each through its CPU path, which is standard torch ops
# (tile gathers and SDPA; PISA's block scores, top-k and compensation) at the segment's static shapes.
register_export_lowering(torch.ops.ditopt.neighborhood_attention.default,
                         functools.partial(neighborhood_attention_cpu, attention=attention_with_lse))
register_export_lowering(torch.ops.ditopt.block_sparse_attention.default,
                         functools.partial(block_sparse_attention_cpu, attention=attention_with_lse))
register_export_lowering(torch.ops.ditopt.linear_attention.default, linear_attention_reference)
