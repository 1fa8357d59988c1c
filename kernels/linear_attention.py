"""Linear attention with a depthwise convolution on the values (LiT / SANA form).

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)  +  dwconv(v)_i

`phi` is ReLU or ELU + 1 (`FEATURES`); the sums run over every key (text and image tokens), so
the cost is O(N D^2) per head instead of dense attention's O(N^2 D). The depthwise convolution
(`conv_weight` [heads, D, k, k], one k x k filter per value channel) runs over the image tokens
laid out row-major on the `height` x `width` grid and gives back the locality a global feature
map loses; text tokens (the first `n_text`) get no convolution term. A zero `conv_weight` is
plain linear attention.

* :func:`linear_attention_reference`: the formula in float64-able torch ops (the test oracle,
  the ONNX lowering and the backward).
* :func:`linear_attention_cpu`: the same in chunks of keys and queries, so that no float copy
  of a whole q or k is held (memory O(chunk * D + D^2) per head beside the output).
* Triton: `kernels.linear_attention_triton` (CUDA; CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURES = ("relu", "elu")
CHUNK = 1024  # tokens per chunk of the CPU path


def feature_map(x: Tensor, feature: str) -> Tensor:
    if feature == "relu":
        return F.relu(x)
    if feature == "elu":
        return F.elu(x) + 1.0
    raise ValueError(f"linear attention feature map {feature!r}: one of {', '.join(FEATURES)}")


def value_conv(v: Tensor, conv_weight: Tensor, height: int, width: int, n_text: int) -> Tensor:
    """Depthwise k x k convolution of the image tokens' values on their grid: [B, H, N, D]
    (text rows zero)."""
    b, heads, n, d = v.shape
    m = n - n_text
    if m != height * width:
        raise ValueError(f"linear attention: {m} image tokens do not fill the {height}x{width} grid")
    k = conv_weight.shape[-1]
    img = v[:, :, n_text:].permute(0, 1, 3, 2).reshape(b, heads * d, height, width)
    out = F.conv2d(img, conv_weight.reshape(heads * d, 1, k, k).to(v.dtype), padding=k // 2, groups=heads * d)
    out = out.reshape(b, heads, d, m).permute(0, 1, 3, 2)
    return F.pad(out, (0, 0, n_text, 0))


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, conv_weight: Tensor, height: int, width: int,
                               n_text: int = 0, feature: str = "elu", eps: float = 1e-6,
                               dtype: torch.dtype | None = None) -> Tensor:
    """The formula at `dtype` (default: float32, or float64 for float64 inputs); result in q's dtype."""
    dtype = dtype or _accumulate(q)
    qf, kf, vf = feature_map(q.to(dtype), feature), feature_map(k.to(dtype), feature), v.to(dtype)
    kv = kf.transpose(-2, -1) @ vf  # [B, H, D, D]
    z = kf.sum(-2, keepdim=True)  # [B, H, 1, D]
    out = (qf @ kv) / ((qf * z).sum(-1, keepdim=True) + eps)
    out = out + value_conv(vf, conv_weight.to(dtype), height, width, n_text)
    return out.to(q.dtype)


def linear_attention_cpu(q: Tensor, k: Tensor, v: Tensor, conv_weight: Tensor, height: int, width: int,
                         n_text: int = 0, feature: str = "elu", eps: float = 1e-6, chunk: int = CHUNK) -> Tensor:
    """The reference's result, accumulating the key statistics and writing the queries chunk by
    chunk in float32 (float64 for float64 inputs)."""
    n, acc = k.shape[-2], _accumulate(q)
    kv = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=acc)
    z = q.new_zeros(*q.shape[:2], 1, q.shape[-1], dtype=acc)
    for s in range(0, n, chunk):
        kf = feature_map(k[:, :, s:s + chunk].to(acc), feature)
        kv += kf.transpose(-2, -1) @ v[:, :, s:s + chunk].to(acc)
        z += kf.sum(-2, keepdim=True)
    out = value_conv(v.to(acc), conv_weight.to(acc), height, width, n_text)
    for s in range(0, q.shape[-2], chunk):
        qf = feature_map(q[:, :, s:s + chunk].to(acc), feature)
        out[:, :, s:s + chunk] += (qf @ kv) / ((qf * z).sum(-1, keepdim=True) + eps)
    return out.to(q.dtype)


def _accumulate(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_attention_macs(q_shape, v_shape, conv_size: int) -> int:
    """phi(K)^T V and phi(Q) KV (D x Dv per token each), the normaliser (D per token, twice),
    and the depthwise convolution (k*k per value channel of each image token, counted on all)."""
    b, heads, n, d = q_shape
    dv = v_shape[-1]
    return b * heads * n * (2 * d * dv + 2 * d + conv_size * conv_size * dv)
