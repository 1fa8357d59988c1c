"""Caching passes: plan before/after, numerics computable by hand, CFG state, schedule
re-derivation, stats round-trip, and the budget search."""

from __future__ import annotations

import pytest
import torch
from toy_models import AffineDiT, euler_sampler, toy_inputs

import ditopt
from ditopt.calibration import CalibStats, calibrate
from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.plan import RunSegments
from ditopt.passes.caching import CachedSpan

TIMES = [4.0, 3.0, 2.0, 1.0]


def _profile(**pass_cfg):
    return {"name": "t", "budget": {"max_rel_err": 1e-5}, "passes": [pass_cfg]}


def _opt(model, pass_cfg, **kw):
    return ditopt.optimize(model, _profile(**pass_cfg), example_inputs=toy_inputs(), **kw)


def _call(opt, x, t):
    with torch.no_grad():
        return opt(x=x, timestep=torch.full((x.shape[0],), t))


def test_plan_before_and_after():
    model = AffineDiT(depth=3).eval()
    plain = ditopt.optimize(model, "identity", example_inputs=toy_inputs())
    assert [type(s) for s in plain.programs[0].plan] == [RunSegments] * 5
    cached = _opt(model, dict(name="residual_cache", interval=2, warmup=1), num_steps=4)
    plan = cached.programs[0].plan
    assert [type(s) for s in plan] == [RunSegments, CachedSpan, RunSegments]
    assert plan[1].blocks == ("block.0", "block.1", "block.2")
    assert plan[1].policy.compute == (True, False, True, False)
    # The segments themselves are untouched: a caching pass only rewrites the schedule.
    assert [s.module.code for s in cached.programs[0].segments] == [s.module.code for s in plain.programs[0].segments]
    assert cached.report.passes[0].report["block_evaluations"] == 6


def test_residual_reuse_by_hand():
    model = AffineDiT(depth=3, scale=2.0).eval()
    opt = _opt(model, dict(name="residual_cache", interval=2, warmup=1), num_steps=4)
    W = model.total_w()
    xs = [torch.full((1, 4, 8), v) for v in (1.0, 2.0, 3.0, 4.0)]
    outs = [_call(opt, x, t) for x, t in zip(xs, TIMES)]
    assert torch.allclose(outs[0], 8 * xs[0] + 4 * W)  # computed
    assert torch.allclose(outs[1], xs[1] + 7 * xs[0] + 4 * W)  # reuses step 0's residual 7x0 + 4W
    assert torch.allclose(outs[2], 8 * xs[2] + 2 * W)  # computed
    assert torch.allclose(outs[3], xs[3] + 7 * xs[2] + 2 * W)
    assert opt.last_record["cached"] == ["block.0", "block.1", "block.2"]


def test_taylor_order1_is_exact_on_linear_residual():
    model = AffineDiT(depth=2, scale=1.0).eval()  # residual t * W: linear in t
    opt = _opt(model, dict(name="taylor_forecast", order=1, interval=3, warmup=2, target="residual"), num_steps=4)
    W = model.total_w()
    x = torch.zeros(1, 4, 8)
    outs = [_call(opt, x, t) for t in TIMES]
    for out, t in zip(outs, TIMES):
        assert torch.allclose(out, t * W, atol=1e-5)
    assert "cached" in opt.last_record  # step 3 was forecast, and still exact
    order0 = _opt(model, dict(name="taylor_forecast", order=0, interval=3, warmup=2, target="residual"), num_steps=4)
    outs0 = [_call(order0, x, t) for t in TIMES]
    assert torch.allclose(outs0[2], 3 * W)  # order 0 reuses step 1's residual


def test_cfg_split_and_batched_states_are_separate():
    model = AffineDiT(depth=3, scale=2.0).eval()
    W = model.total_w()
    a, b, c, d = (torch.full((1, 4, 8), v) for v in (1.0, 10.0, 3.0, 5.0))
    opt = _opt(model, dict(name="residual_cache", interval=2, warmup=1), num_steps=4)
    _call(opt, a, 4.0), _call(opt, b, 4.0)  # step 0: both branches computed
    assert torch.allclose(_call(opt, c, 3.0), c + 7 * a + 4 * W)
    assert torch.allclose(_call(opt, d, 3.0), d + 7 * b + 4 * W)
    batched = _opt(model, dict(name="residual_cache", interval=2, warmup=1), num_steps=4)
    _call(batched, torch.cat([a, b]), 4.0)
    out = _call(batched, torch.cat([c, d]), 3.0)
    assert torch.allclose(out, torch.cat([c + 7 * a, d + 7 * b]) + 4 * W)


