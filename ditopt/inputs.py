"""Example inputs for diffusers transformers, synthesised from the model's config.

Only shapes and dtypes matter for capture; values are fixed random draws. Other models must be
given example inputs (MissingInputsError says so).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import MissingInputsError


def _cfg(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return dict(config) if config is not None else {}


def _is_diffusers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("diffusers.")


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return default


def synthesize_inputs(
    model: nn.Module,
    batch_size: int = 1,
    resolution: int | None = None,
    text_tokens: int = 8,
    frames: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword inputs for one forward call of a diffusers transformer.

    `resolution` is the latent side length (pixels of the latent, not of the image); it
    defaults to the config's `sample_size` (or 8 for models without one, e.g. Flux).
    """
    if not _is_diffusers(model):
        raise MissingInputsError(
            f"{type(model).__name__} is not a diffusers model, so ditopt cannot infer its inputs. "
            "Pass example_inputs={...} (the keyword arguments of one forward call)."
        )
    cfg = _cfg(model)
    params = inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    b = batch_size
    in_ch = _first(cfg, "in_channels", default=4)
    side = resolution or _first(cfg, "sample_size", default=8)
    if isinstance(side, (tuple, list)):
        side = side[0]
    patch = _first(cfg, "patch_size", default=1)
    text_dim = _first(cfg, "caption_channels", "joint_attention_dim", "text_dim", "text_embed_dim", "cross_attention_dim")
    pooled_dim = _first(cfg, "pooled_projection_dim")
    kwargs: dict[str, Any] = {}
    name = type(model).__name__

    if "img_ids" in params:  # Flux family: packed latent tokens plus positional ids
        h = w = side
        kwargs["hidden_states"] = randn(b, h * w, in_ch)
        kwargs["img_ids"] = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"),
            dim=-1,
        ).reshape(h * w, 3).to(device=device, dtype=dtype)
        kwargs["txt_ids"] = torch.zeros(text_tokens, 3, device=device, dtype=dtype)
        kwargs["timestep"] = torch.full((b,), 0.5, device=device, dtype=dtype)
        if cfg.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((b,), 3.5, device=device, dtype=dtype)
    elif isinstance(patch, (tuple, list)) or "3D" in name:  # video: [B, C, F, H, W]
        kwargs["hidden_states"] = randn(b, in_ch, frames, side, side)
        kwargs["timestep"] = torch.full((b,), 500, device=device, dtype=torch.long)
    else:
        kwargs["hidden_states"] = randn(b, in_ch, side, side)
        kwargs["timestep"] = torch.full((b,), 500, device=device, dtype=torch.long)

    if "encoder_hidden_states" in params and text_dim is not None:
        kwargs["encoder_hidden_states"] = randn(b, text_tokens, text_dim)
    if "pooled_projections" in params and pooled_dim is not None:
        kwargs["pooled_projections"] = randn(b, pooled_dim)
    if "class_labels" in params and _first(cfg, "num_embeds_ada_norm") is not None:
        kwargs["class_labels"] = torch.zeros(b, dtype=torch.long, device=device)
    if "added_cond_kwargs" in params:
        if cfg.get("use_additional_conditions") or (cfg.get("sample_size") == 128 and name.startswith("PixArt")):
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.full((b, 2), float(side * 8), device=device, dtype=dtype),
                "aspect_ratio": torch.ones(b, 1, device=device, dtype=dtype),
            }
        else:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kwargs
