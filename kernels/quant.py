"""Quantization primitives for the `quantize` pass (LRQ-DiT, ../shared/ALGORITHMS.md section 4).

Weights (per output row ``w[o, :]``):

* ``int8``: symmetric per output channel, codes in [-127, 127].
* ``int4``: asymmetric per group of ``group_size`` input channels, codes in [0, 15].
* ``tlq4`` / ``tlq3``: Twin-Log Quantization. Each sign half of a row is quantized on a log grid,
  ``L = log2(|w| + eta)``, uniformly over [min L, clip L] with 2^(bits-1) levels, its own scale,
  zero point and clipping percentile; ``|w| = 2^L - eta`` on the way back. eta and the two
  percentiles are grid-searched per row for the least squared reconstruction error. Stored as
  codes (sign bit + level) and a per-row table of the 2^bits values they decode to.

Activations: dynamic per token (last dimension), symmetric, 8 or 4 bits.

Rotations: ``Y = X W^T = (X R)(W R)^T`` for orthogonal R. :func:`hadamard` is the normalised
Sylvester matrix; a width that is not a power of two gets a block-diagonal Hadamard on the largest
power-of-two block dividing it (still orthogonal; 1152 = 9 x 128), refused when that block is
smaller than 16 (the rotation would barely mix).

Real integer execution: ``torch.ops.ditopt.int8_linear`` quantizes the activation per token and
multiplies int8 x int8 -> int32 with ``torch._int_mm`` (CPU and CUDA), then rescales; equal to the
fake-quant (Q/DQ) path up to float rounding of the accumulation. Every other quantized linear is
``torch.ops.ditopt.qdq_linear``: the weight held as its codes and scales and dequantized per call,
the activation quantized-dequantized per token. Both ops export to ONNX as QuantizeLinear /
DequantizeLinear around a Gemm (kernels/quant_onnx.py), so the artifact stores the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


__all__ = ["quantize_int8", "quantize_int4", "quantize_tlq", "fake_quant_activation", "hadamard",
           "rotation_block", "int8_accumulate", "int8_linear", "int8_linear_reference", "qdq_linear", "QuantizedWeight",
           "quantize_weight"]

WEIGHT_FORMATS = ("none", "int8", "int4", "tlq4", "tlq3")
WEIGHT_BITS = {"none": 32, "int8": 8, "int4": 4, "tlq4": 4, "tlq3": 3}


@dataclass
class QuantizedWeight:
    """What a quantized weight stores, and its dequantized value (the fake-quant path)."""

    fmt: str
    codes: Tensor  # int8 (int8 format) or uint8 codes
    scale: Tensor  # int8: [O]; int4: [O, G]; tlq: the per-row table [O, 2^bits]
    zero: Tensor | None  # int4 only: [O, G]
    group_size: int | None

    def dequantize(self) -> Tensor:
        if self.fmt == "int8":
            return self.codes.float() * self.scale[:, None]
        if self.fmt == "int4":
            o, i = self.codes.shape
            g = self.group_size
            q = self.codes.float().reshape(o, i // g, g)
            return ((q - self.zero[..., None]) * self.scale[..., None]).reshape(o, i)
        o, i = self.codes.shape
        g = self.group_size or i
        return torch.gather(self.scale, 1, self.codes.long().reshape(-1, g)).reshape(o, i)

    @property
    def bits(self) -> int:
        return WEIGHT_BITS[self.fmt]

    def storage_bytes(self) -> int:
        """Bytes of the packed form: codes at their bit width plus fp16 parameters: int8 one scale
        per row, int4 scale and zero per group, TLQ (lowest log, step, eta) per sign half per group,
        from which the decoding table is rebuilt."""
        codes = (self.codes.numel() * self.bits + 7) // 8
        if self.fmt.startswith("tlq"):
            extra = 6 * self.scale.shape[0]
        else:
            extra = self.scale.numel() + (self.zero.numel() if self.zero is not None else 0)
        return codes + 2 * extra


def quantize_int8(w: Tensor) -> QuantizedWeight:
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", codes, scale, None, None)


def quantize_int4(w: Tensor, group_size: int = 64) -> QuantizedWeight:
    w = w.detach().float()
    o, i = w.shape
    if i % group_size:
        raise ValueError(f"group_size = {group_size} does not divide the {i} input channels")
    g = w.reshape(o, i // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(o, i)
    return QuantizedWeight("int4", codes, scale, zero, group_size)


# eta relative to the group's absmax: small eta is a true log grid (heavy tails), large eta tends
# to a uniform one; searched per group (on Gaussian rows 0.4-0.8 wins, on t3-tailed rows 0.1-0.2).
ETA_GRID = (1e-2, 3e-2, 0.1, 0.2, 0.4, 0.8, 1.6)
CLIP_GRID = (1.0, 0.999, 0.99)  # clipping percentiles of each sign half's log magnitude


def _log_half(mag: Tensor, mask: Tensor, eta: Tensor, levels: int, pct: float) -> tuple[Tensor, Tensor]:
    """One sign half of every row: codes [O, I] (valid where mask) and the level table [O, levels]."""
    big = torch.finfo(mag.dtype).max
    logs = torch.log2(mag + eta)
    lo = torch.where(mask, logs, torch.full_like(logs, big)).amin(1, keepdim=True)
    masked = torch.where(mask, logs, torch.full_like(logs, -big))
    if pct < 1.0:
        # Percentile of the half's own values: the k-th largest, k from the half's count.
        counts = mask.sum(1, keepdim=True).clamp_min(1)
        k = ((1 - pct) * counts.float()).floor().long().clamp_max(counts - 1)
        ordered = masked.sort(1, descending=True).values
        hi = ordered.gather(1, k)
    else:
        hi = masked.amax(1, keepdim=True)
    empty = ~mask.any(1, keepdim=True)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), torch.maximum(hi, lo))
    step = ((hi - lo) / max(levels - 1, 1)).clamp_min(1e-12)
    table = (2.0 ** (lo + step * torch.arange(levels, dtype=mag.dtype)) - eta).clamp_min(0)
    # Each weight takes its nearest level in the linear domain: rounding in the log domain sends
    # every value past a cell's geometric midpoint up, a magnitude bias that adds up over a row
    # and, on dit-digits, along the sampling trajectory.
    clipped = torch.minimum(mag, table[:, -1:])
    q = (clipped[..., None] - table[:, None, :]).abs().argmin(-1)
    return q, table


def quantize_tlq(w: Tensor, bits: int = 4, group_size: int | None = None,
                 importance: Tensor | None = None) -> QuantizedWeight:
    """Twin-log quantization per group of `group_size` input channels (default: whole rows), eta
    and the two clipping percentiles searched per group for the least squared error, weighted
    per input channel by `importance` [I] when given (the calibration activations' mean square:
    the layer's output error rather than the weight's)."""
    w = w.detach().float()
    rows, cols = w.shape
    g = group_size or cols
    if cols % g:
        raise ValueError(f"group_size = {g} does not divide the {cols} input channels")
    weight = (importance.float().clamp_min(1e-12) / importance.float().mean().clamp_min(1e-12)).expand(rows, cols).reshape(-1, g) \
        if importance is not None else torch.ones(rows * cols // g, g)
    w = w.reshape(-1, g)
    o, i = w.shape
    levels = 2 ** (bits - 1)
    pos = w >= 0
    mag = w.abs()
    absmax = mag.amax(1, keepdim=True).clamp_min(1e-12)
    best_err = torch.full((o,), float("inf"))
    best_codes = torch.zeros(o, i, dtype=torch.long)
    best_table = torch.zeros(o, 2 * levels)
    for eta_rel in ETA_GRID:
        eta = absmax * eta_rel
        halves = {}
        for sign, mask in (("+", pos), ("-", ~pos)):
            for pct in CLIP_GRID:
                q, table = _log_half(mag, mask, eta, levels, pct)
                rec = table.gather(1, q)
                err = torch.where(mask, weight * (rec - mag) ** 2, torch.zeros_like(mag)).sum(1)
                cur = halves.get(sign)
                if cur is None:
                    halves[sign] = [err, q, table]
                    continue
                better = err < cur[0]  # each half keeps its own best percentile
                cur[0] = torch.where(better, err, cur[0])
                cur[1] = torch.where(better[:, None], q, cur[1])
                cur[2] = torch.where(better[:, None], table, cur[2])
        err = halves["+"][0] + halves["-"][0]
        # codes: 0..levels-1 positive levels, levels..2*levels-1 the negative ones.
        codes = torch.where(pos, halves["+"][1], levels + halves["-"][1])
        table = torch.cat([halves["+"][2], -halves["-"][2]], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes = torch.where(better[:, None], codes, best_codes)
        best_table = torch.where(better[:, None], table, best_table)
    return QuantizedWeight(f"tlq{bits}", best_codes.to(torch.uint8).reshape(rows, cols), best_table, None, g)


def quantize_weight(w: Tensor, fmt: str, group_size: int = 64, importance: Tensor | None = None) -> QuantizedWeight:
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w, group_size)
    if fmt in ("tlq4", "tlq3"):
        return quantize_tlq(w, int(fmt[-1]), group_size, importance)
    raise ValueError(f"weight format {fmt!r}: one of {', '.join(WEIGHT_FORMATS[1:])}")


def _per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-token (last dimension) codes as floats, and their scales."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax), scale


def static_codes(x: Tensor, scale: Tensor) -> Tensor:
    """int8 codes (as floats) of x at a static per-tensor scale: round half to even, saturating to
    [-128, 127] as ONNX QuantizeLinear and TensorRT do (values past the calibrated range clip)."""
    return torch.round(x / scale.to(x.dtype)).clamp(-128, 127)


def fake_quant_activation(x: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize per token (last dimension), symmetric, dynamic."""
    q, scale = _per_token(x, bits)
    return q * scale


