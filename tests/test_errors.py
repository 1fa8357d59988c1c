"""Bad input gets a specific error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_inputs
from torch import nn

import ditopt
from ditopt.errors import (
    CalibrationError,
    InputMismatchError,
    InvalidProfileError,
    MissingInputsError,
    NonFiniteError,
    UnknownPassError,
    UnsupportedModelError,
)


def test_unet_is_not_a_dit():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([1]), "encoder_hidden_states": torch.randn(1, 3, 8)}
    with pytest.raises(UnsupportedModelError, match="block list"):
        ditopt.capture(unet, inputs)


def test_resnet_is_not_a_dit():
    resnet = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with pytest.raises(UnsupportedModelError, match="scaled_dot_product_attention"):
        ditopt.capture(resnet, {"input": torch.randn(1, 3, 8, 8)})


def test_non_diffusers_model_needs_example_inputs():
    with pytest.raises(MissingInputsError, match="example_inputs"):
        ditopt.optimize(build_model("plain"), "identity")


def test_unknown_pass_and_bad_fields():
    with pytest.raises(UnknownPassError, match="no_such_pass"):
        ditopt.load_profile({"name": "x", "passes": [{"name": "no_such_pass"}]})
    with pytest.raises(InvalidProfileError, match="speed"):
        ditopt.load_profile({"name": "x", "speed": 3})
    with pytest.raises(InvalidProfileError, match="interval"):
        ditopt.load_profile({"name": "x", "passes": [{"name": "taylor_forecast", "interval": -1}]})
    with pytest.raises(InvalidProfileError, match="unknown profile"):
        ditopt.load_profile("not-a-preset")


def test_profile_file_round_trip(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "p"\n[budget]\nmin_psnr_db = 31\n[[passes]]\nname = "taylor_forecast"\norder = 1\n')
    prof = ditopt.load_profile(path)
    assert prof.passes[0].config.order == 1 and prof.budget.min_psnr_db == 31
    assert ditopt.Profile.model_validate(prof.dump()) == prof
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "p"\n[[passes]]\nname = "taylor_forecast"\nordr = 1\n')
    with pytest.raises(InvalidProfileError, match="ordr"):
        ditopt.load_profile(bad)


def test_calibrated_pass_without_calibration():
    model = build_model("dit")
    with pytest.raises(CalibrationError, match="calibration=fn"):
        ditopt.optimize(model, "balanced")


def test_nan_input_is_reported():
    model = build_model("dit")
    opt = ditopt.optimize(model, "identity")
    from ditopt.verify import check_finite

    kwargs = make_inputs("dit", model)
    kwargs["hidden_states"] = torch.full_like(kwargs["hidden_states"], float("nan"))
    with torch.no_grad():
        out = opt(**kwargs)
    with pytest.raises(NonFiniteError, match="NaN"):
        check_finite(out, "the optimized model")


# -- profiles: strict values, ranges, files -------------------------------------------------------
def _pass_profile(name, **fields):
    return {"name": "x", "passes": [{"name": name, **fields}]}


@pytest.mark.parametrize("fields, where, hint", [
    ({"interval": True}, r"passes\[0\] \(taylor_forecast\)\.interval = true", "boolean, not a number"),
    ({"interval": 2.0}, r"interval = 2\.0", "write 2, not 2.0"),
    ({"interval": 2.7}, r"interval = 2\.7", "whole number"),
    ({"interval": "3"}, r'interval = "3"', "drop the quotes"),
    ({"order": True}, r"order = true", "boolean"),
])
def test_numbers_are_not_coerced(fields, where, hint):
    """`interval = true` used to read as 1, `2.0` as 2 and `"3"` as 3."""
    with pytest.raises(InvalidProfileError, match=where) as err:
        ditopt.load_profile(_pass_profile("taylor_forecast", **fields))
    assert hint in str(err.value)


@pytest.mark.parametrize("data, field", [
    ({"name": "x", "budget": {"min_psnr_db": True}}, "budget.min_psnr_db"),
    ({"name": "x", "budget": {"min_psnr_db": float("nan")}}, "finite"),
    ({"name": "x", "budget": {"min_psnr_db": float("inf")}}, "finite"),
    ({"name": "x", "budget": {"max_rel_err": "1e-4"}}, "budget.max_rel_err"),
    ({"name": "x", "verify": {"enabled": "yes"}}, "verify.enabled"),
    ({"name": "x", "verify": {"timesteps": 2.0}}, "verify.timesteps"),
    ({"name": "x", "version": "1"}, "version"),
    (_pass_profile("calibrated_schedule", per_channel=1), "per_channel = 1"),
    (_pass_profile("calibrated_schedule", order="2"), 'order = "2"'),
    (_pass_profile("calibrated_schedule", compute_steps=[0, True], order=1, forecast="taylor"), r"compute_steps\[1\] = true"),
    (_pass_profile("block_sparse_attention", compensate="yes"), "compensate"),
    # a config that is not strict itself (another owner's) is still not coerced by the loader
    (_pass_profile("conditioning_memo", min_ops=True), "min_ops = true"),
    (_pass_profile("conditioning_memo", max_key_numel=2.0), "max_key_numel = 2.0"),
])
def test_budget_verify_and_pass_fields_are_strict(data, field):
    with pytest.raises(InvalidProfileError, match=field):
        ditopt.load_profile(data)


def test_ints_are_numbers_where_a_float_is_expected():
    prof = ditopt.load_profile({"name": "x", "budget": {"min_psnr_db": 30, "max_rel_err": 1},
                                "passes": [{"name": "neighborhood_attention", "radius": 2, "min_mass": 1}]})
    assert prof.budget.min_psnr_db == 30.0 and isinstance(prof.budget.min_psnr_db, float)
    assert prof.passes[0].config.min_mass == 1.0


@pytest.mark.parametrize("fields, match", [
    ({"rho": 1.5}, r"rho = 1\.5: should be less than or equal to 1, or 'auto'"),
    ({"rho": 0}, "greater than 0"),
    ({"rho": -0.1}, "greater than 0"),
    ({"rho": float("nan")}, "finite"),
    ({"rho": 0.3}, r"rho = 0\.3 is not one of the fractions calibration measures \(0\.125, 0\.25, 0\.5\)"),
    ({"tile": 0}, "tile = 0"),
    ({"tile": 3}, r"tile = 3 is not one of the tiles calibration measures \(2, 4, 8\)"),
    ({"min_mass": 1.5}, "min_mass"),
    ({"max_cost": 0}, "max_cost"),
    ({"dense_steps": -1}, "dense_steps"),
    ({"blocks": [-1]}, r"blocks\[0\] = -1"),
    ({"blocks": [0, 0]}, "blocks lists 0 more than once"),
    ({"blocks": []}, "blocks is empty"),
])
def test_block_sparse_values_out_of_range_are_refused_at_load(fields, match):
    """rho out of (0, 1] or off the calibrated grid used to be accepted and the pass reported as
    applied (every layer then stayed dense)."""
    with pytest.raises(InvalidProfileError, match=match):
        ditopt.load_profile(_pass_profile("block_sparse_attention", **fields))


@pytest.mark.parametrize("radius, match", [(-1, "greater than or equal to 0"), (0, "radii calibration measures"),
                                           (4, r"\(1, 2, 3\)"), (True, "boolean"), ("1", "drop the quotes")])
def test_neighborhood_radius_out_of_range_is_refused_at_load(radius, match):
    with pytest.raises(InvalidProfileError, match=match):
        ditopt.load_profile(_pass_profile("neighborhood_attention", radius=radius))


@pytest.mark.parametrize("name, fields, match", [
    ("residual_cache", {"start": 3, "end": 2}, r"\[3, 2\) is empty"),
    ("residual_cache", {"interval": False}, "interval = false"),
    ("calibrated_schedule", {"alpha": -1}, "alpha = -1"),
    ("calibrated_schedule", {"alpha": float("nan")}, "alpha = nan"),
    ("calibrated_schedule", {"order": 3}, "order = 3: should be less than or equal to 2, or 'auto'"),
    ("calibrated_schedule", {"warmup": 0}, "warmup = 0: should be greater than or equal to 1, or 'auto'"),
    ("calibrated_schedule", {"compute_steps": [], "order": 1, "forecast": "taylor"}, "compute_steps is empty"),
    ("calibrated_schedule", {"compute_steps": [0, 0, 2], "order": 1, "forecast": "taylor"}, "must rise strictly"),
    ("calibrated_schedule", {"compute_steps": [1, 2], "order": 1, "forecast": "taylor"}, "must start with step 0"),
    ("calibrated_schedule", {"compute_steps": [0, 2]}, "needs a concrete order"),
    ("calibrated_schedule", {"compute_steps": [0, 2], "cond_only_steps": [1], "order": 1, "forecast": "taylor"}, r"\[1\] are not in compute_steps"),
    ("calibrated_schedule", {"forecast": "fitted", "target": "features"}, "fitted"),
    ("calibrated_schedule", {"span_starts": [0], "span_compute_steps": [[0], [0]], "order": 1, "forecast": "taylor"}, r"span_starts\[0\] = 0"),
    ("probe_cache", {"threshold": -0.1}, "threshold = -0.1"),
    ("probe_cache", {"threshold": float("inf")}, "finite"),
    ("confidence_forecast", {"threshold": True}, "threshold = true"),
])
def test_caching_values_out_of_range_are_refused_at_load(name, fields, match):
    with pytest.raises(InvalidProfileError, match=match):
        ditopt.load_profile(_pass_profile(name, **fields))


def test_unknown_keys_name_the_close_match_and_the_known_keys():
    with pytest.raises(InvalidProfileError, match=r"ordr: unknown key \(did you mean 'order'\?\); known keys: interval, order"):
        ditopt.load_profile(_pass_profile("taylor_forecast", ordr=1))
    with pytest.raises(InvalidProfileError, match="this pass takes no settings"):
        ditopt.load_profile(_pass_profile("patch_layout", tile=8))
    with pytest.raises(InvalidProfileError, match="did you mean 'min_psnr_db'"):
        ditopt.load_profile({"name": "x", "budget": {"min_psnr": 30}})


def test_duplicate_and_competing_passes_are_refused():
    with pytest.raises(InvalidProfileError, match="same pass 'conditioning_memo' with the same settings"):
        ditopt.load_profile({"name": "x", "passes": [{"name": "conditioning_memo"}, {"name": "conditioning_memo"}]})
    # the wording is the pass-contract check's (in progress: "both claim step_schedule"; before: "are both a caching pass")
    with pytest.raises(InvalidProfileError, match="'taylor_forecast' and 'residual_cache' (both claim step_schedule|are both a caching pass)"):
        ditopt.load_profile({"name": "x", "passes": [{"name": "taylor_forecast"}, {"name": "residual_cache"}]})
    # the same attention pass on different blocks is two substitutions, not a duplicate
    ditopt.load_profile({"name": "x", "passes": [{"name": "neighborhood_attention", "blocks": [0]},
                                                 {"name": "neighborhood_attention", "blocks": [1], "radius": 2}]})


def test_a_backend_optimize_never_uses_is_a_warning():
    from ditopt.errors import ProfileWarning

    with pytest.warns(ProfileWarning, match="backend = 'tensorrt' is not used by optimize"):
        ditopt.load_profile({"name": "x", "backend": "tensorrt"})


@pytest.mark.parametrize("value", [3, None, ["identity"], b"identity"])
def test_a_profile_of_the_wrong_type_is_named(value):
    with pytest.raises(InvalidProfileError, match="a profile is a preset name"):
        ditopt.load_profile(value)


def test_profile_files_that_cannot_be_read_name_the_file(tmp_path):
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('name = "p"\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(InvalidProfileError, match=r"latin1\.toml: not UTF-8 text \(byte 0xe9 at line 2"):
        ditopt.load_profile(latin)
    with pytest.raises(InvalidProfileError, match="is a directory"):
        ditopt.load_profile(tmp_path)
    with pytest.raises(InvalidProfileError, match=r"missing\.toml does not exist"):
        ditopt.load_profile(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "p\n')
    with pytest.raises(InvalidProfileError, match=r"broken\.toml: not valid TOML"):
        ditopt.load_profile(broken)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbfname = "p"\n')  # what some editors write: still UTF-8, so accepted
    assert ditopt.load_profile(bom).name == "p"


# -- model specs ----------------------------------------------------------------------------------
def _factory_raises():
    raise RuntimeError("boom")


not_callable = 3


@pytest.mark.parametrize("spec, match", [
    (":make", "both parts non-empty"),
    ("os:", "both parts non-empty"),
    ("os.path:join", r"os\.path:join\(\) raised TypeError"),
    ("test_errors:_factory_raises", "raised RuntimeError: boom"),
    ("test_errors:not_callable", "not a callable"),
    ("nosuchpkg.mod:make", "No module named 'nosuchpkg'"),
])
def test_bad_model_specs_are_unsupported_model_errors(spec, match):
    from ditopt.cli.models import resolve_model

    with pytest.raises(UnsupportedModelError, match=match):
        resolve_model(spec)


# -- class labels ---------------------------------------------------------------------------------
def test_class_labels_outside_the_embedding_table_name_the_label_and_the_range():
    from ditopt.inputs import check_call_inputs

    model = build_model("dit")  # 10 classes plus the null class: rows 0..10
    kwargs = make_inputs("dit", model)
    check_call_inputs(model, {**kwargs, "class_labels": torch.tensor([10])})  # the null class is a row
    for labels, bad in ((torch.tensor([11]), "11"), (torch.tensor([-1]), "-1"), ([3, 12], "12")):
        with pytest.raises(InputMismatchError, match=rf"class_labels contains {bad}, outside .*valid labels are 0\.\.10 \(classes 0\.\.9, and 10: the null class"):
            check_call_inputs(model, {**kwargs, "class_labels": labels})
    with pytest.raises(InputMismatchError, match="dtype torch.float32"):
        check_call_inputs(model, {**kwargs, "class_labels": torch.tensor([1.0])})
    with pytest.raises(InputMismatchError, match="2 labels for a batch of 1 latents"):
        check_call_inputs(model, {**kwargs, "class_labels": torch.tensor([1, 2])})


def test_zoo_sampling_refuses_labels_seeds_and_settings_it_cannot_use():
    from ditopt import zoo

    bundle = zoo.load("dit-digits")
    cases = [
        (dict(classes=[10], seeds=[0]), r"class 10 is out of range for dit-digits: classes are 0\.\.9 \(10 is the null class"),
        (dict(classes=[-1], seeds=[0]), r"class -1 is out of range"),
        (dict(classes=[1.5], seeds=[0]), "1.5 is not a whole number"),
        (dict(classes="3", seeds=[0]), "give a whole number or a list"),
        (dict(classes=[True], seeds=[0]), "True is not a whole number"),
        (dict(classes=[1, 2], seeds=[0]), "2 classes and 1 seeds"),
        (dict(classes=[1], seeds=[1.5]), "seeds"),
        (dict(classes=[1], seeds=[0], steps=0), "steps = 0"),
        (dict(classes=[1], seeds=[0], steps=2.5), "steps = 2.5"),
        (dict(classes=[1], seeds=[0], guidance_scale=float("nan")), "guidance_scale = nan"),
        (dict(classes=[1], seeds=[0], batch_size=-1), "batch_size = -1"),
        (dict(classes=[1], seeds=[0], eta=-1.0), "eta = -1.0"),
        (dict(classes=[1], seeds=[0], model="dit-digits"), "model= must be a module"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputMismatchError, match=match):
            bundle.sample(**kwargs)
    with pytest.raises(InputMismatchError, match="batch_size = 0"):
        bundle.make_inputs(0)
    with pytest.raises(UnsupportedModelError, match="unknown zoo model"):  # a ditopt error now (and still a ValueError)
        zoo.load("nope")


# -- CLI: bad input exits 2 with the message, not a traceback --------------------------------------
def test_cli_bad_inputs_exit_2_with_a_message(tmp_path):
    from typer.testing import CliRunner

    from ditopt.cli import app

    latin = tmp_path / "latin1.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    runner = CliRunner()
    for args, says in ((["optimize", "tiny-dit", "-p", str(latin)], "not UTF-8"),
                       (["demo", "-p", str(latin), "--out", str(tmp_path / "demo")], "not UTF-8"),
                       (["inspect", ":make"], "both parts non-empty"),
                       (["inspect", "os.path:join"], "raised TypeError"),
                       (["bench", "attention", "--tile", "0"], "--tile"),
                       (["bench", "attention", "--grid", "0", "0"], "--grid"),
                       (["demo", "--threads", "0"], "--threads"),
                       (["bench", "models", "--samples", "0"], "--samples"),
                       (["bench", "models", "--model", "nope"], "unknown zoo model")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert says in " ".join(result.output.split()), (args, result.output)
