"""Every profile in examples/profiles loads and runs end to end on a tiny DiT (64 wide, so that
the shipped group size and rotations apply as written).

At reduced size: the distillation knobs are capped (`REDUCED`), everything else applies as
shipped. The profiles' own step counts are for real models (minutes each); what this test checks
is that each profile loads, every pass runs and the result samples, which a few steps show as
well as hundreds (the distillation itself is tested in the passes' own tests). Uncapped, the MoE
and linear-attention profiles took most of the suite's time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import arch_sampler
from dit_reference import PlainDiT, plain_dit_inputs

import ditopt

REDUCED = {"distill_steps": 4, "joint_steps": 2}
PROFILES = sorted((Path(__file__).parent.parent / "examples" / "profiles").glob("*.toml"))


def test_there_are_example_profiles():
    assert len(PROFILES) >= 4


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def reduced(profile: ditopt.Profile) -> ditopt.Profile:
    """`profile` with its distillation step counts capped at REDUCED (the rest as written)."""
    entries = []
    for entry in profile.passes:
        caps = {k: min(getattr(entry.config, k), cap) for k, cap in REDUCED.items()
                if isinstance(getattr(entry.config, k, None), int) and getattr(entry.config, k) > 0}
        entries.append(entry.model_copy(update={"config": entry.config.model_copy(update=caps)}))
    return profile.model_copy(update={"passes": tuple(entries)})


def test_reduction_caps_only_the_distillation_steps():
    profile = ditopt.load_profile(next(p for p in PROFILES if p.stem == "linear-attention-30db"))
    small = reduced(profile)
    before, after = profile.passes[0].config, small.passes[0].config
    assert before.distill_steps > REDUCED["distill_steps"] and after.distill_steps == REDUCED["distill_steps"]
    assert after.joint_steps == REDUCED["joint_steps"] and after.feature == before.feature
    assert small.budget == profile.budget


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_example_profile_runs(path):
    profile = reduced(ditopt.load_profile(path))
    torch.manual_seed(0)
    model = PlainDiT(hidden=64, depth=3).eval()
    kw = plain_dit_inputs(batch=2)
    opt = ditopt.optimize(model, profile, example_inputs=kw, calibration=arch_sampler(kw, samples=8),
                          validation=arch_sampler(kw, samples=8, seed=12), on_gate_miss="return")
    assert [r.name for r in opt.report.passes] == [e.name for e in profile.passes]
    with torch.no_grad():
        out = opt(**kw)
    assert torch.isfinite(out).all()
