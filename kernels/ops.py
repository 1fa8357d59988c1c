"""``ditopt::`` custom ops wrapping the attention kernels.

Registered with :func:`torch.library.custom_op` (+ ``register_fake``) so that ``torch.export``
and ``torch.compile`` keep each call as ONE opaque node:

* ``torch.ops.ditopt.neighborhood_attention(q, k, v, height, width, tile=8, radius=1, n_text=0, scale=None)``
* ``torch.ops.ditopt.block_sparse_attention(q, k, v, block_size=64, rho=0.25, n_text=0,
  include_diagonal=True, scale=None, eps=1e-6, compensate=True)``

``q, k, v``: ``[B, heads, N, D]``; result: contiguous ``[B, heads, N, D]`` with q's dtype.
Dispatch: CPU tensors -> the PyTorch fast paths; CUDA tensors -> the Triton kernels; any
other device -> the (masked dense) reference in the input dtype.  The forward is the fast
kernel; the backward (registered for distillation / fine-tuning use) recomputes through the
dense masked formulation in the input dtype -- correct, but O(N^2) memory, not a fast path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_sparse import block_sparse_attention_cpu, block_sparse_attention_reference
from .neighborhood import neighborhood_attention_cpu, neighborhood_attention_reference, neighborhood_mask

__all__ = ["neighborhood_attention", "block_sparse_attention"]


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
