"""MoE split (issue 32): the routed-expert op against its references (grouped, per token, masked
for export, Triton in the interpreter), the split's exactness with every expert active, load
balance on a planted clustering, the pass's graph before and after, the budget search raising k
as the budget tightens, distillation, export parity, must-not-fire, bad input, the user's model."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from conftest import arch_sampler, build_model, make_inputs
from triton_interpreter import needs_triton, run_interpreted

import ditopt
from ditopt.errors import CalibrationError, InvalidProfileError, UnsupportedModelError
from ditopt.export import export_artifact, load_artifact
from ditopt.kernels import moe as M
from ditopt.kernels.moe_triton import grouped_matmul_reference, tile_schedule
from ditopt.passes.moe.rewrite import ExpertWeights
from ditopt.passes.moe.split import balanced_kmeans, distill_experts, skip_offsets, split_ffn, split_stats

MOE = torch.ops.ditopt.moe_ffn.default


def _weights(d=16, hidden=48, shared=8, experts=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(hidden, d) * 0.3, r(hidden) * 0.1, r(hidden, d) * 0.3, r(d) * 0.1, r(experts, d) * 0.1,
            r(experts, d), r(experts))


# -- the op ------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", M.ACTIVATIONS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_op_matches_the_per_token_reference_and_the_export_formulation(activation, top_k):
    w1, b1, w2t, b2, off, rw, rb = _weights()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    args = (w1, b1, w2t, b2, off, rw, rb, 8, 4, top_k, activation)
    want = M.moe_ffn_reference(x, *args)
    torch.testing.assert_close(torch.ops.ditopt.moe_ffn(x, *args), want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M._moe_ffn_exportable(x, *args), want.float(), atol=1e-5, rtol=1e-5)
    grouped = M.moe_ffn_grouped(x, *args, grouped_mm=grouped_matmul_reference)
    torch.testing.assert_close(grouped, want.float(), atol=1e-5, rtol=1e-5)


def test_every_expert_active_is_the_dense_ffn():
    w1, b1, w2t, _, off, rw, rb = _weights()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    dense_b2 = torch.randn(16)
    # The op folds sum(offsets) into b2: with every expert on, the offsets cancel.
    y = torch.ops.ditopt.moe_ffn(x, w1, b1, w2t, dense_b2 + off.sum(0), off, rw, rb, 8, 4, 4, "gelu_tanh")
    dense = torch.nn.functional.gelu(x @ w1.T + b1, approximate="tanh") @ w2t + dense_b2
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


def test_tile_schedule_covers_each_experts_rows_once():
    counts = torch.tensor([0, 70, 3, 0, 32])
    te, lo, hi = tile_schedule(counts, bm=32)
    assert te.tolist() == [1, 1, 1, 2, 4]
    assert lo.tolist() == [0, 32, 64, 70, 73] and hi.tolist() == [32, 64, 70, 73, 105]


def test_op_flop_formula_counts_the_active_neurons():
    from ditopt.costs import mac_counter

    w1, b1, w2t, b2, off, rw, rb = _weights()
    x = torch.randn(1, 10, 16)
    for k in (1, 3):
        with mac_counter() as macs:
            torch.ops.ditopt.moe_ffn(x, w1, b1, w2t, b2, off, rw, rb, 8, 4, k, "gelu")
        assert macs() == 10 * 16 * (2 * (8 + k * 10) + 4)


_TRITON_SCRIPT = textwrap.dedent("""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from ditopt.kernels.moe import moe_ffn_grouped, moe_ffn_reference
    from ditopt.kernels.moe_triton import grouped_matmul_triton, grouped_matmul_reference
    errs = []
    for i, (E, K, N, counts) in enumerate([(4, 40, 24, [5, 0, 33, 9]), (3, 64, 64, [64, 1, 0])]):
        g = torch.Generator().manual_seed(i)
        rows = torch.randn(sum(counts), K, generator=g)
        w = torch.randn(E, K, N, generator=g)
        b = torch.randn(E, N, generator=g)
        c = torch.tensor(counts)
        for bias in (b, None):
            errs.append((grouped_matmul_triton(rows, w, c, bias) - grouped_matmul_reference(rows, w, c, bias)).abs().max().item())
    # The whole routed FFN with the Triton grouped GEMMs, against the per-token reference.
    g = torch.Generator().manual_seed(9)
    D, H, S, E = 16, 40, 8, 4
    x = torch.randn(2, 9, D, generator=g)
    args = (torch.randn(H, D, generator=g), torch.randn(H, generator=g), torch.randn(H, D, generator=g),
            torch.randn(D, generator=g), torch.randn(E, D, generator=g), torch.randn(E, D, generator=g),
            torch.randn(E, generator=g), S, E, 2, "gelu_tanh")
    got = moe_ffn_grouped(x, *args, grouped_mm=grouped_matmul_triton)
    errs.append((got.double() - moe_ffn_reference(x, *args)).abs().max().item())
    print("RESULT" + json.dumps(errs))
