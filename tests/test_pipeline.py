"""The optimized model drops into a real diffusers pipeline as `pipe.transformer`."""

from __future__ import annotations

import pytest
import torch

import ditopt


def _tiny_dit_pipeline(num_layers: int = 4):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, sample_size=8,
    ).eval()
    # DiTPipeline uses label 1000 as the null class, so the model needs 1000 classes.
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_pipeline_with_optimized_transformer():
    pipe = _tiny_dit_pipeline(num_layers=2)
    transformer = pipe.transformer
    kwargs = dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=4.0, output_type="np")
    reference = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    pipe.transformer = ditopt.optimize(transformer, "identity")
    optimized = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert optimized.shape == reference.shape
    assert abs(optimized - reference).max() < 1e-5
    assert pipe.transformer.tracker.step == 2  # three steps of one generation were tracked


def test_pipeline_sampler_calibrates_a_budget_preset_on_the_pipelines_own_loop():
    from ditopt.verify import psnr

    pipe = _tiny_dit_pipeline()
    transformer = pipe.transformer
    call = dict(num_inference_steps=12, guidance_scale=4.0)
    sampler = ditopt.PipelineSampler(pipe, seed=0, class_labels=[1, 2], **call)
    held_out = ditopt.PipelineSampler(pipe, seed=1, class_labels=[3, 4], **call)

    example = sampler.example_inputs()
    assert example["hidden_states"].shape == (4, 4, 8, 8)  # 2 samples x 2 CFG branches
    assert pipe.transformer is transformer  # put back after recording

    reference = held_out(transformer)
    assert reference.shape == (2, 3, 8, 8) and reference.dtype == torch.float32
    assert torch.equal(held_out(transformer), reference)  # a fresh generator per call: same trajectory

    # Two held-out samples bound the mean PSNR only loosely (t(0.9, 1 dof) = 3.08): this test is
    # about the pipeline plumbing, so the gate checks the held-out mean itself.
    profile = {"name": "pipeline-balanced", "budget": {"min_psnr_db": 30, "max_rel_err": 1e-4, "psnr_confidence": 0.5},
               "passes": [{"name": "calibrated_schedule", "order": "auto"}]}
    optimized = ditopt.optimize(transformer, profile, calibration=sampler, validation=held_out,
                                example_inputs=example)
    assert pipe.transformer is transformer
    assert optimized.stats.num_steps == 12  # the pipeline's own step count, read during calibration
    report = optimized.report.to_dict()
    skipped = set(range(12)) - set(report["passes"][0]["report"]["stages"][0]["compute_steps"])
    assert skipped, "the schedule skipped no step: the pass never fired through the pipeline"
    measured = report["verification"][-1]
    assert measured["kind"] == "end-to-end" and measured["passed"]

    pipe.transformer = optimized
    samples = held_out(optimized)
    assert psnr(samples, reference) >= 30.0
    assert abs(psnr(samples, reference) - measured["psnr_db"]) < 1e-3  # the report measured this very run


def test_pipeline_sampler_rejects_a_generator_and_an_unknown_component():
    pipe = _tiny_dit_pipeline()
    with pytest.raises(ditopt.CalibrationError, match="generator"):
        ditopt.PipelineSampler(pipe, generator=torch.Generator())
    with pytest.raises(ditopt.CalibrationError, match="unet"):
        ditopt.PipelineSampler(pipe, component="unet")
