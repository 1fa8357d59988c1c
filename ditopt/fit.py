"""Ridge least squares on calibration activations, shared by the passes that refit weights from
what calibration recorded (layer_prune's bridges, width_prune's corrected projections, moe_split's
routers): one damping rule, so the three fits cannot drift apart."""

from __future__ import annotations

import torch


def bias_features(*parts: torch.Tensor) -> torch.Tensor:
    """[parts..., 1] in float64: the design matrix of an affine fit, its bias column last."""
    n = parts[0].shape[0]
    return torch.cat([p.double() for p in parts] + [torch.ones(n, 1, dtype=torch.float64)], 1)


def ridge_solve(features: torch.Tensor, target: torch.Tensor, ridge: float, singular_ok: bool = False) -> torch.Tensor:
    """w minimising |features w - target|^2 + damping, in float64. The damping is `ridge` times the
    mean diagonal of the normal matrix (scale-free), on every column but the last (the bias).
    `singular_ok`: lstsq (gelsd) instead of solve, for ridge 0 with fewer rows than columns."""
    f = features.double()
    gram = f.T @ f
    scale = gram.diagonal()[:-1].mean().clamp_min(1e-12)
    damp = torch.full((f.shape[1],), ridge * float(scale), dtype=torch.float64)
    damp[-1] = 0.0
    lhs, rhs = gram + torch.diag(damp), f.T @ target.double()
    if singular_ok:
        return torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return torch.linalg.solve(lhs, rhs)