""")


@needs_triton
def test_triton_grouped_gemm_in_the_interpreter_matches_the_reference():
    errs = run_interpreted(_TRITON_SCRIPT)
    assert len(errs) == 5 and max(errs) < 1e-3, errs


# -- the split ---------------------------------------------------------------------------------
def test_balanced_kmeans_recovers_a_planted_clustering_with_equal_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 12, generator=g), dim=1)
    truth = torch.arange(40) % 4
    feats = torch.nn.functional.normalize(centres[truth] + 0.05 * torch.randn(40, 12, generator=g), dim=1)
    got = balanced_kmeans(feats, 4)
    assert torch.bincount(got).tolist() == [10] * 4
    # Same partition up to a relabelling.
    pairs = {(int(a), int(b)) for a, b in zip(truth, got)}
    assert len(pairs) == 4


def test_split_on_planted_expert_tokens_routes_each_token_to_its_expert():
    """Tokens of four kinds, each exciting its own quarter of a ReLU FFN's neurons: the
    co-activation split finds the quarters, the router sends each token to its own one, the
    load is balanced and top-1 routing keeps nearly all of the output."""
    g = torch.Generator().manual_seed(0)
    d, hidden, experts = 8, 32, 4
    kinds = torch.linalg.qr(torch.randn(d, 4, generator=g)).Q.T * 6  # four orthogonal token kinds
    w1 = torch.zeros(hidden, d)
    for q in range(4):
        w1[q::4] = kinds[q] / kinds[q].norm() + 0.02 * torch.randn(hidden // 4, d, generator=g)
    b1 = torch.full((hidden,), -1.5)
    w2 = torch.randn(d, hidden, generator=g)
    kind = torch.randint(0, 4, (1200,), generator=g)
    x = kinds[kind] + 0.3 * torch.randn(1200, d, generator=g)
    w = skip_offsets(x, split_ffn(x, w1, b1, w2, None, "relu", experts, 0, "coactivation", 1e-3), "relu", 1)
    stats = split_stats(x, w, "relu", 1)
    assert max(stats.load) < 0.35 and min(stats.load) > 0.15
    assert stats.captured > 0.9 and stats.oracle_captured > 0.9
    assert float(w.offsets.abs().max()) < 0.05 * float(w.w2t.abs().max())  # skipped experts are silent here
    # Every expert holds the neurons of one kind.
    perm_rows = w.w1.reshape(experts, hidden // experts, d)
    for e in range(experts):
        best = (torch.nn.functional.normalize(perm_rows[e], dim=1) @ torch.nn.functional.normalize(kinds, dim=1).T).argmax(1)
        assert len(set(best.tolist())) == 1
    y = torch.relu(x @ w1.T + b1) @ w2.T
    got = torch.ops.ditopt.moe_ffn(x, w.w1, w.b1, w.w2t, w.b2, w.offsets, w.router_w, w.router_b, 0, experts, 1, "relu")
    assert float((got - y).pow(2).sum() / y.pow(2).sum()) < 0.01



def _gelu_split(seed=0):
    """A GELU FFN split at top_k 1 (dense activations: the split alone leaves a large error)."""
    g = torch.Generator().manual_seed(seed)
    d, hidden, experts = 8, 32, 3
    w1, b1, w2 = torch.randn(hidden, d, generator=g) * 0.5, torch.randn(hidden, generator=g) * 0.1, torch.randn(d, hidden, generator=g) * 0.3
    x = torch.randn(800, d, generator=g)
    y = torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T
    return x, y, skip_offsets(x, split_ffn(x, w1, b1, w2, None, "gelu", experts, 8, "coactivation", 1e-3), "gelu", 1)


def _tensors(w):
    return [w.w1, w.b1, w.w2t, w.b2, w.offsets, w.router_w, w.router_b]


def _all_tokens_error(x, y, w):
    got = M.masked_ffn(x, w.w1, w.b1, w.w2t, w.b2, w.offsets, M.expert_mask(x, w.router_w, w.router_b, w.experts, 1),
                       w.shared, "gelu")
    return float((got - y).pow(2).sum() / y.pow(2).sum())


def test_expert_distillation_on_the_core_loop():
    """distill_experts runs ditopt.distill: the error falls, the held-out error is never worse than
    the start, the seed fixes the result, and inside inference mode it trains the same."""
    x, y, w = _gelu_split()
    trained, log = distill_experts(x, y, w, "gelu", 1, 60, lr=1e-2, batch=128)
    assert log["held_out_rel_sq_err_after"] < 0.8 * log["held_out_rel_sq_err_before"]
    assert log["steps"] == 60 and log["batches"] == 5  # 600 training tokens in batches of at most 128
    # The returned weights are the trained ones (on every token, not only the log's held-out quarter);
    # the router is kept.
    assert _all_tokens_error(x, y, trained) < 0.8 * _all_tokens_error(x, y, w)
    assert torch.equal(trained.router_w, w.router_w) and torch.equal(trained.router_b, w.router_b)
    again, log_again = distill_experts(x, y, w, "gelu", 1, 60, lr=1e-2, batch=128)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(trained), _tensors(again)))
    assert log_again["held_out_rel_sq_err_after"] == log["held_out_rel_sq_err_after"]
    other, _ = distill_experts(x, y, w, "gelu", 1, 60, lr=1e-2, batch=128, seed=1)
    assert not torch.equal(other.w1, trained.w1)
    # Inference tensors in, as when a runtime re-runs the pass for a new shape inside inference mode.
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        wi = ExpertWeights(*(t.clone() for t in _tensors(w)[:5]), w.router_w.clone(), w.router_b.clone(), w.shared, w.experts)
        inside, _ = distill_experts(xi, yi, wi, "gelu", 1, 60, lr=1e-2, batch=128)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(trained), _tensors(inside)))
    # A rate that diverges: no checked state beats the start, which is returned unchanged.
    wild, log = distill_experts(x, y, w, "gelu", 1, 20, lr=1.0, batch=128)
    assert log["held_out_rel_sq_err_after"] == log["held_out_rel_sq_err_before"]
    assert all(torch.equal(a, b) for a, b in zip(_tensors(wild), _tensors(w)))


# -- the pass ----------------------------------------------------------------------------------
def _profile(budget=None, **cfg):
    return {"name": "moe", "budget": budget or {"max_rel_err": 10.0}, "passes": [{"name": "moe_split", **cfg}]}


def _record(opt):
    return next(r for r in opt.report.passes if r.name == "moe_split")


def _plain():
    model = build_model("plain")
    return model, make_inputs("plain", model, batch=2)


def test_split_rewrites_each_ffn_into_the_routed_op_and_is_exact_at_full_k():
    model, kw = _plain()
    before = copy.deepcopy(model.state_dict())
    original = ditopt.capture(model, kw)
    opt = ditopt.optimize(model, _profile(experts=3, shared_experts=1, top_k=3), example_inputs=kw,
                          calibration=arch_sampler(kw))
    rec = _record(opt)
    assert not rec.modified and "dense" in rec.report["skipped"]  # top_k = experts: nothing to split
    opt = ditopt.optimize(model, _profile(experts=3, shared_experts=1, top_k=2), example_inputs=kw,
                          calibration=arch_sampler(kw))
    rep = _record(opt).report
    for seg, orig in zip(opt.programs[0].block_segments, original.block_segments):
        new_targets = [n.target for n in seg.module.graph.nodes if n.op == "call_function"]
        old_targets = [n.target for n in orig.module.graph.nodes if n.op == "call_function"]
        assert new_targets.count(MOE) == 1 and MOE not in old_targets
        # The FFN's two linears and its GELU became the one op.
        linear = torch.ops.aten.linear.default
        assert old_targets.count(linear) - new_targets.count(linear) == 2
        assert torch.ops.aten.gelu.default not in new_targets or old_targets.count(torch.ops.aten.gelu.default) > 1
    layer = rep["layers"]["blocks.0.mlp"]
    assert layer["top_k"] == 2 and layer["shared_neurons"] == 32 and layer["neurons_per_expert"] == 32
    assert layer["activated_parameters"] == {"dense": 2 * 32 * 128, "routed": 2 * 32 * 96 + 32 * 3}
    assert abs(sum(layer["load"]) - 1) < 1e-3 and 0 < layer["router_captured"] <= layer["oracle_captured"] + 1e-6
    with torch.no_grad():
        a, b = opt(**kw), model(**kw)
    err = float((a - b).norm() / b.norm())
    assert 0 < err < 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The replayed error the report gives is the routed graph's, not zero.
    assert rep["replayed_error"]["rel_sq_err"] > 0


def test_all_experts_routed_in_the_op_equals_the_model():
    """The split's weights with top_k = experts through the op: the dense model exactly."""
    model, kw = _plain()
    graph = ditopt.capture(model, kw)
    from ditopt.calibration import calibrate
    from ditopt.passes.moe.moe_split import MoESplitConfig, Splitter
    from ditopt.passes.moe.rewrite import find_ffns, rewrite_segment
    from ditopt.calibration.replay import CalibrationReplay

    stats = calibrate(model, graph, ["block_inputs"], arch_sampler(kw), progress=False)
    ffns, _ = find_ffns(graph)
    config = MoESplitConfig(experts=3, shared_experts=1)
    replay = CalibrationReplay(graph, stats, 16)
    inputs = replay.node_inputs({f.segment: {f.up: f.name} for f in ffns})
    splitter = Splitter(graph, ffns, config, inputs)
    g = graph
    for ffn in ffns:
        g = g.with_segment(rewrite_segment(g.segment(ffn.segment), {ffn.down: (ffn, splitter.split[ffn.name], 3)}))
    assert replay.error(g).total < 1e-10