def test_gated_caches_fire_only_when_allowed():
    model = AffineDiT(depth=3, scale=1.0).eval()
    x = torch.ones(1, 4, 8)
    ref = [model(x=x, timestep=torch.tensor([t])) for t in TIMES]
    for name in ("probe_cache", "confidence_forecast"):
        never = _opt(model, dict(name=name, threshold=0.0, warmup=1))
        outs = [_call(never, x, t) for t in TIMES]
        assert all(torch.allclose(o, r) for o, r in zip(outs, ref)), name
        assert "cached" not in never.last_record
        always = _opt(model, dict(name=name, threshold=1e9, warmup=1, max_cached=8))
        [_call(always, x, t) for t in TIMES]
        assert always.last_record["cached"] == ["block.1", "block.2"], name


def test_passes_that_must_not_fire():
    model = AffineDiT(depth=1).eval()
    opt = _opt(model, dict(name="probe_cache", threshold=0.1))
    assert opt.report.passes[0].modified is False
    assert all(isinstance(s, RunSegments) for s in opt.programs[0].plan)
    with pytest.raises(InvalidProfileError):
        ditopt.load_profile({"name": "x", "passes": [{"name": "residual_cache", "interval": 0}]})
    with pytest.raises(CalibrationError):
        _opt(AffineDiT().eval(), dict(name="taylor_forecast"))  # no step count, no stats


def _sampler(steps: int, samples: int = 4):
    """`samples` trajectories from fixed seeds, sampled two at a time (the example batch), so
    that optimize can hold half of them out of the budget search."""
    x0 = torch.randn(samples, 4, 8, generator=torch.Generator().manual_seed(0))
    loops = [euler_sampler(x0[i : i + 2], [1.0 - j / steps for j in range(steps)]) for i in range(0, samples, 2)]
    return lambda model: torch.cat([loop(model) for loop in loops])


def test_stats_round_trip(tmp_path):
    model = AffineDiT(depth=3, scale=1.0).eval()
    graph = ditopt.capture(model, toy_inputs())
    stats = calibrate(model, graph, ["trajectory"], _sampler(6))
    assert stats.num_steps == 6 and stats.timesteps[0] == 1.0
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = CalibStats.load(path)
    assert loaded.graph_hash == stats.graph_hash and loaded.timesteps == stats.timesteps
    for k, v in stats.tensors.items():
        assert torch.equal(loaded.tensors[k], v)
    assert torch.equal(loaded.reference_samples, stats.reference_samples)
    loaded.check_graph(graph)
    other = ditopt.capture(AffineDiT(depth=2).eval(), toy_inputs())
    with pytest.raises(CalibrationError):
        loaded.check_graph(other)


def test_calibration_records_the_trajectory_and_the_sketches_only_where_needed():
    # The step count, timesteps, CFG layout and samples are the core's, on every calibration; the
    # block residual sketches are the caching collector's, recorded where a pass needs them.
    from ditopt.registry import get_collector

    model = AffineDiT(depth=3, scale=1.0).eval()
    graph = ditopt.capture(model, toy_inputs())
    bare = calibrate(model, graph, [], _sampler(6), progress=False)
    assert bare.tensors == {} and bare.num_steps == 6 and bare.timesteps[:2] == pytest.approx([1.0, 1.0 - 1 / 6])
    assert bare.meta == {"trajectories": 4, "trajectory_layout": [[0, 0, 2], [1, 0, 2]], "batched_cfg": False}
    assert bare.reference_samples.shape == (4, 4, 8)
    assert get_collector("trajectory").__module__ == "ditopt.passes.caching.collector"
    full = calibrate(model, graph, ["trajectory"], _sampler(6), progress=False)
    assert full.meta["trajectory"]["blocks"] == ["block.0", "block.1", "block.2"]
    assert full.tensors["block_residual_sketch"].shape == (4, 6, 3, 32) and full.meta["trajectory"]["stream_shape"] == [4, 8]
    assert {k: v for k, v in full.meta.items() if k != "trajectory"} == bare.meta
    assert torch.equal(full.reference_samples, bare.reference_samples)
    # A calibrated caching pass given stats without the sketches says which collector is missing.
    profile = {"name": "s", "budget": {"max_rel_err": 1.0}, "passes": [{"name": "calibrated_schedule", "computed_steps": 3}]}
    with pytest.raises(CalibrationError, match="collector 'trajectory'"):
        ditopt.optimize(model, profile, example_inputs=toy_inputs(), stats=bare)
    assert ditopt.optimize(model, profile, example_inputs=toy_inputs(), stats=full).report.passes[0].modified


