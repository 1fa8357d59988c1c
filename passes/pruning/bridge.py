"""The training-free bridge (PPCL's idea without the training): a removed interval of blocks
is replaced, per token stream, by the least-squares affine map from the interval's input to its
output on the original model's calibration activations, with the first block's adaLN
modulation as extra regressors where the block had it:

    y - x  ≈  x A + m B + c          (x, y: tokens [n, d]; m: the token's sample's modulation)

solved in float64 by ridge regression (`ridge` times the mean diagonal of the normal matrix:
the modulation has far fewer distinct values than there are tokens, so it needs the damping).
When the interval is affine in x, the fit is exact."""

from __future__ import annotations

import torch

from ditopt.fit import bias_features, ridge_solve

from .rewrite import StreamBridge


def fit_stream_bridge(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor | None, ridge: float) -> StreamBridge:
    """x, y: [n, d]; m: [n, dm] or None."""
    d = x.shape[1]
    w = ridge_solve(bias_features(x, *([m] if m is not None else [])), y - x, ridge)
    a = w[:d].float()
    b = w[d:-1].float() if m is not None else None
    return StreamBridge(a.contiguous(), b.contiguous() if b is not None else None, w[-1].float().contiguous())