def test_budget_search_raises_k_as_the_budget_tightens():
    model, kw = _plain()
    chosen = {}
    for db in (30.0, 45.0):
        opt = ditopt.optimize(model, _profile(budget={"min_psnr_db": db}, experts=3, shared_experts=1, margin_db=0.0),
                              example_inputs=kw, calibration=arch_sampler(kw, samples=8), max_retries=0,
                              on_gate_miss="return")
        rep = _record(opt).report
        assert set(rep["sensitivity"]) == {"blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"}
        if _record(opt).modified:
            assert rep["predicted_psnr_db"] >= rep["target_psnr_db"]
            ks = {n: v["top_k"] for n, v in rep["layers"].items()}
            entry = next(p for p in opt.report.resolved_profile().passes if p.name == "moe_split")
            assert entry.config.layers == ks and not entry.config.searched()
        else:
            ks = {}
        chosen[db] = sum(ks.get(n, 3) for n in rep["sensitivity"])
    assert chosen[30.0] < chosen[45.0]


def test_distillation_lowers_the_replayed_error():
    model, kw = _plain()
    errs = {}
    for steps in (0, 150):
        opt = ditopt.optimize(model, _profile(experts=3, shared_experts=1, top_k=1, distill_steps=steps),
                              example_inputs=kw, calibration=arch_sampler(kw))
        rep = _record(opt).report
        errs[steps] = rep["replayed_error"]["rel_sq_err"]
    assert errs[150] < errs[0]
    # A new batch size re-runs the pass inside the sampler's inference mode: it still trains.
    with torch.inference_mode():
        out = opt(**make_inputs("plain", model, batch=3))
    assert torch.isfinite(out).all()
    fits = rep["distillation"]["fits"]
    assert all(f["held_out_rel_sq_err_after"] <= f["held_out_rel_sq_err_before"] and f["steps"] == 150
               for f in fits.values())


