"""Depth pruning (issue 30): importance measured on calibration replay, the linear bridge, the
budget search over (blocks, full steps), must-not-fire, bad input, and the user's model."""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import AffineDiT, euler_sampler, toy_inputs

import ditopt
from ditopt.errors import CalibrationError, InvalidProfileError
from ditopt.export import export_artifact, load_artifact

STEPS = 16


def _sampler(steps: int = STEPS, samples: int = 4, seed: int = 0, per_call: int = 2):
    x0 = torch.randn(samples, 4, 8, generator=torch.Generator().manual_seed(seed))
    loops = [euler_sampler(x0[i : i + per_call], [1.0 - j / steps for j in range(steps)])
             for i in range(0, samples, per_call)]
    return lambda model: torch.cat([loop(model) for loop in loops])


def _model(scale: float = 1.0, w_scales=(1.0, 1.0, 0.0, 1.0)) -> AffineDiT:
    """AffineDiT whose block i adds t * w_i * w_scales[i]: w_scales[i] = 0 makes block i the
    identity (scale 1) or exactly linear (scale != 1)."""
    model = AffineDiT(depth=len(w_scales), scale=scale).eval()
    with torch.no_grad():
        for block, s in zip(model.blocks, w_scales):
            block.w.mul_(s)
    return model


def _profile(budget=None, **cfg):
    return {"name": "prune", "budget": budget or {"max_rel_err": 1.0}, "passes": [{"name": "layer_prune", **cfg}]}


def _optimize(model, budget=None, validation=None, **cfg):
    return ditopt.optimize(model, _profile(budget, **cfg), example_inputs=toy_inputs(batch=2), calibration=_sampler(),
                           validation=validation)


def _prune(opt):
    record = next(r for r in opt.report.passes if r.name == "layer_prune")
    return record


def test_identity_block_is_measured_least_important_and_removed_first():
    model = _model(w_scales=(1.0, 0.5, 0.0, 2.0))
    opt = _optimize(model, ratio=0.25, bridge="none")
    record = _prune(opt)
    assert record.applied and record.report["removed"] == [2]
    first = record.report["order"][0]
    assert first["block"] == 2 and first["rel_sq_err"] < 1e-10
    # The other blocks were measured too, and each costs more than the identity one.
    assert all(err > 1e-4 for b, err in first["alone"].items() if b != "2")
    # Graph before and after: the removed block's segment passes its stream through.
    graph = opt.programs[0]
    seg = graph.segment_for_block(2)
    assert not any(n.op == "get_attr" for n in seg.module.graph.nodes)
    assert record.report["parameters_after"] == record.report["parameters_before"] - 8
    # Numerically the original model: the block was the identity.
    kwargs = toy_inputs(batch=2, t=0.37)
    kwargs["x"] = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(opt(**kwargs), model(**kwargs))


def test_linear_bridge_is_exact_on_a_linear_interval():
    # Blocks 1 and 2 compute 0.9 x (no timestep term): the interval [1, 2] is the linear map 0.81 x.
    model = _model(scale=0.9, w_scales=(1.0, 0.0, 0.0, 1.0))
    bridged = _prune(_optimize(model, blocks=[1, 2], bridge="linear", ridge=0.0))
    plain = _prune(_optimize(model, blocks=[1, 2], bridge="none"))
    assert bridged.report["intervals"] == [[1, 2]]
    assert bridged.report["replayed_error"]["rel_sq_err"] < 1e-9
    assert plain.report["replayed_error"]["rel_sq_err"] > 1e-2
    opt = _optimize(model, blocks=[1, 2], bridge="linear", ridge=0.0)
    kwargs = {"x": torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(9)), "timestep": torch.tensor([0.3, 0.8])}
    with torch.no_grad():
        torch.testing.assert_close(opt(**kwargs), model(**kwargs), rtol=1e-4, atol=1e-4)


def test_search_removes_no_more_as_the_budget_tightens():
    model = _model(w_scales=(1.0, 0.1, 0.01, 0.3))
    saved = []  # block-steps removed per generation (the toy's blocks all cost the same)
    for floor in (15.0, 25.0, 40.0, 200.0):
        record = _prune(_optimize(model, budget={"min_psnr_db": floor}, validation=_sampler(seed=1)))
        rep = record.report
        assert rep["trials"], "the search measured nothing"
        if record.modified:
            assert rep["predicted_psnr_db"] >= rep["target_psnr_db"]
            saved.append(len(rep["removed"]) * (STEPS - rep["full_steps"]))
        else:
            saved.append(0)
    assert saved == sorted(saved, reverse=True), saved  # never more removed as the floor rises
    assert saved[0] > 0 and saved[-1] == 0  # a loose floor prunes, an impossible one does not


def test_unmeetable_budget_removes_nothing_and_says_so():
    model = _model(w_scales=(1.0, 1.0, 1.0, 1.0))
    opt = _optimize(model, budget={"min_psnr_db": 200.0}, validation=_sampler(seed=1))
    record = _prune(opt)
    assert not record.modified and "nothing removed" in record.report["skipped"]
    assert all(seg.module.code == orig.module.code for seg, orig in
               zip(opt.programs[0].segments, ditopt.capture(model, toy_inputs(batch=2)).segments))


