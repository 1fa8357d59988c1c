"""Built-in model names for the CLI and examples.

`tiny-*` are randomly initialised diffusers architectures at toy size (structure, parity and
export checks only: random weights say nothing about quality). Trained models come from the zoo
(`dit-digits`, `flux-digits`, `dit-digits-p1`, `dit-canvas`). Anything else is `package.module:factory`, a callable returning a
model, a `(model, example_inputs)` pair, or a dict with `model` and optionally `example_inputs`,
`calibration` and `validation` (functions `fn(model) -> samples`, what `ditopt.optimize` takes):
the way a conversion pipeline hands its own sampling loop to `ditopt export`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ditopt.errors import UnsupportedModelError


def _tiny_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    )


def _tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )


def _tiny_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=32,
    )


def _tiny_pixart() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=32, sample_size=16, patch_size=2, caption_channels=32, norm_num_groups=1,
        interpolation_scale=1,
    )


def _tiny_wan() -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )


TINY: dict[str, Callable[[], nn.Module]] = {
    "tiny-dit": _tiny_dit,
    "tiny-flux": _tiny_flux,
    "tiny-sd3": _tiny_sd3,
    "tiny-pixart": _tiny_pixart,
    "tiny-wan": _tiny_wan,
}
ZOO = ("dit-digits", "flux-digits", "dit-digits-p1", "dit-canvas")


@dataclass
class ResolvedModel:
    name: str
    model: nn.Module
    example_inputs: dict[str, Any] | None = None
    bundle: Any = None  # a ditopt.zoo bundle for trained models (has .sample)
    calibration: Callable[[nn.Module], Any] | None = None  # from a factory's dict
    validation: Callable[[nn.Module], Any] | None = None

FACTORY_KEYS = ("model", "example_inputs", "calibration", "validation")


def builtin_names() -> list[str]:
    return sorted(TINY) + list(ZOO)


def resolve_model(spec: str) -> ResolvedModel:
    """A built-in name or `package.module:factory`."""
    if spec in TINY:
        torch.manual_seed(0)
        return ResolvedModel(spec, TINY[spec]().eval())
    if spec in ZOO:
        from ditopt import zoo

        bundle = zoo.load(spec)
        return ResolvedModel(spec, bundle.model, bundle.make_inputs(2), bundle)
    if ":" not in spec:
        raise UnsupportedModelError(
            f"unknown model {spec!r}: use a built-in name ({', '.join(builtin_names())}) "
            "or package.module:factory (a callable returning an nn.Module)"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name.strip() or not attr.strip():
        raise UnsupportedModelError(
            f"model {spec!r}: write package.module:factory, both parts non-empty (e.g. mypkg.models:make_dit)"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"cannot load {spec!r}: {exc}") from None
    if not callable(factory):
        raise UnsupportedModelError(f"{spec} is a {type(factory).__name__}, not a callable returning a torch.nn.Module")
    try:
        made = factory()
    except Exception as exc:  # the user's factory: say which one failed and how, without a traceback in the CLI
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UnsupportedModelError(
            f"{spec}() raised {type(exc).__name__}: {first}. The factory is called with no arguments and must return "
            "a torch.nn.Module (or a (model, example_inputs) pair)"
        ) from exc
    example = calibration = validation = None
    if isinstance(made, dict):
        unknown = sorted(set(made) - set(FACTORY_KEYS))
        if unknown or "model" not in made:
            raise UnsupportedModelError(
                f"{spec} returned a dict with keys {sorted(made)}; it needs 'model' and may have "
                f"{', '.join(repr(k) for k in FACTORY_KEYS[1:])}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        for key in ("calibration", "validation"):
            if made.get(key) is not None and not callable(made[key]):
                raise UnsupportedModelError(f"{spec} returned {key}= a {type(made[key]).__name__}; give a function fn(model) -> samples")
        calibration, validation = made.get("calibration"), made.get("validation")
        made = (made["model"], made["example_inputs"]) if made.get("example_inputs") is not None else made["model"]
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
        if not isinstance(example, dict) and not (isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict)):
            raise UnsupportedModelError(
                f"{spec} returned (model, {type(example).__name__}); the second item must be the example inputs: a dict of "
                "keyword arguments of one forward call (or an (args, kwargs) pair)"
            )
    if not isinstance(made, nn.Module):
        raise UnsupportedModelError(f"{spec} returned {type(made).__name__}, not a torch.nn.Module")
    return ResolvedModel(spec, made.eval() if made.training else made, example, calibration=calibration, validation=validation)