def test_export_runs_the_routed_graph_in_onnxruntime(tmp_path):
    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(experts=3, shared_experts=1, top_k=1), example_inputs=kw,
                          calibration=arch_sampler(kw))
    with torch.no_grad():
        want = opt(**kw)
    runner = load_artifact(export_artifact(opt, tmp_path / "artifact"))
    torch.testing.assert_close(runner(**kw), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["dit", "sd3", "flux", "wan", "pixart"])
def test_splits_the_ffns_of_each_architecture(name):
    model = build_model(name)
    kw = make_inputs(name, model, batch=2)
    hidden = {f.hidden_features for b in ditopt.capture(model, kw).blocks for f in b.ffn}
    experts = 3 if all(h % 4 == 0 for h in hidden) else 1
    opt = ditopt.optimize(model, _profile(experts=experts, shared_experts=1, top_k=1), example_inputs=kw,
                          calibration=arch_sampler(kw))
    rec = _record(opt)
    assert rec.modified and rec.report["layers"]
    if name == "flux":  # single blocks concatenate the MLP with attention before proj_out
        assert any("not split" in why for why in rec.report["not_split"].values())
    # In-place writes survive the rewrite: Wan's rotary embedding fills an empty_like through copy_
    # into slices, and dropping those writes left an uninitialised buffer (an order-dependent NaN).
    def writes(segments):
        return sum(n.target is torch.ops.aten.copy_.default for s in segments for n in s.module.graph.nodes)
    assert writes(opt.programs[0].segments) == writes(ditopt.capture(model, kw).segments)
    with torch.no_grad():
        out = opt(**kw)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    assert torch.isfinite(out).all()


