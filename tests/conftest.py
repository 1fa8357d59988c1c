"""Shared fixtures: the six architectures of the foundation issue at tiny sizes."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

from dit_reference import PlainDiT, plain_dit_inputs  # noqa: E402


def _diffusers(name: str):
    import diffusers

    torch.manual_seed(0)
    if name == "dit":
        return diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
        )
    if name == "pixart":
        return diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=1,
            interpolation_scale=1,
        )
    if name == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16,
        )
    if name == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        )
    if name == "wan":
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        )
    raise KeyError(name)


ARCHITECTURES = ["dit", "pixart", "sd3", "flux", "wan", "plain"]


def build_model(name: str) -> torch.nn.Module:
    if name == "plain":
        torch.manual_seed(0)
        return PlainDiT().eval()
    return _diffusers(name).eval()


def make_inputs(name: str, model: torch.nn.Module, batch: int = 1, resolution: int | None = None, seed: int = 0):
    if name == "plain":
        return plain_dit_inputs(batch=batch, size=resolution or 8, seed=seed)
    from ditopt.inputs import synthesize_inputs

    return synthesize_inputs(model, batch_size=batch, resolution=resolution, seed=seed)


def arch_sampler(kw, steps=6, samples=4, seed=11):
    """A short Euler loop over the architecture's own inputs, `samples` seeds two at a time."""
    latent = next(k for k in ("hidden_states", "x") if k in kw)
    tkey = next(k for k in ("timestep", "t") if k in kw)
    g = torch.Generator().manual_seed(seed)
    starts = [torch.randn(kw[latent].shape, generator=g) for _ in range(samples // kw[latent].shape[0])]

    def run(m):
        outs = []
        for x in starts:
            x = x.clone()
            for j in range(steps):
                call = {**kw, latent: x, tkey: torch.full_like(kw[tkey], 900 - 800 * j / steps)}
                out = m(**call)
                out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                x = x - 0.1 * out[:, : x.shape[1]] if out.shape[1] != x.shape[1] else x - 0.1 * out
            outs.append(x)
        return torch.cat(outs)

    return run


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def held_out_misses(monkeypatch):
    """`held_out_misses(n, shortfall)` makes optimize's first n held-out checks fail with the
    lower bound `shortfall` dB under the budget (the real check still runs, so the mean is
    real) and returns the list of optimized models each check saw."""
    import sys

    from ditopt.verify import Verification

    opt_mod = sys.modules["ditopt.optimize"]  # the module (the package exports the function of that name)
    real = opt_mod.verify_end_to_end

    def install(n: int, shortfall: float) -> list:
        seen = []

        def check(sample_fn, reference, optimized, min_psnr_db, confidence=0.5, **kwargs):
            result = real(sample_fn, reference, optimized, min_psnr_db, confidence, **kwargs)
            seen.append(optimized)
            if len(seen) <= n:
                return Verification("end-to-end", None, None, result.psnr_db, result.budget, False,
                                    result.details, psnr_lower_db=min_psnr_db - shortfall)
            return result

        monkeypatch.setattr(opt_mod, "verify_end_to_end", check)
        return seen

    return install
