"""The budget is judged on samples the search did not see (issue 28): a split calibration run,
derived held-out seeds, or validation=; otherwise the budget is reported unverified."""

from __future__ import annotations

import pytest
import torch
from toy_models import AffineDiT, euler_sampler, toy_inputs

import ditopt
from ditopt.errors import CalibrationError, DitoptError, InputMismatchError, QualityGateError, UnsupportedModelError
from ditopt.verify import verify_end_to_end

STEPS = 12
SCHEDULE = {"name": "b", "budget": {"min_psnr_db": 30.0}, "passes": [{"name": "calibrated_schedule", "order": 0}]}


def _batched_sampler(x0: torch.Tensor):
    """Samples every row of x0, two rows per generation (the example batch)."""
    times = [1.0 - j / STEPS for j in range(STEPS)]
    loops = [euler_sampler(x0[i : i + 2], times) for i in range(0, x0.shape[0], 2)]
    return lambda model: torch.cat([loop(model) for loop in loops])


def _uneven_sampler():
    """Even rows easy, odd rows 30x larger (so ~30 dB worse under the same schedule)."""
    x0 = torch.randn(8, 4, 8, generator=torch.Generator().manual_seed(0))
    x0[1::2] *= 30.0
    return _batched_sampler(x0)


def test_in_sample_verification_would_pass_and_the_held_out_check_does_not():
    model = AffineDiT(depth=3, scale=1.02).eval()
    calibration = _uneven_sampler()
    opt = ditopt.optimize(model, SCHEDULE, example_inputs=toy_inputs(batch=2), calibration=calibration,
                          max_retries=0, on_gate_miss="return")
    search = opt.report.passes[0].report
    assert search["predicted_psnr_db"] >= 30.0  # what the search saw: the even rows
    check = opt.report.verification[-1]
    assert check["details"][0]["rows"] == [1, 3, 5, 7] and "held-out half" in check["details"][0]["samples_from"]
    assert check["details"][1]["search_trajectories"] == 4 and check["details"][1]["held_out_trajectories"] == 4
    assert not check["passed"] and float(check["psnr_lower_db"]) < 30.0 and not opt.report.passed
    # The old, in-sample verdict (the rows the search judged on) would have passed the same model.
    in_sample = verify_end_to_end(calibration, opt.stats.reference_samples, opt, 30.0, 0.9, rows=[0, 2, 4, 6])
    assert in_sample.passed and in_sample.psnr_lower_db >= 30.0
    with pytest.raises(QualityGateError, match="lower bound"):
        ditopt.optimize(model, SCHEDULE, example_inputs=toy_inputs(batch=2), calibration=calibration, max_retries=0)


def test_the_search_fits_only_on_the_search_samples_trajectories():
    model = AffineDiT(depth=3, scale=1.02).eval()
    graph = ditopt.capture(model, toy_inputs(batch=2))
    from ditopt.calibration import calibrate

    stats = calibrate(model, graph, ["trajectory"], _uneven_sampler(), progress=False)
    assert stats.trajectory_samples(8) == list(range(8))
    kept = stats.restricted_to_samples([0, 2, 4, 6], 8)
    full = stats.tensors["block_residual_sketch"]
    assert kept.meta["trajectories"] == 4 and torch.equal(kept.tensors["block_residual_sketch"], full[[0, 2, 4, 6]])
    assert torch.equal(kept.reference_samples, stats.reference_samples[[0, 2, 4, 6]])
    assert stats.trajectory_samples(5) is None and stats.restricted_to_samples([0], 5) is None  # batching unknown


def test_batched_cfg_rows_map_to_one_sample():
    from ditopt.calibration import CalibStats

    stats = CalibStats("h", "M", 2, [1.0, 0.5], meta={"trajectory_layout": [[0, 0, 4], [1, 0, 4]]})
    # Two generations of 4 rows = [uncond x2; cond x2] each: 4 samples.
    assert stats.trajectory_samples(4) == [0, 1, 0, 1, 2, 3, 2, 3]
    assert stats.trajectory_samples(8) == list(range(8))