def test_stats_saved_before_the_collector_split_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    from ditopt.passes.caching.schedule import sketch_channels

    model = AffineDiT(depth=3, scale=1.0).eval()
    graph = ditopt.capture(model, toy_inputs())
    stats = calibrate(model, graph, ["trajectory"], _sampler(6), progress=False)
    # Version 1: the sketches were the core's, their meta at the top level.
    sketch_meta = {k: v for k, v in stats.meta["trajectory"].items() if k != "per_trajectory"}
    meta = {**{k: v for k, v in stats.meta.items() if k != "trajectory"}, **sketch_meta}
    header = {"version": 1, "graph_hash": stats.graph_hash, "model_class": stats.model_class,
              "num_steps": stats.num_steps, "timesteps": stats.timesteps, "meta": meta}
    tensors = {**stats.tensors, "reference_samples": stats.reference_samples}
    save_file(tensors, tmp_path / "v1.safetensors", metadata={"ditopt": json.dumps(header)})
    old = CalibStats.load(tmp_path / "v1.safetensors")
    assert old.meta == stats.meta and set(old.tensors) == set(stats.tensors)
    assert torch.equal(sketch_channels(old), sketch_channels(stats))
    kept = old.restricted_to_samples([1, 3], 4)  # the sketches are subset with the trajectories
    assert torch.equal(kept.tensors["block_residual_sketch"], stats.tensors["block_residual_sketch"][[1, 3]])
    header["version"] = 7
    save_file(tensors, tmp_path / "v7.safetensors", metadata={"ditopt": json.dumps(header)})
    with pytest.raises(CalibrationError, match="stats version 7 is not 2"):
        CalibStats.load(tmp_path / "v7.safetensors")


def test_schedule_rederived_for_other_step_count():
    model = AffineDiT(depth=2, scale=1.0).eval()
    cfg = dict(name="calibrated_schedule", order=1, computed_steps=4, warmup=2)
    opt = ditopt.optimize(model, _profile(**cfg), example_inputs=toy_inputs(batch=2), calibration=_sampler(8))
    stage = opt.programs[0].plan[1]
    assert sum(stage.policy.compute) == 4 and len(stage.policy.compute) == 8
    assert stage.policy.weights  # fitted forecast weights, valid for the calibrated 8 steps only
    # 16 steps instead of 8: re-derived from the calibrated timesteps (Taylor on the cached
    # residuals instead of the fitted weights), and still exact on a linear residual.
    out = _sampler(16)(opt)
    ref = _sampler(16)(model)
    assert torch.allclose(out, ref, atol=1e-4)
    strict = ditopt.optimize(
        model, _profile(**cfg, on_mismatch="error"), example_inputs=toy_inputs(batch=2), calibration=_sampler(8)
    )
    with pytest.raises(CalibrationError, match="calibrated for 8 steps"):
        _sampler(16)(strict)


def test_budget_search_gets_gentler_when_budget_tightens():
    model = AffineDiT(depth=3, scale=1.02).eval()
    chosen = {}
    for budget in (20.0, 45.0):
        profile = {"name": "b", "budget": {"min_psnr_db": budget}, "passes": [{"name": "calibrated_schedule", "order": 0}]}
        opt = ditopt.optimize(model, profile, example_inputs=toy_inputs(batch=2), calibration=_sampler(12), max_retries=0)
        rep = opt.report.passes[0].report
        chosen[budget] = rep["computed_steps"]
        assert rep["predicted_psnr_db"] >= budget
        e2e = opt.report.verification[-1]
        assert e2e["kind"] == "end-to-end" and float(e2e["psnr_db"]) >= budget
    assert chosen[45.0] > chosen[20.0]


def test_budget_search_compares_placements_at_the_fewest_steps():
    """With warmup and alpha on 'auto' the search compares several placements of the computed
    steps; at the fewest computed steps that meet the target it keeps the one with the highest
    calibration PSNR, and the stage runs exactly that quantile placement."""
    from ditopt.passes.caching.schedule import quantile_schedule, span_residual_sketch, step_changes

    model = AffineDiT(depth=3, scale=1.02).eval()
    profile = {"name": "b", "budget": {"min_psnr_db": 20.0}, "passes": [{"name": "calibrated_schedule", "order": 0}]}
    opt = ditopt.optimize(model, profile, example_inputs=toy_inputs(batch=2), calibration=_sampler(12), max_retries=0)
    rep = opt.report.passes[0].report
    k = rep["computed_steps"]
    at_k = [t for t in rep["trials"] if t["computed_steps"] == k]
    assert len({(t["warmup"], t["alpha"]) for t in at_k}) > 1
    assert rep["predicted_psnr_db"] == max(t["psnr_db"] for t in at_k) >= rep["target_psnr_db"]
    assert all(t["psnr_db"] < rep["target_psnr_db"] for t in rep["trials"] if t["computed_steps"] < k)
    changes = step_changes(span_residual_sketch(opt.stats, 0, 2))
    mask = quantile_schedule(changes, k, rep["warmup"], rep["alpha"])
    assert rep["stages"][0]["compute_steps"] == [i for i, c in enumerate(mask) if c]


