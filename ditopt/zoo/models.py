"""Architectures of the zoo: configs, the Flux class embedder, latent packing, the digit classifier.

Everything here is built from small configs with diffusers' own transformer classes, so the
graphs ditopt optimizes are the real DiT / Flux architectures, only narrower and shallower.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# dit-digits: diffusers DiTTransformer2DModel, adaLN-Zero, class-conditional (label 10 = null).
# --------------------------------------------------------------------------------------------
DIT_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=8,
    dropout=0.0,
    norm_num_groups=32,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=10,
    upcast_attention=False,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
)

# dit-digits-p1: the same model at patch size 1, so 32x32 = 1024 tokens (4x dit-digits'). There
# attention is about half of a block's multiply-adds (a quarter at 256 tokens): the zoo's model
# for attention substitution, fine-tuned from dit-digits (see patch1_from_patch2).
DIT_P1_CONFIG = dict(DIT_CONFIG, patch_size=1)


# dit-canvas: the same DiT on a 64x64 canvas of 4x4 digits (32x32 = 1024 tokens at patch 2),
# fine-tuned from dit-digits. sample_size 64 keeps the sin-cos positions one unit per token, so a
# cell's positions are those dit-digits saw (diffusers scales positions by sample_size / input size).
DIT_CANVAS_CONFIG = dict(DIT_CONFIG, sample_size=64)


def patch1_from_patch2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A patch-2 DiT state dict as a starting point for the patch-1 model: the blocks carry over
    unchanged; a 1-pixel token embeds with the 2x2 kernel's sum (the embedding a flat 2x2 patch of
    that value got) and predicts the mean of the 2x2 outputs it was part of."""
    out = dict(state)
    out["pos_embed.proj.weight"] = state["pos_embed.proj.weight"].sum(dim=(2, 3), keepdim=True)
    out["proj_out_2.weight"] = state["proj_out_2.weight"].mean(0, keepdim=True)
    out["proj_out_2.bias"] = state["proj_out_2.bias"].mean(0, keepdim=True)
    return out


# --------------------------------------------------------------------------------------------
# flux-digits: diffusers FluxTransformer2DModel on 2x2-packed 32x32x1 latents (16x16 tokens, 4 ch).
# --------------------------------------------------------------------------------------------
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    out_channels=None,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
FLUX_TEXT_TOKENS = 4
NULL_CLASS = 10


def build_dit(config: dict | None = None):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_config(dict(config or DIT_CONFIG))


def build_flux(config: dict | None = None):
    from diffusers import FluxTransformer2DModel

    cfg = dict(config or FLUX_CONFIG)
    if isinstance(cfg.get("axes_dims_rope"), list):
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel.from_config(cfg)


class ClassEmbedder(nn.Module):
    """Class label -> ("text" tokens [B, T, D], pooled vector [B, P]) for the Flux model.

    Row ``num_classes`` of each table is the learned null ("unconditional") entry used for
    classifier-free guidance.
    """

    def __init__(self, num_classes: int = 10, num_tokens: int = FLUX_TEXT_TOKENS,
                 token_dim: int = 64, pooled_dim: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        self.tokens = nn.Embedding(num_classes + 1, num_tokens * token_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokens(labels).view(labels.shape[0], self.num_tokens, self.token_dim)
        return tok, self.pooled(labels)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], exactly like FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int = 32, width: int = 32) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, _, ch = x.shape
    c = ch // 4
    x = x.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def flux_img_ids(height: int = 32, width: int = 32) -> torch.Tensor:
    """2-D positional ids [(H/2)(W/2), 3] (0, row, col), like FluxPipeline._prepare_latent_image_ids."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flux_txt_ids(num_tokens: int = FLUX_TEXT_TOKENS) -> torch.Tensor:
    return torch.zeros(num_tokens, 3)


class DigitClassifier(nn.Module):
    """Small CNN for 32x32 digits in [0, 1]; ``features`` is the 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2.0 - 1.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))
