"""The optimized model drops into a real diffusers pipeline as `pipe.transformer`."""

from __future__ import annotations

import torch
import ditopt


def test_dit_pipeline_with_optimized_transformer():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, sample_size=8,
    ).eval()
    from diffusers import DiTTransformer2DModel

    # DiTPipeline uses label 1000 as the null class, so the model needs 1000 classes.
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=4.0, output_type="np")
    reference = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    pipe.transformer = ditopt.optimize(transformer, "identity")
    optimized = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert optimized.shape == reference.shape
    assert abs(optimized - reference).max() < 1e-5
    assert pipe.transformer.tracker.step == 2  # three steps of one generation were tracked