def test_a_budget_with_nothing_to_check_it_on_is_unverified():
    model = AffineDiT(depth=3, scale=1.02).eval()
    profile = {"name": "u", "budget": {"min_psnr_db": 30.0}, "passes": [{"name": "residual_cache", "interval": 2}]}
    with pytest.raises(QualityGateError, match="unverified"):
        ditopt.optimize(model, profile, example_inputs=toy_inputs(), num_steps=4)
    opt = ditopt.optimize(model, profile, example_inputs=toy_inputs(), num_steps=4, on_gate_miss="return")
    check = opt.report.verification[-1]
    assert not opt.report.passed and check["kind"] == "end-to-end" and "validation=" in check["details"][0]["unverified"]
    # Two calibration samples cannot be split into search and held-out halves.
    two = _batched_sampler(torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)))
    few = ditopt.optimize(model, SCHEDULE, example_inputs=toy_inputs(batch=2), calibration=two, on_gate_miss="return")
    assert not few.report.passed and "too few" in few.report.verification[-1]["details"][0]["unverified"]
    # Without a PSNR budget nothing was promised: no end-to-end check, nothing flagged.
    plain = ditopt.optimize(model, {**profile, "budget": {"max_rel_err": 1.0}}, example_inputs=toy_inputs(), num_steps=4)
    assert plain.report.passed and all(v["kind"] != "end-to-end" for v in plain.report.verification)


def test_held_out_seeds_a_sampler_derives_are_used():
    model = AffineDiT(depth=3, scale=1.02).eval()
    calibration_x0 = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    held_x0 = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(3))

    class Sampler:
        def __init__(self, x0, held=None):
            self.run, self.held = _batched_sampler(x0), held

        def __call__(self, model):
            return self.run(model)

        def held_out(self):
            return Sampler(self.held) if self.held is not None else None

    calibration = Sampler(calibration_x0, held=held_x0)
    opt = ditopt.optimize(model, {**SCHEDULE, "budget": {"min_psnr_db": 20.0}}, example_inputs=toy_inputs(batch=2),
                          calibration=calibration, on_gate_miss="return")
    check = opt.report.verification[-1]
    assert check["details"][0]["samples"] == 4 and "Sampler.held_out()" in check["details"][0]["samples_from"]


def test_a_validation_function_that_ignores_its_model_is_an_error():
    model = AffineDiT(depth=3, scale=1.02).eval()
    calibration = _uneven_sampler()
    fixed = calibration(model)
    with pytest.raises(CalibrationError, match="never called the model"):
        ditopt.optimize(model, SCHEDULE, example_inputs=toy_inputs(batch=2), calibration=calibration,
                        validation=lambda m: fixed.clone())


def test_bad_arguments_are_named_errors():
    model = AffineDiT(depth=2).eval()
    with pytest.raises(DitoptError, match="max_retries"):
        ditopt.optimize(model, "identity", example_inputs=toy_inputs(), max_retries=-1)
    with pytest.raises(DitoptError, match="max_retries"):
        ditopt.optimize(model, "identity", example_inputs=toy_inputs(), max_retries=True)
    with pytest.raises(InputMismatchError, match="as a dict"):
        ditopt.optimize(model, "identity", example_inputs=toy_inputs()["x"])
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        ditopt.optimize(lambda x: x, "identity", example_inputs=toy_inputs())
    with pytest.raises(CalibrationError, match="calibration="):
        ditopt.optimize(model, SCHEDULE, example_inputs=toy_inputs(), calibration=[1, 2])


def test_a_model_in_training_mode_with_dropout_is_refused_not_mismatched():
    model = AffineDiT(depth=2).eval()
    model.drop = torch.nn.Dropout(0.5)
    model.drop.train()
    original_forward = type(model).forward
    model.forward = lambda **kw: model.drop(original_forward(model, **kw))
    with pytest.raises(UnsupportedModelError, match=r"model.eval\(\)"):
        ditopt.optimize(model, "identity", example_inputs=toy_inputs())
    assert model.drop.training  # the user's model is left as it was
    model.drop.p = 0.0  # a dropout that does nothing is harmless in training mode
    ditopt.optimize(model, "identity", example_inputs=toy_inputs())


def test_a_diffusers_dit_in_training_mode_is_refused_for_its_label_dropout():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1).train()
    with pytest.raises(UnsupportedModelError, match="training mode.*class_embedder"):
        ditopt.optimize(model, "identity")
    assert model.training


def test_more_bad_arguments():
    model = AffineDiT(depth=2).eval()
    with pytest.raises(DitoptError, match="num_steps"):
        ditopt.optimize(model, "identity", example_inputs=toy_inputs(), num_steps=0)
    with pytest.raises(CalibrationError, match="stats="):
        ditopt.optimize(model, "identity", example_inputs=toy_inputs(), stats="x")
    bad = toy_inputs()
    bad["x"] = bad["x"].clone()
    bad["x"][0, 0, 0] = float("nan")
    with pytest.raises(ditopt.errors.NonFiniteError, match="example_inputs"):
        ditopt.optimize(model, "identity", example_inputs=bad)