def test_single_block_model_is_not_pruned():
    record = _prune(_optimize(_model(w_scales=(1.0,)), blocks=None, ratio=0.5))
    assert not record.modified and "two or more" in record.report["skipped"]


def test_step_ranged_removal_runs_the_original_on_the_first_steps():
    model = _model(w_scales=(1.0, 1.0, 1.0, 1.0))
    opt = _optimize(model, blocks=[3], bridge="none", full_steps=4)
    record = _prune(opt)
    assert record.report["full_steps"] == 4
    graph = opt.programs[0]
    assert [r.block for r in graph.early_steps] == [3]
    # On the first steps the block is the original's, afterwards it is passed through.
    assert graph.at_step(0).segment_for_block(3).module.code == ditopt.capture(model, toy_inputs(batch=2)).segment_for_block(3).module.code
    assert graph.at_step(4).segment_for_block(3).module.code == graph.segment_for_block(3).module.code
    with pytest.raises(Exception, match="full_steps=0 in layer_prune"):
        export_artifact(opt, "/nonexistent-never-written/artifact")


@pytest.mark.parametrize("cfg, match", [
    ({"blocks": [7]}, "no 7"),
    ({"blocks": [0, 1, 2, 3]}, "removes every block"),
    ({"blocks": [1], "full_steps": STEPS}, "never be removed"),
])
def test_bad_blocks_are_named_errors(cfg, match):
    with pytest.raises(InvalidProfileError, match=match):
        _optimize(_model(), bridge="none", **cfg)


@pytest.mark.parametrize("cfg, match", [
    ({"ratio": 1.0}, "ratio"),
    ({"ratio": 0.0}, "ratio"),
    ({"blocks": [1], "ratio": 0.5}, "not both"),
    ({"blocks": [-1]}, "0 or more"),
    ({"blocks": [1, 1]}, "blocks"),
])
def test_bad_configs_fail_at_profile_load(cfg, match):
    with pytest.raises(InvalidProfileError, match=match):
        ditopt.load_profile(_profile(**cfg))


def test_measuring_needs_calibration():
    with pytest.raises(CalibrationError, match="calibration"):
        ditopt.optimize(_model(), _profile(ratio=0.25), example_inputs=toy_inputs(batch=2))
    # Explicit blocks without a bridge need none.
    opt = ditopt.optimize(_model(), _profile(blocks=[2], bridge="none"), example_inputs=toy_inputs(batch=2))
    assert _prune(opt).report["removed"] == [2]