def test_schedule_warmup_must_leave_step_zero_computed():
    from pydantic import ValidationError

    from ditopt.passes.caching.calibrated_schedule import CalibratedScheduleConfig

    assert CalibratedScheduleConfig().warmup == "auto" and CalibratedScheduleConfig(warmup=1).warmup == 1
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        CalibratedScheduleConfig(warmup=0)


@pytest.mark.parametrize("retry_margin,shortfall", [(None, 2.5), (None, 25.0), (0.25, 25.0)])
def test_a_missed_gate_retries_with_the_bounds_shortfall(held_out_misses, retry_margin, shortfall):
    """When the held-out lower bound misses, optimize re-runs the search with the target raised
    by the bound's shortfall + the budget's retry margin (1 dB unless set), and at least past
    the rejected plan's calibration PSNR so that plan cannot come back, and records the missed
    attempt."""
    calls = held_out_misses(1, shortfall)  # the mean passes, the bound says `shortfall` dB short
    model = AffineDiT(depth=3, scale=1.02).eval()
    budget = {"min_psnr_db": 20.0} if retry_margin is None else {"min_psnr_db": 20.0, "retry_margin_db": retry_margin}
    profile = {"name": "b", "budget": budget, "passes": [{"name": "calibrated_schedule", "order": 0}]}
    opt = ditopt.optimize(model, profile, example_inputs=toy_inputs(batch=2), calibration=_sampler(12), max_retries=1)
    assert len(calls) == 2 and len(opt.report.retries) == 1
    assert opt.report.retries[0]["psnr_lower_db"] == pytest.approx(20.0 - shortfall)
    # The first plan (2 computed steps) measured ~42 dB on calibration against a 21 dB target
    # (budget + margin_db). A 2.5 dB shortfall + retry margin would choose it again, so the
    # retry asks for just more than its PSNR; 25 dB + margin asks for more than that anyway.
    step = opt.report.retries[0]["details"][-1]
    assert step["next"] == "tighten" and 15 < step["headroom_db"] < 24
    margin = 1.0 if retry_margin is None else retry_margin
    assert step["psnr_tighten_db"] == pytest.approx(max(shortfall + margin, step["headroom_db"] + 1e-3))
    from ditopt.optimize import describe_retry

    line = describe_retry(opt.report.retries[0])
    assert f"lower bound {20.0 - shortfall:.2f} dB" in line and f"raised by {step['psnr_tighten_db']:.2f} dB" in line
    report = opt.report.passes[0].report
    assert report["target_psnr_db"] == pytest.approx(20.0 + 1.0 + step["psnr_tighten_db"])
    assert report["computed_steps"] > 2 and report["predicted_psnr_db"] >= report["target_psnr_db"]
    assert opt.report.verification[-1]["passed"]
    # The retry re-uses the PSNR of plans it already sampled instead of sampling them again.
    assert any(not t["sampled"] for t in opt.report.passes[0].report["trials"])