def dequantize_codes(fmt: str, codes: Tensor, scale: Tensor | None, zero: Tensor | None, group_size: int) -> Tensor:
    """The float weight [O, I] that `fmt`'s codes and scales decode to (`QuantizedWeight.dequantize`);
    "none": `codes` is the float weight itself."""
    if fmt == "none":
        return codes.float()
    return QuantizedWeight(fmt, codes, scale, zero.float() if zero is not None else None, group_size or None).dequantize()


def rotation_block(n: int) -> int:
    """The Hadamard block for width n: n itself when a power of two, else the largest power of
    two dividing n; ValueError when that is under 16."""
    b = n & -n
    if b < 16:
        raise ValueError(f"width {n} has no power-of-two factor of 16 or more for a Hadamard rotation; "
                         "use rotation = 'none' or 'smoothquant' for this model")
    return b


def hadamard(n: int) -> Tensor:
    """An orthogonal [n, n] Hadamard rotation (block-diagonal when n is not a power of two)."""
    b = rotation_block(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / b ** 0.5
    return torch.block_diag(*([h] * (n // b))).float() if n != b else h.float()


def _w8a8(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, accumulate, dtype: torch.dtype,
          act_scale: Tensor | None = None) -> Tensor:
    """The W8A8 linear with `accumulate(q, codes)` doing the integer product, rescaled in `dtype`:
    one formula for the op (int32), its exact reference (int64) and its export (float).
    `act_scale`: a static per-tensor activation scale (`static_codes`) instead of per token."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    q, sx = _per_token(x2, 8) if act_scale is None else (static_codes(x2, act_scale), act_scale.float().reshape(1, 1))
    y = accumulate(q, codes).to(dtype) * sx.to(dtype) * scale[None, :].to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*shape[:-1], codes.shape[0])


def int8_accumulate(q: Tensor, codes: Tensor) -> Tensor:
    """q [M, I] int8 times codes [O, I] int8 transposed, accumulated in int32 (torch._int_mm)."""
    return torch._int_mm(q.contiguous(), codes.t())


@torch.library.custom_op("ditopt::int8_linear", mutates_args=())
def int8_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                act_scale: Tensor | None = None) -> Tensor:
    """W8A8 linear: x [..., I] float, codes [O, I] int8 (per-channel weight scale [O]): the
    activation is quantized per token, multiplied in int8 -> int32, rescaled to x's dtype."""
    return _w8a8(x, codes, scale, bias, lambda q, c: int8_accumulate(q.to(torch.int8), c), torch.float32,
                 act_scale).to(x.dtype)


@int8_linear.register_fake
def _int8_linear_fake(x, codes, scale, bias=None, act_scale=None):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@register_flop_formula(torch.ops.ditopt.int8_linear)
def _int8_linear_flops(x_shape, codes_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * codes_shape[0] * codes_shape[1]


def int8_linear_reference(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                          act_scale: Tensor | None = None) -> Tensor:
    """The same arithmetic in int64 (exact accumulation), for tests."""
    return _w8a8(x, codes, scale, bias, lambda q, c: q.long() @ c.long().t(), torch.float64, act_scale).float()




@torch.library.custom_op("ditopt::qdq_linear", mutates_args=())
def qdq_linear(x: Tensor, codes: Tensor, scale: Tensor | None, zero: Tensor | None, bias: Tensor | None, fmt: str,
               group_size: int, act_bits: int, act_scale: Tensor | None = None) -> Tensor:
    """The fake-quant (Q/DQ) linear: the weight decoded from its codes (`dequantize_codes`: int8
    per row, int4 per group with zero points, TLQ through its table, "none" a float weight), the
    activation quantized-dequantized per token at `act_bits` (0: float), or at the static int8
    scale `act_scale`, then a float GEMM."""
    w = dequantize_codes(fmt, codes, scale, zero, group_size).to(x.dtype)
    if act_scale is not None:
        x = static_codes(x, act_scale) * act_scale.to(x.dtype)
    elif act_bits:
        x = fake_quant_activation(x, act_bits)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)


@qdq_linear.register_fake
def _qdq_linear_fake(x, codes, scale, zero, bias, fmt, group_size, act_bits, act_scale=None):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@register_flop_formula(torch.ops.ditopt.qdq_linear)
def _qdq_linear_flops(x_shape, codes_shape, *args, out_shape=None, **kwargs) -> int:
    return _int8_linear_flops(x_shape, codes_shape)


from ditopt.kernels import quant_onnx  # noqa: E402,F401  (registers the ops' ONNX translations)
