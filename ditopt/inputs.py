"""Example inputs for diffusers transformers, synthesised from the model's config, and checks
of call inputs that an exported graph cannot make itself.

Only shapes and dtypes matter for capture; values are fixed random draws. Other models must be
given example inputs (MissingInputsError says so).

`check_call_inputs(model, kwargs)` checks what the graph would otherwise fail on deep inside, with
an IndexError or a silent broadcast: class labels outside the model's label embedding table (or
not integers), and a label batch that differs from the latent batch. It raises
InputMismatchError naming the label and the valid range.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from .errors import InputMismatchError, MissingInputsError


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


# -- call input checks --------------------------------------------------------------------------
_LABEL_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple[int, int | None] | None]" = weakref.WeakKeyDictionary()


def label_table(model: nn.Module) -> tuple[int, int | None] | None:
    """(rows of the class-label embedding table, number of real classes or None) for a
    class-conditional model, None for a model without one. Found as diffusers' LabelEmbedding
    (DiT: `num_classes` real classes, plus the null class row when trained with label dropout) or
    a module named like `class_embedder` / `y_embedder` / `label_emb` holding an nn.Embedding."""
    try:
        return _LABEL_TABLES[model]
    except (KeyError, TypeError):
        pass
    found = None
    for name, module in model.named_modules():
        table = getattr(module, "embedding_table", None)
        if type(module).__name__ == "LabelEmbedding" and isinstance(table, nn.Embedding):
            classes = getattr(module, "num_classes", None)
            found = (table.num_embeddings, int(classes) if isinstance(classes, int) else None)
            break
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and leaf in ("class_embedder", "y_embedder", "label_emb", "class_embedding", "label_embedding"):
            found = (module.num_embeddings, None)
            break
    try:
        _LABEL_TABLES[model] = found
    except TypeError:
        pass
    return found


def describe_label_range(rows: int, classes: int | None) -> str:
    if classes is not None and rows == classes + 1:
        return f"0..{rows - 1} (classes 0..{classes - 1}, and {classes}: the null class classifier-free guidance uses)"
    return f"0..{rows - 1}"


def check_class_labels(model: nn.Module, labels: Any, name: str = "class_labels") -> None:
    """InputMismatchError when `labels` (a tensor or ints) are not integers inside the model's
    class-label embedding table."""
    table = label_table(model)
    if table is None or labels is None:
        return
    rows, classes = table
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise InputMismatchError(
                f"{name} has dtype {labels.dtype}; class labels are integers: pass torch.tensor([...], dtype=torch.long)"
            )
        if labels.numel() == 0 or labels.device.type == "meta":
            return
        low, high = int(labels.min()), int(labels.max())
        bad = high if high >= rows else low
    else:
        values = [labels] if isinstance(labels, int) else list(labels)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise InputMismatchError(f"{name} = {labels!r}: class labels are whole numbers")
        if not values:
            return
        low, high = min(values), max(values)
        bad = high if high >= rows else low
    if low < 0 or high >= rows:
        raise InputMismatchError(
            f"{name} contains {bad}, outside {type(model).__name__}'s label embedding table: valid labels are "
            f"{describe_label_range(rows, classes)}"
        )


def _batch(value: Any) -> int | None:
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def check_call_inputs(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Check one call's keyword inputs against what `model` can take (see the module docstring).
    Cheap: reads the label tensor's min and max (on an accelerator that is one synchronisation)."""
    labels = kwargs.get("class_labels")
    if labels is None:
        return
    check_class_labels(model, labels)
    latent, rows = kwargs.get("hidden_states"), _batch(labels)
    if rows is not None and _batch(latent) is not None and labels.dim() == 1 and rows not in (1, _batch(latent)):
        raise InputMismatchError(
            f"class_labels has {rows} labels for a batch of {_batch(latent)} latents (hidden_states {tuple(latent.shape)}); "
            "give one label per row"
        )