@pytest.mark.parametrize("on_gate_miss", ["raise", "warn", "return"])
def test_a_gate_still_missed_after_the_retries_raises_with_the_fix(held_out_misses, on_gate_miss):
    """Every held-out check misses (bound 3 dB short): by default optimize raises
    QualityGateError naming the bound, the budget and what to change, and hands over the
    flagged model; 'warn' returns it with a QualityGateWarning, 'return' returns it silently."""
    import warnings

    from ditopt.errors import QualityGateError, QualityGateWarning

    calls = held_out_misses(99, 3.0)
    model = AffineDiT(depth=3, scale=1.02).eval()
    profile = {"name": "b", "budget": {"min_psnr_db": 20.0}, "passes": [{"name": "calibrated_schedule", "order": 0}]}
    run = lambda: ditopt.optimize(model, profile, example_inputs=toy_inputs(batch=2), calibration=_sampler(12),  # noqa: E731
                                  max_retries=1, on_gate_miss=on_gate_miss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_gate_miss == "raise":
            with pytest.raises(QualityGateError) as info:
                run()
            opt, message = info.value.optimized, str(info.value)
        else:
            opt = run()
            message = "\n".join(str(w.message) for w in caught if issubclass(w.category, QualityGateWarning))
    assert len(calls) == 2 and opt is calls[-1] and not opt.report.passed
    gate = [w for w in caught if issubclass(w.category, QualityGateWarning)]
    assert len(gate) == (1 if on_gate_miss == "warn" else 0)
    if on_gate_miss == "return":
        from ditopt.optimize import describe_gate_failure

        message = describe_gate_failure(opt.report.to_dict())
    assert "lower bound of the mean PSNR is 17.00 dB" in message and "20.0 dB budget" in message
    assert "after 2 attempts" in message and "max_retries=2" in message and "lower budget.min_psnr_db" in message


def test_on_gate_miss_must_be_known():
    from ditopt.errors import DitoptError

    with pytest.raises(DitoptError, match="on_gate_miss='ignore'"):
        ditopt.optimize(AffineDiT(depth=2).eval(), "identity", example_inputs=toy_inputs(), on_gate_miss="ignore")


def test_feature_forecast_recomputes_gate_by_hand():
    """TaylorSeer target='features': on a forecast step each block adds gate(t_now) * F(t_computed)."""
    from conftest import build_model, make_inputs

    model = build_model("plain")
    kw = make_inputs("plain", model)
    opt = ditopt.optimize(
        model, _profile(name="taylor_forecast", order=0, interval=2, warmup=1, target="features"), example_inputs=kw, num_steps=2
    )
    program = opt.programs[0]
    forecast = program.segment("block.0:forecast").module.graph
    targets = {n.target for n in forecast.nodes if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets  # attention dropped
    assert torch.ops.aten.linear.default in targets  # adaLN modulation still computed
    plain_targets = {n.target for n in program.segment("block.0").module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default in plain_targets  # original untouched

    recorded = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, key=(i, part): recorded.__setitem__(key, out))
        for i, blk in enumerate(model.blocks) for part, m in (("attn", blk.attn), ("mlp", blk.mlp))
    ]
    x0, x1 = kw["x"], kw["x"] * 0.5 + 0.1
    t0, t1 = torch.tensor([500.0]), torch.tensor([480.0])
    with torch.no_grad():
        model(x0, t0, kw["y"])  # fills `recorded` with the step-0 features
        for h in hooks:
            h.remove()
        opt(x=x0, t=t0, y=kw["y"])
        out = opt(x=x1, t=t1, y=kw["y"])  # forecast step
        # By hand: prologue at t1, then per block x += gate(t1) * F(t0), then the final layer at t1.
        h = model.x_embedder(x1).flatten(2).transpose(1, 2) + model.pos_embed[:, :16]
        c = model.t_embedder(t1) + model.y_embedder(kw["y"])
        for i, blk in enumerate(model.blocks):
            _, _, gate_msa, _, _, gate_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
            h = h + gate_msa.unsqueeze(1) * recorded[(i, "attn")]
            h = h + gate_mlp.unsqueeze(1) * recorded[(i, "mlp")]
        expected = model.unpatchify(model.final_layer(h, c), 4, 4)
    assert torch.allclose(out, expected, atol=1e-5)
    assert opt.last_record["cached"] == ["block.0", "block.1", "block.2"]


def _feature_stage(opt):
    from ditopt.passes.caching.features import FeatureForecast

    return next(s for s in opt.programs[0].plan if isinstance(s, FeatureForecast))


@pytest.mark.parametrize("arch,stacked", [("dit", True), ("pixart", True), ("plain", True), ("flux", False), ("sd3", False)])
def test_feature_forecast_stacks_additive_blocks_and_matches_the_per_block_path(arch, stacked):
    """DiT / PixArt blocks add gate * feature to one stream, so a skipped step forecasts the whole
    stack in one product per Taylor term; two-stream blocks (FLUX, SD3) keep the per-block path.
    Both paths give the same samples."""
    import dataclasses

    from conftest import build_model, make_inputs

    model = build_model(arch)
    kw = make_inputs(arch, model, batch=2)
    profile = _profile(name="taylor_forecast", order=2, interval=3, warmup=2, target="features")
    opt = ditopt.optimize(model, profile, example_inputs=kw, num_steps=8)
    stage = _feature_stage(opt)
    program = opt.programs[0]
    gates = [s for s in program.segments if s.name.endswith(":gates")]
    assert (stage.additive is not None) == stacked == bool(gates)
    assert opt.report.passes[0].report["stages"][0]["stacked_forecast"] == stacked
    if not stacked:
        return
    assert [f.stream_in for f in stage.additive[1:]] == [f.stream_out for f in stage.additive[:-1]]
    for seg, form in zip(gates, stage.additive):  # the modulation only: no attention, no stream, no features
        targets = {n.target for n in seg.module.graph.nodes if n.op == "call_function"}
        assert torch.ops.aten.scaled_dot_product_attention.default not in targets
        assert form.stream_in not in seg.inputs and not any(i.endswith("__forecast") for i in seg.inputs)
        assert seg.outputs == tuple(g for g in form.gates if g is not None)
    per_block = ditopt.optimize(model, profile, example_inputs=kw, num_steps=8)
    plan = list(per_block.programs[0].plan)
    i = plan.index(_feature_stage(per_block))
    plan[i] = dataclasses.replace(plan[i], additive=None)
    per_block.programs[0].plan = tuple(plan)
    tkey = next(k for k in kw if k in ("timestep", "t"))
    g = torch.Generator().manual_seed(1)
    skipped = 0
    with torch.no_grad():
        for step in range(8):
            call = {**kw, tkey: torch.full_like(kw[tkey], 900 - 110 * step)}
            latent = next(k for k in ("hidden_states", "x") if k in kw)
            call[latent] = torch.randn(kw[latent].shape, generator=g)
            a, b = opt(**call), per_block(**call)
            a, b = (getattr(v, "sample", v) for v in (a, b))
            a, b = (v[0] if isinstance(v, tuple) else v for v in (a, b))
            assert opt.last_record.get("cached") == per_block.last_record.get("cached")
            skipped += bool(opt.last_record.get("cached"))
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), step
    assert skipped >= 4


