"""Quantization (issue 31): the formats against references, rotations, the integer GEMM, the
pass's graph before and after, ARS's choice, the budget search keeping a planted sensitive layer,
export parity, must-not-fire, bad input and the user's model."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import arch_sampler, build_model, make_inputs

import ditopt
from ditopt.errors import ArtifactError, CalibrationError, InvalidProfileError
from ditopt.export import export_artifact, load_artifact, read_manifest
from ditopt.kernels import quant as Q


# -- formats ------------------------------------------------------------------------------------
def _tlq_brute_force(row: torch.Tensor, bits: int) -> float:
    """The least squared error over the same grid, element by element, in float64."""
    levels = 2 ** (bits - 1)
    absmax = float(row.abs().max())
    best = float("inf")
    for eta_rel in Q.ETA_GRID:
        eta = absmax * eta_rel
        total = 0.0
        for positive in (True, False):
            vals = [abs(float(v)) for v in row if (v >= 0) == positive]
            if not vals:
                continue
            logs = sorted((torch.tensor(vals, dtype=torch.float64) + eta).log2().tolist(), reverse=True)
            half_best = float("inf")
            for pct in Q.CLIP_GRID:
                k = min(int((1 - pct) * len(logs)), len(logs) - 1)
                hi, lo = logs[k], logs[-1]
                step = max((hi - lo) / (levels - 1), 1e-12)
                table = [max(2 ** (lo + step * level) - eta, 0.0) for level in range(levels)]
                err = 0.0
                for v in vals:  # the nearest level in the linear domain (values above the top one clip to it)
                    rec = min(table, key=lambda t: abs(t - min(v, table[-1])))
                    err += (rec - v) ** 2
                half_best = min(half_best, err)
            total += half_best
        best = min(best, total)
    return best


@pytest.mark.parametrize("bits", [3, 4])
def test_tlq_matches_a_brute_force_search(bits):
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((3, 24)) * 0.1
    q = Q.quantize_tlq(w, bits)
    got = (q.dequantize() - w).pow(2).sum(1)
    assert q.codes.max() < 2 ** bits
    for r in range(3):
        assert got[r].item() == pytest.approx(_tlq_brute_force(w[r], bits), rel=1e-3, abs=1e-9)


def test_weight_formats_reconstruct_and_count_bytes():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    errs = {}
    for fmt in ("int8", "int4", "tlq4", "tlq3"):
        q = Q.quantize_weight(w, fmt, 32)
        errs[fmt] = float((q.dequantize() - w).pow(2).sum() / w.pow(2).sum())
        codes = 64 * 128 * Q.WEIGHT_BITS[fmt] // 8
        params = {"int8": 64, "int4": 2 * 64 * 4, "tlq4": 6 * 64 * 4, "tlq3": 6 * 64 * 4}[fmt]
        assert q.storage_bytes() == codes + 2 * params
    assert errs["int8"] < 1e-4 < errs["int4"] and errs["tlq4"] < errs["tlq3"]
    # Codes decode exactly to what the fake-quant path multiplies by.
    q = Q.quantize_int8(w)
    assert torch.equal(q.dequantize(), q.codes.float() * q.scale[:, None])
    # Heavy tails: TLQ beats the uniform grid at the same group size.
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(2.0).sample((64, 128)) * 0.05
    e_tlq = (Q.quantize_weight(heavy, "tlq4", 32).dequantize() - heavy).pow(2).sum()
    e_int4 = (Q.quantize_weight(heavy, "int4", 32).dequantize() - heavy).pow(2).sum()
    assert e_tlq < e_int4


def test_tlq_weighted_by_activation_energy_lowers_the_output_error():
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 0.05
    importance = torch.ones(64)
    importance[:4] = 100.0  # four input channels carry most of the activation energy
    plain = Q.quantize_tlq(w, 4, 16).dequantize()
    weighted = Q.quantize_tlq(w, 4, 16, importance).dequantize()
    cost = lambda d: float(((d - w) ** 2 * importance).sum())  # noqa: E731
    assert cost(weighted) < cost(plain)


@pytest.mark.parametrize("width", [64, 96, 1152])
def test_rotation_is_orthogonal_and_preserves_the_product(width):
    h = Q.hadamard(width)
    torch.testing.assert_close(h @ h.T, torch.eye(width), atol=1e-5, rtol=0)
    x, w = torch.randn(5, width), torch.randn(7, width)
    torch.testing.assert_close((x @ h) @ (w @ h).T, x @ w.T, atol=1e-4, rtol=1e-5)


def test_rotation_refuses_widths_without_a_power_of_two_block():
    with pytest.raises(ValueError, match="power-of-two"):
        Q.hadamard(40)


def test_integer_gemm_is_exact_and_the_linear_matches_its_reference():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (33, 64), dtype=torch.int8, generator=gen)
    codes = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=gen)
    assert torch.equal(Q.int8_accumulate(q, codes).long(), q.long() @ codes.long().T)
    x, w, b = torch.randn(2, 9, 64, generator=gen), torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    qw = Q.quantize_int8(w)
    y = torch.ops.ditopt.int8_linear(x, qw.codes, qw.scale, b)
    torch.testing.assert_close(y, Q.int8_linear_reference(x, qw.codes, qw.scale, b), atol=1e-5, rtol=1e-5)
    # ... and the Q/DQ (fake quant) path computes the same product.
    fake = torch.nn.functional.linear(Q.fake_quant_activation(x, 8), qw.dequantize(), b)
    torch.testing.assert_close(y, fake, atol=1e-4, rtol=1e-4)


# -- the pass ----------------------------------------------------------------------------------
def _profile(budget=None, **cfg):
    return {"name": "q", "budget": budget or {"max_rel_err": 1.0}, "passes": [{"name": "quantize", **cfg}]}


def _record(opt):
    return next(r for r in opt.report.passes if r.name == "quantize")


def _plain():
    model = build_model("plain")
    return model, make_inputs("plain", model, batch=2)


def test_w8a8_rewrites_the_block_linears_and_stays_close():
    model, kw = _plain()
    before = copy.deepcopy(model.state_dict())
    opt = ditopt.optimize(model, _profile(weights="int8", activations="int8", rotation="none"), example_inputs=kw)
    rep = _record(opt).report
    original = ditopt.capture(model, kw)
    int8 = torch.ops.ditopt.int8_linear.default
    for seg, orig in zip(opt.programs[0].block_segments, original.block_segments):
        targets = [n.target for n in seg.module.graph.nodes if n.op == "call_function"]
        assert targets.count(int8) == 4  # qkv, proj, mlp in, mlp out
        assert targets.count(torch.ops.aten.linear.default) == 1  # the adaLN modulation stays float
        assert int8 not in [n.target for n in orig.module.graph.nodes]
    assert rep["execution"] == {"int8_gemm": 12, "fake_quant": 0}
    assert 3.8 < rep["weight_compression"] < 4.0
    assert all(f == "int8/int8/none" for f in rep["formats"].values())
    with torch.no_grad():
        a, b = opt(**kw), model(**kw)
    assert float((a - b).norm() / b.norm()) < 0.02
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ars_picks_the_outlier_rotation_for_a_planted_salient_channel():
    model, kw = _plain()
    planted = copy.deepcopy(model)  # block 1's FFN input gets one channel 40x the others

    def hook(_m, args):
        x = args[0].clone()
        x[..., 3] *= 40.0
        return (x,)

    planted.blocks[1].mlp[0].register_forward_pre_hook(hook)
    opt = ditopt.optimize(planted, _profile(weights="int8", activations="int8", rotation="ars"), example_inputs=kw,
                          calibration=arch_sampler(kw))
    rep = _record(opt).report
    stats = rep["activation_stats"]
    assert stats["blocks.1.mlp.0"]["outlier_ratio"] > 20
    assert rep["formats"]["blocks.1.mlp.0"].endswith("/outlier")
    assert rep["formats"]["blocks.0.mlp.0"].endswith("/hadamard")


def test_budget_search_keeps_a_planted_sensitive_layer_high():
    model, kw = _plain()
    with torch.no_grad():
        w = model.blocks[1].attn.proj.weight
        w[:, ::8] *= 30.0  # a few huge input columns per group: int4 groups lose the rest
        model.blocks[1].attn.proj.weight.copy_(w)
    profile = _profile(budget={"min_psnr_db": 45.0}, low="int4/int8", rotation="none", group_size=16)
    opt = ditopt.optimize(model, profile, example_inputs=kw, calibration=arch_sampler(kw, samples=8),
                          max_retries=0, on_gate_miss="return")
    rep = _record(opt).report
    sens = rep["sensitivity"]
    assert max(sens, key=lambda n: sens[n]["int4/int8"]) == "blocks.1.attn.proj"
    formats = rep["formats"]
    assert formats["blocks.1.attn.proj"] in ("int8/int8/none", "float")
    assert sum(f.startswith("int4") for f in formats.values()) >= 1
    assert rep["predicted_psnr_db"] >= rep["target_psnr_db"]
    # The report's resolved profile replays the choice without a search.
    entry = next(p for p in opt.report.resolved_profile().passes if p.name == "quantize")
    assert not entry.config.searched()
    assert {n: f for n, f in entry.config.layers.items()} == {n: f for n, f in formats.items() if f != "float"}


def test_nothing_to_quantize_does_not_fire():
    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(weights="int8", activations="int8", rotation="none", keep=["blocks.*"]),
                          example_inputs=kw)
    record = _record(opt)
    assert not record.modified and "all kept" in record.report["skipped"]
    assert [s.module.code for s in opt.programs[0].segments] == [s.module.code for s in ditopt.capture(model, kw).segments]


@pytest.mark.parametrize("cfg, error, match", [
    ({"weights": "int4", "group_size": 24, "rotation": "none"}, InvalidProfileError, "group_size = 24"),
    ({"weights": "int8", "rotation": "smoothquant"}, CalibrationError, "calibration"),
    ({"layers": {"blocks.9.mlp.0": "int8/int8"}}, InvalidProfileError, "blocks.9.mlp.0"),
])
def test_bad_input_is_a_named_error(cfg, error, match):
    model, kw = _plain()
    with pytest.raises(error, match=match):
        ditopt.optimize(model, _profile(**cfg), example_inputs=kw)


@pytest.mark.parametrize("cfg, match", [
    ({"weights": "int5"}, "weights"),
    ({"low": "int4"}, "weights/activations"),
    ({"layers": {"a": "int4/int6"}}, "activations"),
])
def test_bad_configs_fail_at_profile_load(cfg, match):
    with pytest.raises(InvalidProfileError, match=match):
        ditopt.load_profile(_profile(**cfg))


def test_rotation_on_a_width_it_cannot_rotate_is_refused():
    model = build_model("dit")  # width 32: rotates; a 40-wide toy would not
    kw = make_inputs("dit", model, batch=2)
    opt = ditopt.optimize(model, _profile(weights="int8", activations="int8", rotation="hadamard"), example_inputs=kw)
    assert _record(opt).modified
    with pytest.raises(ValueError, match="power-of-two"):
        Q.rotation_block(40)


def _onnx_block(artifact, block=0):
    import onnx

    model = onnx.load(str(artifact / "segments" / f"block.{block}.onnx"), load_external_data=False)
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return model, {t.name: t for t in model.graph.initializer}, users


# (config, the weights' ONNX element type, opset the export picks)
EXPORTS = [
    ({"weights": "int8", "activations": "int8", "rotation": "none"}, "INT8", 20),
    ({"weights": "int8", "activations": "none", "rotation": "none"}, "INT8", 20),
    ({"weights": "int4", "activations": "int8", "rotation": "hadamard", "group_size": 16}, "UINT4", 21),
    ({"weights": "tlq4", "activations": "int4", "rotation": "hadamard", "group_size": 16}, "UINT8", 20),
]


@pytest.mark.parametrize("cfg, codes, opset", EXPORTS)
def test_export_writes_codes_and_qdq_and_matches_the_pytorch_path(tmp_path, cfg, codes, opset):
    """The artifact holds each quantized layer's codes (int8 / uint4 / TLQ's uint8 codes), decoded
    by DequantizeLinear (TLQ: a table lookup) into a Gemm, with the activation quantized and
    dequantized per token in front of it; onnxruntime reproduces the PyTorch path to float
    rounding of the GEMM (observed max abs error under 1e-6 on outputs of size ~1.7)."""
    import onnx

    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(**cfg), example_inputs=kw)
    with torch.no_grad():
        want = opt(**kw)
    out = export_artifact(opt, tmp_path / "artifact")
    torch.testing.assert_close(load_artifact(out)(**kw), want, rtol=1e-5, atol=1e-5)
    manifest = read_manifest(out)
    assert {s["opset"] for s in manifest["segments"] if s.get("file")} == {opset}
    assert manifest["size_bytes"] == sum(f["size"] for f in manifest["files"].values())
    onnx_model, inits, users = _onnx_block(out)
    kind = getattr(onnx.TensorProto, codes)
    # The four quantized linears of the block: codes of the layer's shape, read by a DQ or a lookup
    # feeding the Gemm; no float copy of those weights.
    coded = [t for t in inits.values() if t.data_type == kind and len(t.dims) == 2 and users[t.name][0].input[0] == t.name]
    shapes = {tuple(t.dims) for t in coded}
    assert shapes == {(96, 32), (32, 32), (128, 32), (32, 128)}
    assert manifest["initializer_bytes"][codes.lower()] > 0
    decode = "GatherElements" if cfg["weights"].startswith("tlq") else "DequantizeLinear"
    fed = set()
    for t in coded:
        chain, value = [], t.name
        while not chain or chain[-1].op_type != "Gemm":
            (node,) = users[value]  # one reader per step, up to the Gemm
            chain.append(node)
            value = node.output[0]
        assert decode in [n.op_type for n in chain] and len(chain) <= (2 if decode == "DequantizeLinear" else 5)
        assert chain[-1].input[1] == chain[-2].output[0]  # the weight operand (transB)
        fed.add(chain[-1].name)
    assert len(fed) == 4
    float_weights = [t for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in
                     {(96, 32), (128, 32), (32, 128)}]
    assert not float_weights
    qs = [n for n in onnx_model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == (4 if cfg["activations"] != "none" else 0)
    for q in qs:  # Q -> DQ -> Gemm (the activation operand)
        (dq,) = users[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and [u.op_type for u in users[dq.output[0]]] == ["Gemm"]
        assert users[dq.output[0]][0].input[0] == dq.output[0]


def test_the_quantized_artifact_is_smaller_than_the_float_one(tmp_path):
    """At width 128 the blocks' weights dominate the files (at the toy's width 32 the graph's
    own bytes do: the Q/DQ nodes and their metadata outweigh the weights saved)."""
    from dit_reference import PlainDiT

    torch.manual_seed(0)
    model = PlainDiT(hidden=128, depth=2, heads=2).eval()
    kw = make_inputs("plain", model, batch=2)
    float_art = export_artifact(ditopt.optimize(model, "identity", example_inputs=kw), tmp_path / "float")
    opt = ditopt.optimize(model, _profile(weights="int8", activations="int8", rotation="none"), example_inputs=kw)
    w8 = export_artifact(opt, tmp_path / "w8a8")
    fb, qb = read_manifest(float_art), read_manifest(w8)
    # The blocks' four linears per block moved from float to int8 codes (plus a float scale per row).
    block_weights = 2 * (384 * 128 + 128 * 128 + 512 * 128 + 128 * 512)
    assert qb["initializer_bytes"]["int8"] == block_weights
    saved = fb["initializer_bytes"]["float"] - qb["initializer_bytes"]["float"]
    assert abs(saved - (4 * block_weights - 4 * 2 * (384 + 128 + 512 + 128))) <= 64  # a few scalar constants (1e-8, 127)
    assert qb["size_bytes"] < 0.7 * fb["size_bytes"]  # measured 1.84 MB against 2.90 MB (embedders, adaLN stay float)


def test_int4_weights_at_an_opset_without_int4_are_a_named_error(tmp_path):
    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(weights="int4", activations="none", rotation="none", group_size=16), example_inputs=kw)
    with pytest.raises(ArtifactError, match=r"opset = 20 cannot express .*qdq_linear.*int4.*opset 21"):
        export_artifact(opt, tmp_path / "a", opset=20)
    assert not (tmp_path / "a").exists()


def test_static_activation_scales_export_what_tensorrt_takes(tmp_path):
    """Dynamic per-token scales are computed in the graph: onnxruntime runs them, TensorRT's
    structural check names them. Static scales (calibrated per layer) are constants: the check
    passes, and the artifact still matches the PyTorch path."""
    from ditopt.export.tensorrt import check_artifact_for_tensorrt

    model, kw = _plain()
    dynamic = export_artifact(ditopt.optimize(model, _profile(weights="int8", activations="int8", rotation="none"),
                                              example_inputs=kw), tmp_path / "dynamic")
    problems = [p for ps in check_artifact_for_tensorrt(dynamic).values() for p in ps]
    assert problems and all("computed" in p for p in problems)
    assert any("activation_scales = 'static'" in p for p in problems)
    opt = ditopt.optimize(model, _profile(weights="int8", activations="int8", rotation="hadamard", activation_scales="static"),
                          example_inputs=kw, calibration=arch_sampler(kw))
    rep = _record(opt).report
    assert len(rep["static_activation_scales"]) == 12 and all(v > 0 for v in rep["static_activation_scales"].values())
    with torch.no_grad():
        want, ref = opt(**kw), model(**kw)
    assert float((want - ref).norm() / ref.norm()) < 0.05
    static = export_artifact(opt, tmp_path / "static")
    assert check_artifact_for_tensorrt(static) == {}
    torch.testing.assert_close(load_artifact(static)(**kw), want, rtol=1e-5, atol=1e-5)


def test_static_scales_match_the_integer_reference_and_saturate():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 5, 64, generator=gen), torch.randn(16, 64, generator=gen)
    qw = Q.quantize_int8(w)
    s = torch.tensor(float(x.abs().max()) / 127 / 2)  # half the range: the large values clip at -128 / 127
    y = torch.ops.ditopt.int8_linear(x, qw.codes, qw.scale, None, s)
    torch.testing.assert_close(y, Q.int8_linear_reference(x, qw.codes, qw.scale, None, s), atol=1e-5, rtol=1e-5)
    codes = Q.static_codes(x, s)
    assert codes.min() == -128 and codes.max() == 127
    fake = torch.ops.ditopt.qdq_linear(x, qw.codes, qw.scale, None, None, "int8", 0, 8, s)
    torch.testing.assert_close(y, fake, atol=1e-4, rtol=1e-4)


def test_static_scales_refuse_int4_activations():
    with pytest.raises(InvalidProfileError, match="activation_scales"):
        ditopt.load_profile(_profile(weights="int8", activations="int4", activation_scales="static"))


def test_formats_are_all_accepted_explicitly():
    model, kw = _plain()
    for w, a in itertools.product(("int8", "int4", "tlq4", "tlq3"), ("none", "int8", "int4")):
        opt = ditopt.optimize(model, _profile(weights=w, activations=a, rotation="hadamard", group_size=16), example_inputs=kw)
        with torch.no_grad():
            out = opt(**kw)
        assert torch.isfinite(out).all(), (w, a)


def test_composes_with_pruning_and_caching_in_one_profile():
    """Quantize after layer_prune, then a cache schedule, in one profile: the quantized segments
    are the ones the cache skips or computes, and skipped steps reuse the quantized residual."""
    model, kw = _plain()
    profile = {"name": "all", "budget": {"max_rel_err": 1.0}, "passes": [
        {"name": "layer_prune", "blocks": [2], "bridge": "none"},
        {"name": "quantize", "weights": "int8", "activations": "int8", "rotation": "none"},
        {"name": "residual_cache", "interval": 2}]}
    opt = ditopt.optimize(model, profile, example_inputs=kw, num_steps=4)
    assert [r.modified for r in opt.report.passes] == [True, True, True]
    assert _record(opt).report["execution"]["int8_gemm"] == 8  # blocks 0 and 1; block 2 was removed
    int8 = torch.ops.ditopt.int8_linear.default
    program = opt.programs[0]
    assert not any(n.target is int8 for n in program.segment_for_block(2).module.graph.nodes)
    outs = []
    with torch.no_grad():
        for t in (900.0, 700.0, 500.0, 300.0):
            outs.append(opt(**{**kw, "t": torch.full((2,), t)}))
    assert all(torch.isfinite(o).all() for o in outs)