def test_user_model_untouched_and_pruned_export_matches_runtime(tmp_path):
    model = _model(scale=0.9, w_scales=(1.0, 0.5, 0.2, 1.0))
    before = copy.deepcopy(model.state_dict())
    opt = _optimize(model, blocks=[1, 2], bridge="linear")
    kwargs = {"x": torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3)), "timestep": torch.tensor([0.6, 0.6])}
    with torch.no_grad():
        got = opt(**kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(list(model.blocks)) == 4
    runner = load_artifact(export_artifact(opt, tmp_path / "artifact"))
    torch.testing.assert_close(runner(**kwargs), got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["dit", "pixart", "sd3", "flux", "wan", "plain"])
def test_real_architectures_prune_with_a_conditioned_bridge(arch):
    """On each real block type: removing the last block with the linear bridge saves its
    multiply-adds and weights, the bridge reads the block's adaLN modulation where the block had
    one, and the replayed error is what the pruned graph computes on the calibration inputs."""
    from conftest import arch_sampler, build_model, make_inputs

    model = build_model(arch)
    kw = make_inputs(arch, model, batch=2)
    before = copy.deepcopy(model.state_dict())
    last = len(ditopt.capture(model, kw).block_segments) - 1
    profile = {"name": "p", "budget": {"max_rel_err": 1.0}, "passes": [{"name": "layer_prune", "blocks": [last], "bridge": "linear"}]}
    opt = ditopt.optimize(model, profile, example_inputs=kw, calibration=arch_sampler(kw))
    rep = _prune(opt).report
    assert rep["removed"] == [last] and rep["intervals"] == [[last]]
    bridge = rep["bridges"][0]
    assert bridge["interval"] == [last] and bridge["fitted_streams"] >= 1
    # The bridge reads the adaLN modulation wherever capture found one (all but Wan's, whose
    # scale-shift table capture does not recognise as modulation yet).
    modulated = bool(ditopt.capture(model, kw).blocks[last].modulation)
    assert modulated == (arch != "wan")
    assert bridge["conditioned"] == modulated
    assert rep["macs_after"] < rep["macs_before"] and rep["parameters_after"] < rep["parameters_before"]
    assert 0.0 <= rep["replayed_error"]["rel_sq_err"] < float("inf")
    seg = opt.programs[0].segment_for_block(last)
    names = {n.name for n in seg.module.graph.nodes}
    assert not any("attention" in n for n in names)  # the block's attention is gone from its segment
    with torch.no_grad():
        out = opt(**kw)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    assert torch.isfinite(out).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_calibration_batch_larger_than_the_captured_one():
    # The zoo calibrates 20 samples per call with a captured batch of 4: the replay re-batches the
    # recorded rows to the graph's batch (per-sample values follow the latent's rows).
    model = _model(w_scales=(1.0, 0.5, 0.0, 2.0))
    opt = ditopt.optimize(model, _profile(ratio=0.25, bridge="linear"), example_inputs=toy_inputs(batch=2),
                          calibration=_sampler(samples=8, per_call=4))
    assert _prune(opt).report["removed"] == [2]


def test_distillation_lowers_the_held_out_error_and_leaves_the_model_alone():
    # Block 1 removed without a bridge: its t * w_1 term is missing, and the kept blocks beside
    # it (0 before, 2 after) can absorb it. A few Adam steps lower the held-out block-wise error
    # and the replayed output error; the user's model is untouched; the same seed, the same result.
    model = _model(w_scales=(1.0, 0.5, 0.3, 1.0))
    before = copy.deepcopy(model.state_dict())
    runs = [_prune(_optimize(model, blocks=[1], bridge="none", distill_steps=40, distill_lr=1e-2)) for _ in range(2)]
    rep = runs[0].report
    fit = rep["distillation"]["fits"][0]
    assert fit["intervals"] == [[1]] and fit["trained"] == ["block0", "block2"] and fit["steps"] == 40
    assert fit["held_out_after"] < 0.1 * fit["held_out_before"], fit
    assert rep["replayed_error"]["rel_sq_err"] < 0.1 * rep["replayed_error_before_distill"]["rel_sq_err"]
    assert rep["distillation"]["seconds"] >= 0 and "rows" in rep["distillation"]
    assert runs[1].report["distillation"]["fits"][0]["held_out_after"] == fit["held_out_after"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distilled_bridge_at_the_end_trains_the_bridge_and_the_kept_block_before_it(tmp_path):
    # The last block removed with the linear bridge: the fit trains the bridge and block 2 (the
    # toy has no epilogue weights); it never ends worse than the bridge alone on the held-out
    # part, the pruned model replays at another batch and exports to the same numbers.
    model = _model(w_scales=(1.0, 0.5, 0.3, 1.0))
    before = copy.deepcopy(model.state_dict())
    opt = _optimize(model, blocks=[3], bridge="linear", distill_steps=20, distill_lr=1e-3)
    rep = _prune(opt).report
    fit = rep["distillation"]["fits"][0]
    assert fit["trained"] == ["block2", "bridge3"]
    assert fit["held_out_after"] <= fit["held_out_before"]
    other = {"x": torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(4)), "timestep": torch.tensor([0.2, 0.5, 0.9])}
    kwargs = {"x": other["x"][:2], "timestep": other["timestep"][:2]}
    with torch.no_grad():
        got, wide = opt(**kwargs), opt(**other)
    torch.testing.assert_close(wide[:2], got, rtol=1e-4, atol=1e-5)  # the fitted tensors at any batch
    runner = load_artifact(export_artifact(opt, tmp_path / "artifact"))
    torch.testing.assert_close(runner(**kwargs), got, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distill_steps_without_calibration_is_a_named_error():
    from ditopt.passes.pruning.layer_prune import LayerPruneConfig
    from ditopt.registry import PassContext, get_pass

    model = _model()
    before = copy.deepcopy(model.state_dict())
    # Explicit blocks without a bridge need no statistics; distillation does, and optimize says so.
    with pytest.raises(CalibrationError, match="calibration=fn"):
        ditopt.optimize(model, _profile(blocks=[2], bridge="none", distill_steps=5), example_inputs=toy_inputs(batch=2))
    # The pass itself, given no recorded block inputs, names the option and both fixes.
    graph = ditopt.capture(model, toy_inputs(batch=2))
    config = LayerPruneConfig(blocks=(2,), bridge="none", distill_steps=5)
    with pytest.raises(CalibrationError, match="distill_steps = 5.*calibration=fn.*distill_steps = 0"):
        get_pass("layer_prune").apply(graph, config, PassContext(model=model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distillation_of_the_whole_stack_trains_every_kept_block():
    model = _model(w_scales=(1.0, 0.5, 0.3, 1.0))
    rep = _prune(_optimize(model, blocks=[1], bridge="none", distill_steps=40, distill_lr=1e-2,
                           distill_scope="all")).report
    fit = rep["distillation"]["fits"][0]
    assert rep["distillation"]["scope"] == "all" and fit["trained"] == ["block0", "block2", "block3"]
    assert fit["held_out_after"] < 0.1 * fit["held_out_before"], fit
    assert rep["replayed_error"]["rel_sq_err"] < rep["replayed_error_before_distill"]["rel_sq_err"]