def test_feature_forecast_does_not_fire_without_projections():
    model = AffineDiT(depth=2).eval()  # blocks without attention-output / FFN projections
    opt = _opt(model, dict(name="taylor_forecast", target="features"), num_steps=4)
    assert opt.report.passes[0].modified is False
    assert "no attention-output" in opt.report.passes[0].report["skipped"]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_cache_matches_the_finite_difference_taylor_formula_on_uneven_steps(order):
    # TaylorSeer: d1 = (f(t2) - f(t1)) / (t2 - t1), d2 = (d1 - d1_prev) / (t2 - t1), forecast
    # f(t2) + d1 dt + d2 dt^2 / 2, written out by hand here against the cache's fused updates.
    from ditopt.passes.caching import TaylorCache

    g = torch.Generator().manual_seed(order)
    c = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]

    def f(t):
        return c[0] + c[1] * (t / 1000) + c[2] * (t / 1000) ** 2

    ts = (981.0, 940.0, 861.0)
    cache = TaylorCache(order)
    for t in ts:
        cache.update([f(t)], t)
    d1 = (f(ts[2]) - f(ts[1])) / (ts[2] - ts[1])
    d1_prev = (f(ts[1]) - f(ts[0])) / (ts[1] - ts[0])
    d2 = (d1 - d1_prev) / (ts[2] - ts[1])
    for t in (840.0, 790.5, 700.0):
        dt = t - ts[2]
        expected = f(ts[2]) + (d1 * dt if order >= 1 else 0) + (d2 * dt**2 / 2 if order >= 2 else 0)
        (pred,) = cache.predict(t)
        torch.testing.assert_close(pred, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache.factors[order][0], [f(ts[2]), d1, d2][order], rtol=1e-10, atol=1e-12)
    # order 1 is exact on a linear trajectory; forecasting leaves the cache untouched
    if order == 1:
        lin = TaylorCache(1)
        for t in ts:
            lin.update([c[0] + c[1] * t], t)
        torch.testing.assert_close(lin.predict(123.0)[0], c[0] + c[1] * 123.0, rtol=1e-10, atol=1e-9)
    before = cache.diffs[0][0].clone()
    cache.predict(500.0)
    torch.testing.assert_close(cache.diffs[0][0], before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Fitted forecasts (calibrated_schedule forecast="fitted")
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_weights_are_the_taylor_cache_forecast(order):
    from ditopt.passes.caching.stage import ForecastHistory, TaylorCache, taylor_weights

    g = torch.Generator().manual_seed(10 + order)
    times = [981.0, 940.0, 861.0]
    values = [torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in times]
    taylor, history = TaylorCache(order), ForecastHistory(3)
    for v, t in zip(values, times):
        taylor.update([v], t)
        history.update([v], t)
    for t in (840.0, 700.0):
        (expected,) = taylor.predict(t)
        w = taylor_weights(times[-(order + 1):], t, order)
        by_hand = sum(wj * v for wj, v in zip(w, values[::-1]))
        torch.testing.assert_close(by_hand, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(history.taylor(t, order)[0], expected, rtol=1e-10, atol=1e-10)


def test_forecast_history_applies_scalar_and_per_channel_weights_by_hand():
    from ditopt.passes.caching.stage import ForecastHistory

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    text_a, text_b = torch.randn(2, 5, 2, generator=g), torch.randn(2, 5, 2, generator=g)
    h = ForecastHistory(2)
    h.update([a, text_a], 1.0)
    h.update([b, text_b], 0.5)  # most recent first: b, then a
    img, txt = h.predict(((0.5, 2.0, -1.0), (0.25, 0.25, 0.25)))
    torch.testing.assert_close(img, b * torch.tensor([0.5, 2.0, -1.0]) + a * 0.25)
    # The text stream has 2 channels, not 3: it gets the mean weight of each history step.
    torch.testing.assert_close(txt, text_b * 0.5 + text_a * 0.25)
    scalar, _ = h.predict(((1.5,),))
    torch.testing.assert_close(scalar, 1.5 * b)
    before = b.clone()
    h.predict(((3.0,), (1.0,)))
    assert torch.equal(b, before)  # forecasting leaves the cached values alone
    with pytest.raises(ValueError, match="3 forecast weights for 2 cached steps"):
        h.predict(((1.0,), (1.0,), (1.0,)))
    # With a base per leading value (the skipped span's inputs), the forecast is added in the
    # same pass; values beyond the bases (unpaired outputs) are forecast alone.
    base = torch.randn(2, 4, 3, generator=g)
    base_before = base.clone()
    weights = ((0.5, 2.0, -1.0), (0.25, 0.25, 0.25))
    img_b, txt_b = h.predict(weights, base=[base])
    torch.testing.assert_close(img_b, base_before + img)
    torch.testing.assert_close(txt_b, txt)
    assert torch.equal(base, base_before)
    (scalar_b,) = h.predict(((1.5,),), base=[base])[:1]
    torch.testing.assert_close(scalar_b, base + 1.5 * b)


def test_fit_recovers_per_channel_geometric_decay_that_one_weight_cannot():
    from ditopt.passes.caching.schedule import fit_forecast_weights, weighted_forecast_errors

    # Channel c decays by rate[c] per step: R[s] = rate^s * v. One weight per channel and step
    # forecasts this exactly from the last computed step; one weight per step cannot.
    steps, k, channels = 8, 64, 4
    g = torch.Generator().manual_seed(0)
    rate = torch.tensor([0.5, 0.8, 1.0, 1.3])
    col_channel = torch.arange(k) % channels
    v = torch.randn(6, k, generator=g)
    residual = torch.stack([rate[col_channel] ** s * v for s in range(steps)], 1)  # [traj, steps, k]
    mask = [True, True, False, True, False, False, True, False]
    times = [float(steps - s) for s in range(steps)]
    per_channel = fit_forecast_weights(residual, mask, times, 1, col_channel, channels, ridge=0.0)
    shared = fit_forecast_weights(residual, mask, times, 1, ridge=0.0)
    # step 4 is two steps after computed step 3: weight rate^1, step 5: rate^2
    torch.testing.assert_close(torch.tensor(per_channel[4][0]), rate, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(per_channel[5][0]), rate**2, rtol=1e-6, atol=1e-6)
    assert per_channel[3] == () and len(shared[4][0]) == 1
    exact = weighted_forecast_errors(residual, per_channel, col_channel)
    assert float(exact.max()) < 1e-5
    assert float(weighted_forecast_errors(residual, shared).max()) > 0.05


def test_fitted_schedule_forecasts_the_weighted_sum_by_hand():
    model = AffineDiT(depth=2, scale=1.05).eval()  # residual 0.1025 x + t W: not polynomial along the trajectory
    cfg = dict(name="calibrated_schedule", computed_steps=4, warmup=2, order=1, history=2)
    opt = ditopt.optimize(model, _profile(**cfg), example_inputs=toy_inputs(batch=2), calibration=_sampler(8))
    policy = opt.programs[0].plan[1].policy
    assert opt.report.passes[0].report["forecast"] == "fitted"
    computed = [s for s, c in enumerate(policy.compute) if c]
    assert len(computed) == 4
    times = [1.0 - i / 8 for i in range(8)]
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 4, 8, generator=g) for _ in times]
    residuals: dict[int, torch.Tensor] = {}
    for s, (x, t) in enumerate(zip(xs, times)):
        out = _call(opt, x, t)
        with torch.no_grad():
            true = model(x=x, timestep=torch.full((2,), t))
        if policy.compute[s]:
            assert torch.allclose(out, true, atol=1e-6)
            residuals[s] = true - x
            continue
        hist = [c for c in computed if c < s][::-1][: len(policy.weights[s])]
        expected = x + sum(torch.tensor(w) * residuals[c] for w, c in zip(policy.weights[s], hist))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert len(policy.weights[s][0]) == 8  # one weight per channel of the stream
    # The fitted forecast is closer to the model than Taylor on the same schedule (calibration inputs).
    taylor = ditopt.optimize(model, _profile(**cfg, forecast="taylor"), example_inputs=toy_inputs(batch=2), stats=opt.stats)
    ref = _sampler(8)(model)
    assert (_sampler(8)(opt) - ref).norm() < (_sampler(8)(taylor) - ref).norm()


