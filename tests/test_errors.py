"""Bad input gets a specific error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, make_inputs
from torch import nn

import ditopt
from ditopt.errors import (
    CalibrationError,
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