def test_keep_everything_does_not_fire():
    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(experts=3, top_k=1, keep=["blocks.*"]), example_inputs=kw,
                          calibration=arch_sampler(kw))
    rec = _record(opt)
    assert not rec.modified and "kept dense" in rec.report["skipped"]
    assert [s.module.code for s in opt.programs[0].segments] == [s.module.code for s in ditopt.capture(model, kw).segments]


def test_a_budget_no_split_meets_does_not_fire():
    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(budget={"min_psnr_db": 200.0}, experts=3, shared_experts=1), example_inputs=kw,
                          calibration=arch_sampler(kw), max_retries=0, on_gate_miss="return")
    rec = _record(opt)
    assert not rec.modified and "stays dense" in rec.report["skipped"]


@pytest.mark.parametrize("cfg, error, match", [
    ({"experts": 5, "shared_experts": 1, "top_k": 2}, InvalidProfileError, "do not split into experts"),
    ({"experts": 3, "top_k": 1, "layers": None}, CalibrationError, "calibration"),
    ({"experts": 3, "shared_experts": 1, "layers": {"blocks.9.mlp": 1}}, InvalidProfileError, "blocks.9.mlp"),
])
def test_bad_input_is_a_named_error(cfg, error, match):
    model, kw = _plain()
    calibration = None if error is CalibrationError else arch_sampler(kw)
    with pytest.raises(error, match=match):
        ditopt.optimize(model, _profile(**cfg), example_inputs=kw, calibration=calibration)


@pytest.mark.parametrize("cfg, match", [
    ({"experts": 4, "top_k": 5}, "between 1 and experts"),
    ({"experts": 4, "layers": {"a": 0}}, "between 1 and experts"),
    ({"experts": 4, "top_k": 2, "layers": {"a": 1}}, "not both"),
])
def test_bad_configs_fail_at_profile_load(cfg, match):
    with pytest.raises(InvalidProfileError, match=match):
        ditopt.load_profile(_profile(**cfg))


def test_a_model_that_already_routes_or_has_no_ffn_is_refused():
    model, kw = _plain()
    opt = ditopt.optimize(model, _profile(experts=3, shared_experts=1, top_k=1), example_inputs=kw,
                          calibration=arch_sampler(kw))
    from ditopt.passes.moe.rewrite import has_routed_experts

    assert has_routed_experts(opt.programs[0]) is not None
    assert has_routed_experts(ditopt.capture(model, kw)) is None

    no_ffn = copy.deepcopy(model)  # the blocks' MLPs become one linear: no activation, no FFN
    for block in no_ffn.blocks:
        block.mlp = torch.nn.Linear(32, 32)
    with pytest.raises(UnsupportedModelError, match="no dense FFN"):
        ditopt.optimize(no_ffn, _profile(experts=3, top_k=1), example_inputs=kw, calibration=arch_sampler(kw))