def test_span_schedules_each_span_its_own_steps():
    model = AffineDiT(depth=4, scale=1.05).eval()
    stats = ditopt.optimize(model, _profile(name="calibrated_schedule", computed_steps=4, warmup=2, order=1),
                            example_inputs=toy_inputs(batch=2), calibration=_sampler(8)).stats
    spans = dict(name="calibrated_schedule", forecast="taylor", order=1, span_starts=[1])
    split = ditopt.optimize(model, _profile(**spans, span_compute_steps=[[0, 1, 2, 4, 6], [0, 1, 3, 5, 7]]),
                            example_inputs=toy_inputs(batch=2), stats=stats)
    plan = split.programs[0].plan
    assert [type(s) for s in plan] == [RunSegments, CachedSpan, CachedSpan, RunSegments]
    assert plan[1].blocks == ("block.0",) and plan[2].blocks == ("block.1", "block.2", "block.3")
    assert plan[1].policy.compute == (True, True, True, False, True, False, True, False)
    assert plan[2].policy.compute == (True, True, False, True, False, True, False, True)
    assert split.report.passes[0].report["block_evaluations"] == 1 * 5 + 3 * 5
    # Each step forecasts the span its mask skips; the other span computes (on step 3, the
    # rear blocks compute on the front block's forecast output).
    cached = []
    for s in range(8):
        _call(split, torch.randn(2, 4, 8), 1.0 - s / 8)
        cached.append(split.last_record.get("cached", []))
    rear, front = ["block.1", "block.2", "block.3"], ["block.0"]
    assert cached == [[], [], rear, front, rear, front, rear, front]
    # The same steps in every span: the Taylor forecasts add up to the whole stack's forecast.
    same = [[0, 1, 3, 5, 7]] * 2
    both = ditopt.optimize(model, _profile(**spans, span_compute_steps=same), example_inputs=toy_inputs(batch=2), stats=stats)
    whole = ditopt.optimize(model, _profile(name="calibrated_schedule", forecast="taylor", order=1, compute_steps=same[0]),
                            example_inputs=toy_inputs(batch=2), stats=stats)
    torch.testing.assert_close(_sampler(8)(both), _sampler(8)(whole), rtol=1e-5, atol=1e-5)
    assert (_sampler(8)(split) - _sampler(8)(whole)).abs().max() > 1e-4  # other steps, other samples
    for bad, match in (({"span_compute_steps": same[:1]}, "one tuple per span"),
                       ({"span_compute_steps": same, "span_starts": [4]}, "must rise strictly"),
                       ({"span_compute_steps": None}, "go together"),
                       ({"span_compute_steps": same, "computed_steps": 3}, "replaces compute_steps")):
        with pytest.raises(InvalidProfileError, match=match):
            ditopt.optimize(model, _profile(**{**spans, **bad}), example_inputs=toy_inputs(batch=2), stats=stats)


