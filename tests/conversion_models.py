"""Models for `ditopt export package.module:factory` in the conversion tests: a factory that hands
the CLI its own sampling loop (the dict form), on a 64-wide plain DiT (tests/dit_reference.py)."""

from __future__ import annotations

import torch
from conftest import arch_sampler
from dit_reference import PlainDiT, plain_dit_inputs


def calibrated_plain_dit() -> dict:
    torch.manual_seed(0)
    kw = plain_dit_inputs(batch=2)
    return {"model": PlainDiT(hidden=64, depth=2).eval(), "example_inputs": kw,
            "calibration": arch_sampler(kw, samples=4), "validation": arch_sampler(kw, samples=4, seed=12)}


# W8A8 is lossy: no quantized model reaches 200 dB against the float one, so this gate cannot pass.
UNREACHABLE = """
name = "w8a8-200db"
version = 1
[budget]
min_psnr_db = 200
[[passes]]
name = "quantize"
weights = "int8"
activations = "int8"
rotation = "hadamard"
"""
