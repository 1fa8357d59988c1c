"""ONNX forms of the quantized linears (`ditopt::int8_linear`, `ditopt::qdq_linear`): explicit
quantization as TensorRT and onnxruntime read it, not floats simulating it.

Each call becomes, on the activation flattened to [M, I]::

    x2 --Abs-ReduceMax-Max(1e-8)-Div(qmax)--> s [M]          (per token, dynamic)
    x2 --QuantizeLinear(s, axis 0)--> int8 --DequantizeLinear(s, axis 0)--> x_dq
    codes (int8 / uint4 initializer) --DequantizeLinear(scale[, zero], axis / block)--> W [O, I]
    Gemm(x_dq, W, bias, transB=1) --Reshape--> [..., O]

* int8 weights: int8 codes, per-output-channel scales (DequantizeLinear axis 0), any opset >= 18.
* int4 weights: uint4 codes and zero points with blocked scales (DequantizeLinear axis 1,
  block_size = group_size), which need opset 21; below it `min_opset` makes the export refuse.
* TLQ weights: uint8 codes and the per-group table they index (GatherElements): a lookup, not a
  linear grid, so no DequantizeLinear.
* activations: a scale per token is computed in the graph (ONNX allows a non-constant scale;
  per-axis QuantizeLinear along the token axis). A4 uses the same int8 lanes with scale
  absmax / 7, so its codes stay in [-7, 7]: the 4-bit grid, identical to the PyTorch path at every
  opset. TensorRT's explicit quantization takes constant scales only, so
  `export.tensorrt.check_onnx_for_tensorrt` names these dynamic ones; with
  `activation_scales = "static"` the pass calibrates one int8 scale per layer, exported as a
  per-tensor QuantizeLinear / DequantizeLinear with a constant scale and zero point 0.

The arithmetic is the PyTorch ops' own (round half to even, the same divisions), so onnxruntime
reproduces the activation codes exactly and differs only in the float GEMM's accumulation order.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ditopt.registry import register_onnx_translation

INT4_OPSET = 21  # DequantizeLinear on int4 / uint4 with blocked scales (block_size)


def _opset(version: int) -> Any:
    from onnxscript import values

    return values.Opset("", version)


def _int8_zero(op: Any, like: Any) -> Any:
    from onnx import TensorProto, helper

    return op.ConstantOfShape(op.Shape(like), value=helper.make_tensor("zero", TensorProto.INT8, [1], [0]))


def _activation_qdq(op: Any, opset: int, x2: Any, bits: int) -> Any:
    """Per-token symmetric Q/DQ of x2 [M, I] at `bits`, its scale computed in the graph."""
    from onnx import TensorProto

    qmax = float(2 ** (bits - 1) - 1)
    amax = op.ReduceMax(op.Abs(x2), op.Constant(value_ints=[1]), keepdims=0)
    scale = op.Div(op.Max(amax, op.CastLike(op.Constant(value_float=1e-8), amax)),
                   op.CastLike(op.Constant(value_float=qmax), amax))
    if opset >= INT4_OPSET:
        q = op.QuantizeLinear(x2, scale, axis=0, output_dtype=TensorProto.INT8)
    else:  # the zero point picks the int8 output type; per axis it has the scale's shape
        q = op.QuantizeLinear(x2, scale, _int8_zero(op, scale), axis=0)
    return op.DequantizeLinear(q, scale, axis=0)


def _static_qdq(op: Any, x2: Any, scale: Any) -> Any:
    """Per-tensor int8 Q/DQ at a constant (calibrated, 0-d) scale, zero point 0: TensorRT's form."""
    from onnx import TensorProto, helper

    zero = op.Constant(value=helper.make_tensor("zero", TensorProto.INT8, [], [0]))
    return op.DequantizeLinear(op.QuantizeLinear(x2, scale, zero), scale, zero)


def _weight(op: Any, opset: int, fmt: str, codes: Any, scale: Any, zero: Any, group_size: int) -> Any:
    from onnx import TensorProto

    if fmt == "int8":
        return op.DequantizeLinear(codes, scale, axis=0)
    if fmt == "int4":
        if opset < INT4_OPSET:
            raise ValueError(f"int4 weights need opset {INT4_OPSET}, not {opset}")
        # The Casts of the uint8 initializers are folded into uint4 ones after export (two codes a byte).
        return op.DequantizeLinear(op.Cast(codes, to=TensorProto.UINT4), scale, op.Cast(zero, to=TensorProto.UINT4),
                                   axis=1, block_size=group_size)
    if fmt in ("tlq4", "tlq3"):
        index = op.Cast(op.Reshape(codes, op.Constant(value_ints=[-1, group_size])), to=TensorProto.INT64)
        return op.Reshape(op.GatherElements(scale, index, axis=1), op.Shape(codes))
    if fmt == "none":
        return codes
    raise ValueError(f"weight format {fmt!r} has no ONNX form")


def _linear(op: Any, x: Any, w: Any, bias: Any, x2: Any, out_features: Any) -> Any:
    if getattr(w, "dtype", None) is not None and getattr(x, "dtype", None) is not None and w.dtype != x.dtype:
        w = op.CastLike(w, x)
    y = op.Gemm(x2, w, bias, transB=1) if bias is not None else op.Gemm(x2, w, transB=1)
    lead = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
    return op.Reshape(y, op.Concat(lead, out_features, axis=0))


def _flat(op: Any, x: Any, codes: Any) -> tuple[Any, Any]:
    """x as [M, I], and [O] (the output width) from the codes' shape."""
    x2 = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(codes, start=1, end=2), axis=0))
    return x2, op.Shape(codes, start=0, end=1)


def translate_int8_linear(opset: int) -> Callable:
    op = _opset(opset)

    def int8_linear(x, codes, scale, bias=None, act_scale=None):
        x2, out = _flat(op, x, codes)
        x2 = _activation_qdq(op, opset, x2, 8) if act_scale is None else _static_qdq(op, x2, act_scale)
        return _linear(op, x, _weight(op, opset, "int8", codes, scale, None, 0), bias, x2, out)

    return int8_linear


def translate_qdq_linear(opset: int) -> Callable:
    op = _opset(opset)

    def qdq_linear(x, codes, scale, zero, bias, fmt, group_size, act_bits, act_scale=None):
        x2, out = _flat(op, x, codes)
        if act_scale is not None:
            x2 = _static_qdq(op, x2, act_scale)
        elif act_bits:
            x2 = _activation_qdq(op, opset, x2, act_bits)
        return _linear(op, x, _weight(op, opset, fmt, codes, scale, zero, group_size), bias, x2, out)

    return qdq_linear


def _qdq_linear_min_opset(x, codes, scale, zero, bias, fmt, group_size, act_bits, act_scale=None) -> int | None:
    return INT4_OPSET if fmt == "int4" else None


register_onnx_translation(torch.ops.ditopt.int8_linear.default, translate_int8_linear)
register_onnx_translation(torch.ops.ditopt.qdq_linear.default, translate_qdq_linear, _qdq_linear_min_opset)
