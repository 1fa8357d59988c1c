"""Toy DiTs whose outputs can be computed by hand, for runtime and caching tests.

Each block is a real DiT block as far as capture is concerned (it runs scaled_dot_product_attention)
but the attention term is multiplied by zero, so a block computes `scale * x + t * w`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AffineBlock(nn.Module):
    def __init__(self, width: int, scale: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.w = nn.Parameter(torch.randn(width, generator=gen))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        attn = F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])[:, 0]
        return self.scale * x + t[:, None, None] * self.w + 0 * attn


class AffineDiT(nn.Module):
    """out = scale^N x + t * W, with W = sum_i scale^(N-1-i) w_i."""

    def __init__(self, depth: int = 3, width: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        self.one = nn.Parameter(torch.ones(()))
        self.blocks = nn.ModuleList([AffineBlock(width, scale, i) for i in range(depth)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = x * self.one
        for block in self.blocks:
            h = block(h, timestep)
        return h

    def total_w(self) -> torch.Tensor:
        n = len(self.blocks)
        return sum(b.scale ** (n - 1 - i) * b.w.detach() for i, b in enumerate(self.blocks))


def toy_inputs(batch: int = 1, tokens: int = 4, width: int = 8, t: float = 1.0) -> dict[str, torch.Tensor]:
    return {"x": torch.ones(batch, tokens, width), "timestep": torch.full((batch,), t)}


def euler_sampler(x0: torch.Tensor, timesteps: list[float], step: float = 0.1):
    """A deterministic sampling loop: x <- x - step * model(x, t)."""

    def run(model: nn.Module) -> torch.Tensor:
        x = x0.clone()
        for t in timesteps:
            x = x - step * model(x=x, timestep=torch.full((x.shape[0],), float(t)))
        return x

    return run


class CondAffineBlock(AffineBlock):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t) + t[:, None, None] * cond[:, None, :]


class CondAffineDiT(AffineDiT):
    """A conditioned AffineDiT, for CFG: out = scale^N x + t * W + C * t * cond, with
    C = sum_i scale^(N-1-i); `cond` is one vector per batch row."""

    def __init__(self, depth: int = 3, width: int = 8, scale: float = 1.0) -> None:
        super().__init__(depth, width, scale)
        self.blocks = nn.ModuleList([CondAffineBlock(width, scale, i) for i in range(depth)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = x * self.one
        for block in self.blocks:
            h = block(h, timestep, cond)
        return h

    def total_c(self) -> float:
        n = len(self.blocks)
        return sum(b.scale ** (n - 1 - i) for i, b in enumerate(self.blocks))


def cfg_sampler(x0: torch.Tensor, uncond: torch.Tensor, cond: torch.Tensor, timesteps: list[float],
                scale: float = 3.0, step: float = 0.1):
    """Euler sampling with CFG batched as pipelines do: rows [x; x], conditioning [uncond; cond]."""

    def run(model: nn.Module) -> torch.Tensor:
        x = x0.clone()
        n = x.shape[0]
        for t in timesteps:
            out = model(x=torch.cat([x, x]), timestep=torch.full((2 * n,), float(t)), cond=torch.cat([uncond, cond]))
            u, c = out[:n], out[n:]
            x = x - step * (u + scale * (c - u))
        return x

    return run
