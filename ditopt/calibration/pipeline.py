"""Calibration and validation functions from a diffusers pipeline.

    sampler = ditopt.PipelineSampler(pipe, seed=0, class_labels=[1, 2], num_inference_steps=50)
    held_out = ditopt.PipelineSampler(pipe, seed=1, class_labels=[3, 4], num_inference_steps=50)
    pipe.transformer = ditopt.optimize(pipe.transformer, "balanced", calibration=sampler,
                                       validation=held_out, example_inputs=sampler.example_inputs())

`sampler(model)` runs the pipeline with `model` in place of `pipe.transformer` (the pipeline's
own transformer is put back afterwards, also on error) and a fresh generator seeded with `seed`,
so every call samples the same trajectory; it returns the images as a float tensor
`[N, C, H, W]`. The pipeline is duck-typed: anything with a transformer attribute that returns
`.images` works. `example_inputs()` records the keyword arguments of the pipeline's first
transformer call (CFG batch included): the shapes the optimized model will be called with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture import normalize_call
from ..errors import CalibrationError


HELD_OUT_SEED_OFFSET = 1_000_003  # far from seeds people pick by hand (0, 1, 42, 1234)


class _FirstCall(Exception):
    """Raised by the recorder to stop the pipeline after the transformer's first call."""


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.kwargs: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:  # pipelines read config, dtype, ... off the transformer
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = normalize_call(self.inner, args, kwargs)  # DiTPipeline passes the latents positionally
        self.kwargs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
        raise _FirstCall


def images_to_tensor(images: Any) -> torch.Tensor:
    """A pipeline's `.images` (numpy NHWC, torch NCHW, or a list of PIL images) as float NCHW."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    if isinstance(images, list):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        if images.ndim == 3:
            images = images[..., None]
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    raise CalibrationError(f"cannot read the pipeline's images of type {type(images).__name__}; "
                           "pass output_type='np' or 'pt'")


class PipelineSampler:
    """`fn(model)` for `ditopt.optimize(..., calibration=fn)` that samples with a diffusers pipeline."""

    def __init__(self, pipe: Any, *, seed: int = 0, component: str = "transformer", **call_kwargs: Any) -> None:
        if not hasattr(pipe, component):
            raise CalibrationError(f"the pipeline has no attribute {component!r}; pass component='...' to name "
                                   "the denoiser to optimize")
        if "generator" in call_kwargs:
            raise CalibrationError("PipelineSampler makes its own generator from seed= (a fresh one per call, so "
                                   "every call samples the same trajectory); do not pass generator=")
        self.pipe, self.seed, self.component = pipe, seed, component
        self.call_kwargs = {"output_type": "np", **call_kwargs}

    def _call(self, model: nn.Module) -> Any:
        original = getattr(self.pipe, self.component)
        setattr(self.pipe, self.component, model)
        try:
            with torch.no_grad():
                return self.pipe(generator=torch.Generator().manual_seed(self.seed), **self.call_kwargs)
        finally:
            setattr(self.pipe, self.component, original)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return images_to_tensor(self._call(model).images)

    def held_out(self) -> "PipelineSampler":
        """A sampler on seeds (and, for class-conditional pipelines, classes) this one never
        samples: what `optimize` checks the budget on when no `validation=` is given. The seed
        moves by HELD_OUT_SEED_OFFSET; `class_labels` move by their own count, modulo the
        transformer's number of classes where its config says it (DiT's num_embeds_ada_norm).
        Prompts stay as given: new prompts cannot be made up, so pass `validation=` with
        prompts of your own for a check on unseen prompts."""
        kwargs = dict(self.call_kwargs)
        labels = kwargs.get("class_labels")
        config = getattr(getattr(self.pipe, self.component, None), "config", None)
        classes = getattr(config, "num_embeds_ada_norm", None) if config is not None else None
        if isinstance(labels, (list, tuple)) and labels and all(isinstance(c, int) for c in labels) and isinstance(classes, int):
            kwargs["class_labels"] = [(c + len(labels)) % classes for c in labels]
        return PipelineSampler(self.pipe, seed=self.seed + HELD_OUT_SEED_OFFSET, component=self.component, **kwargs)

    def example_inputs(self) -> dict[str, Any]:
        """The keyword arguments of the pipeline's first call of its transformer (stops there)."""
        recorder = _Recorder(getattr(self.pipe, self.component))
        try:
            self._call(recorder)
        except _FirstCall:
            pass
        if recorder.kwargs is None:
            raise CalibrationError(f"the pipeline never called pipe.{self.component}")
        return recorder.kwargs
