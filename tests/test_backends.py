"""Backends (issue 33): the inductor runtime at parity with its compile cache, custom ops the
compiler traces through, artifact engines refused by optimize(), and the TensorRT-facing checks
(structural on CPU; the engine build only where tensorrt is importable)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import ditopt
from ditopt.backends import BackendError
from ditopt.errors import MissingExtraError, ProfileWarning
from ditopt.export.tensorrt import check_artifact_for_tensorrt, check_onnx_for_tensorrt, require_tensorrt
from dit_reference import PlainDiT, plain_dit_inputs
from conftest import arch_sampler


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return PlainDiT(depth=2, hidden=32).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_inductor_matches_eager_and_compiles_each_shape_once():
    model = _tiny()
    kw = plain_dit_inputs(batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ditopt.optimize(model, "identity", example_inputs=kw, backend="inductor")
    report = opt.report.to_dict()["backend"]
    segments = len(opt.programs[0].segments)
    # optimize compiled the example shape's segments and compared the call with the eager graph
    assert report["name"] == "inductor" and report["compiled_segments"] == segments == report["compiles"]
    assert report["compile_s"] > 0 and report["eager_fallbacks"] == []
    assert report["rel_err_vs_eager"] <= 1e-4
    with torch.no_grad():
        assert _rel(opt(**kw), model(**kw)) <= 1e-4
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for t in (900.0, 500.0):  # later calls at the same shape: no compile at all
            opt(**{**kw, "t": torch.full((2,), t)})
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        assert opt.report.to_dict()["backend"]["compiles"] == segments
        # a new batch size is a new program: its segments compile once, then are reused
        small = plain_dit_inputs(batch=1, seed=3)
        assert _rel(opt(**small), model(**small)) <= 1e-4
        opt(**small)
    after = opt.report.to_dict()["backend"]
    assert after["compiles"] == 2 * segments
    assert sorted({e["program"] for e in after["segments"]}) == ["program0", "program1"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    # weights loaded into the optimized module are what its compiled segments run (not frozen)
    changed = {k: v * 1.5 if v.is_floating_point() else v for k, v in opt.state_dict().items()}
    opt.load_state_dict(changed)
    other = _tiny()
    other.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in other.state_dict().items()})
    with torch.no_grad():
        assert _rel(opt(**kw), other(**kw)) <= 1e-4 and _rel(opt(**kw), model(**kw)) > 1e-2


def test_frozen_weights_match_and_refuse_a_weight_load():
    model = _tiny()
    kw = plain_dit_inputs(batch=1)
    opt = ditopt.optimize(model, "identity", example_inputs=kw, backend="inductor", compile_options={"freezing": True})
    assert opt.report.to_dict()["backend"]["options"] == {"freezing": True}
    with torch.no_grad():
        assert _rel(opt(**kw), model(**kw)) <= 1e-4
    with pytest.raises(ditopt.DitoptError, match="freezing.*optimize it again"):
        opt.load_state_dict(opt.state_dict())


def test_inductor_runs_the_host_cache_schedule_unchanged():
    model = _tiny()
    kw = plain_dit_inputs(batch=2)
    profile = {"name": "rc", "budget": {"max_rel_err": 1.0}, "passes": [{"name": "residual_cache", "interval": 2, "warmup": 1}]}
    eager = ditopt.optimize(model, profile, example_inputs=kw, num_steps=4)
    compiled = ditopt.optimize(model, profile, example_inputs=kw, num_steps=4, backend="inductor")
    sample = arch_sampler(kw, steps=4, samples=2)
    records = {}
    with torch.no_grad():
        outs = {}
        for name, m in (("eager", eager), ("inductor", compiled)):
            m.reset()
            seen = []
            outs[name] = sample(_Recording(m, seen))
            records[name] = seen
    assert _rel(outs["inductor"], outs["eager"]) <= 1e-4
    assert records["inductor"] == records["eager"]  # same computed blocks on every step
    assert any(len(r) < len(records["eager"][0]) for r in records["eager"][1:])  # some steps reused the cache


class _Recording:
    def __init__(self, model, seen):
        self.model, self.seen = model, seen

    def __call__(self, **kw):
        out = self.model(**kw)
        self.seen.append(tuple(self.model.last_record.get("computed", [])))
        return out


def test_custom_ops_compile_without_graph_breaks():
    """Every ditopt custom op has a fake implementation: dynamo traces it as one node (no graph
    break) and AOT tracing runs through its fake kernel with fullgraph=True."""
    import ditopt.kernels  # noqa: F401  (registers torch.ops.ditopt.*)
    from ditopt.kernels.quant import quantize_int8

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    w = torch.randn(24, 16, generator=g)
    qw = quantize_int8(w)
    x = torch.randn(3, 5, 16, generator=g)
    calls = {
        "neighborhood_attention": (lambda q, k, v: torch.ops.ditopt.neighborhood_attention(q, k, v, 8, 8, 4, 1), (q, k, v)),
        "block_sparse_attention": (lambda q, k, v: torch.ops.ditopt.block_sparse_attention(q, k, v, 16, 0.5), (q, k, v)),
        "int8_linear": (lambda x: torch.ops.ditopt.int8_linear(x, qw.codes, qw.scale, None), (x,)),
    }
    for name, (fn, args) in calls.items():
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(*args), fn(*args), atol=1e-6), name


def test_optimize_refuses_artifact_engines_and_profiles_build_the_eager_module():
    model = _tiny()
    kw = plain_dit_inputs(batch=1)
    for engine, flag in (("onnxruntime", "onnx"), ("tensorrt", "tensorrt")):
        with pytest.raises(BackendError, match=f"ditopt export .* --engine {flag}"):
            ditopt.optimize(model, "identity", example_inputs=kw, backend=engine)
    with pytest.raises(BackendError, match="one of 'pytorch', 'inductor'"):
        ditopt.optimize(model, "identity", example_inputs=kw, backend="cuda")
    with pytest.raises(BackendError, match="compile_options"):
        ditopt.optimize(model, "identity", example_inputs=kw, compile_options={"freezing": True})
    with pytest.warns(ProfileWarning, match="backend = 'onnxruntime' is not used by optimize"):
        profile = ditopt.load_profile({"name": "p", "backend": "onnxruntime"})
    opt = ditopt.optimize(model, profile, example_inputs=kw)
    assert opt.backend == "pytorch" and opt.report.to_dict()["backend"] == {"name": "pytorch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inductor in a profile is a runtime backend: no warning
        assert ditopt.load_profile({"name": "p", "backend": "inductor"}).backend == "inductor"


# -- TensorRT ------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, initializers=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_tensorrt_structural_check_on_hand_built_graphs():
    x, y = _f32("x", [2, 8]), _f32("y", [2, 8])
    assert check_onnx_for_tensorrt(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y])) == []
    # opset out of the parser's range
    assert any("opset 7" in p for p in check_onnx_for_tensorrt(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=7)))
    # a custom-domain node
    custom = _model([helper.make_node("FusedThing", ["x"], ["y"], domain="com.microsoft")], [x], [y], domains=["com.microsoft"])
    problems = check_onnx_for_tensorrt(custom)
    assert any("com.microsoft::FusedThing" in p for p in problems) and any("custom domains" in p for p in problems)
    # a dynamic dimension: refused without a range, accepted with one, refused with a bad one
    dyn = _model([helper.make_node("Relu", ["x"], ["y"])], [_f32("x", ["batch", 8])], [_f32("y", ["batch", 8])])
    assert any("'batch'" in p and "range" in p for p in check_onnx_for_tensorrt(dyn))
    assert check_onnx_for_tensorrt(dyn, dynamic={"batch": (1, 2, 8)}) == []
    assert any("not 0 < min" in p for p in check_onnx_for_tensorrt(dyn, dynamic={"batch": (4, 2, 8)}))
    # Q/DQ: a symmetric int8 pair passes; Q without DQ, a computed scale or a non-zero zero point do not
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "z")
    shifted = numpy_helper.from_array(np.array(3, dtype=np.int8), "z3")
    pair = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    assert check_onnx_for_tensorrt(_model(pair, [x], [y], [scale, zero])) == []
    lone = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)]
    assert any("DequantizeLinear right after" in p for p in check_onnx_for_tensorrt(_model(lone, [x], [y], [scale, zero])))
    computed = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
                helper.make_node("QuantizeLinear", ["x", "m", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "m", "z"], ["y"])]
    assert any("scale is computed" in p for p in check_onnx_for_tensorrt(_model(computed, [x], [y], [zero])))
    asym = [helper.make_node("QuantizeLinear", ["x", "s", "z3"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z3"], ["y"])]
    assert any("non-zero zero point" in p for p in check_onnx_for_tensorrt(_model(asym, [x], [y], [scale, shifted])))


def test_tensorrt_check_of_pre_quantized_weights():
    """A weight's DequantizeLinear: signed symmetric codes with a constant scale, feeding the
    linear operator (directly or through a Transpose) pass; uint4 codes with zero points (the
    asymmetric int4 format) or a DQ feeding something else do not."""
    x, y = _f32("x", [2, 8]), _f32("y", [2, 4])
    scale = numpy_helper.from_array(np.full(4, 0.1, dtype=np.float32), "ws")
    codes = numpy_helper.from_array(np.arange(32, dtype=np.int8).reshape(4, 8) - 16, "w")
    dq = helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0)
    gemm = _model([dq, helper.make_node("Gemm", ["x", "wd"], ["y"], transB=1)], [x], [y], [codes, scale])
    assert check_onnx_for_tensorrt(gemm) == []
    through = [dq, helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    assert check_onnx_for_tensorrt(_model(through, [x], [y], [codes, scale])) == []
    elsewhere = [dq, helper.make_node("Relu", ["wd"], ["y"])]
    assert any("feeds ['Relu']" in p for p in check_onnx_for_tensorrt(_model(elsewhere, [x], [_f32("y", [4, 8])], [codes, scale])))
    u4 = helper.make_tensor("w4", TensorProto.UINT4, [4, 8], np.arange(32) % 16)
    z4 = helper.make_tensor("z4", TensorProto.UINT4, [4, 2], np.full(8, 8))
    s4 = numpy_helper.from_array(np.full((4, 2), 0.1, dtype=np.float32), "s4")
    blocked = [helper.make_node("DequantizeLinear", ["w4", "s4", "z4"], ["wd"], axis=1, block_size=4),
               helper.make_node("Gemm", ["x", "wd"], ["y"], transB=1)]
    problems = check_onnx_for_tensorrt(_model(blocked, [x], [y], [u4, s4, z4], opset=21))
    assert any("UINT4 codes" in p for p in problems) and any("asymmetric" in p for p in problems)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from ditopt.export import export_artifact

    model = _tiny()
    kw = plain_dit_inputs(batch=1)
    opt = ditopt.optimize(model, "identity", example_inputs=kw)
    return export_artifact(opt, tmp_path_factory.mktemp("art") / "a", example_inputs=kw)


def test_exported_segments_follow_tensorrt_rules(tiny_artifact):
    assert check_artifact_for_tensorrt(tiny_artifact) == {}
    first = next(tiny_artifact.rglob("*.onnx"))
    # the same check, told of an older parser's opset ceiling, names the file and the rule
    version = next(o.version for o in onnx.load(str(first), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
    found = check_artifact_for_tensorrt(tiny_artifact, max_opset=version - 1)
    assert found and all(any(f"opset {version}" in p for p in problems) for problems in found.values())


def _tensorrt_missing() -> str | None:
    try:
        require_tensorrt()
    except MissingExtraError as exc:
        return str(exc)
    return None


def test_export_engine_tensorrt_where_it_is_missing_exits_2_writing_nothing(tmp_path):
    missing = _tensorrt_missing()
    if missing is None:
        pytest.skip("tensorrt and a CUDA device are present here: nothing is missing")
    assert 'pip install "ditopt[tensorrt]"' in missing or "CUDA device" in missing
    from ditopt.cli import app

    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["export", "tiny-dit", str(out), "--engine", "tensorrt"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and ("tensorrt" in lines[0] or "CUDA" in lines[0]) and "Traceback" not in result.output
    assert not out.exists()
    assert CliRunner().invoke(app, ["export", "tiny-dit", str(out), "--engine", "onnx2"]).exit_code == 2 and not out.exists()


def test_tensorrt_engines_build_from_the_artifact(tiny_artifact, tmp_path):
    missing = _tensorrt_missing()
    if missing is not None:
        pytest.skip(f"engine build not run: {missing}")
    import json

    from ditopt.export.tensorrt import build_engines

    out = build_engines(tiny_artifact, tmp_path / "engines", precision="fp16")
    index = json.loads((out / "engines.json").read_text())
    assert index["engines"] and all((out / e["file"]).stat().st_size > 0 for e in index["engines"].values())
    assert (out / "timing.cache").stat().st_size > 0
