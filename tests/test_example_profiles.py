"""Every profile in examples/profiles loads and runs end to end on a tiny DiT (64 wide, so that
the shipped group size and rotations apply as written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import arch_sampler
from dit_reference import PlainDiT, plain_dit_inputs

import ditopt

PROFILES = sorted((Path(__file__).parent.parent / "examples" / "profiles").glob("*.toml"))


def test_there_are_example_profiles():
    assert len(PROFILES) >= 4


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_example_profile_runs(path):
    profile = ditopt.load_profile(path)
    torch.manual_seed(0)
    model = PlainDiT(hidden=64, depth=3).eval()
    kw = plain_dit_inputs(batch=2)
    opt = ditopt.optimize(model, profile, example_inputs=kw, calibration=arch_sampler(kw, samples=8),
                          validation=arch_sampler(kw, samples=8, seed=12), on_gate_miss="return")
    assert [r.name for r in opt.report.passes] == [e.name for e in profile.passes]
    with torch.no_grad():
        out = opt(**kw)
    assert torch.isfinite(out).all()