def test_span_policies_share_one_protocol_and_round_trip_through_artifact_specs():
    """CachedSpan asks its policy (decide / forecast / cond_only_now / to_spec) instead of testing
    its type: every registered policy type implements the protocol and survives its spec."""
    from ditopt.passes.caching.stage import POLICY_TYPES, ConfidenceGate, ProbeGate, StaticSchedule, policy_from_spec, policy_spec

    policies = [
        StaticSchedule((True, True, False, True), (1.0, 0.75, 0.5, 0.25), "error", ((), (), ((0.5, 1.5), (0.25, -0.25)), ()),
                       (False, False, False, True), 0),
        ProbeGate(0.05, 2, 3),
        ConfidenceGate(0.125, 3, 6),
    ]
    assert {type(p).type for p in policies} == set(POLICY_TYPES)
    for policy in policies:
        spec, tensors = policy_spec(policy, "k.")
        assert spec["type"] == policy.type
        assert policy_from_spec(spec, tensors) == policy
    assert policies[0].computed_steps() == 3 and policies[0].uses_second_half()
    assert policies[1].computed_steps() is None and policies[1].needs_probe and not policies[0].needs_probe
    with pytest.raises(ValueError, match="unknown cache policy type 'oracle'"):
        policy_from_spec({"type": "oracle"}, {})
