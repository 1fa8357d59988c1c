"""Image-quality metrics for ditopt (pure functions on tensors).

* :func:`psnr`, :func:`ssim` compare an optimized model's images to the reference model's images
  for the same (class, seed) pairs (fidelity of an optimization).
* :func:`class_accuracy`, :func:`frechet_distance`, :func:`feature_frechet_distance` measure
  sample quality against the data, with a classifier the caller passes (the zoo's digit classifier: :func:`ditopt.zoo.load_classifier`).

All image inputs are ``[N, C, H, W]`` float tensors; ``data_range`` is the span of valid values
(1.0 for images in [0, 1]).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "class_accuracy", "frechet_distance", "feature_frechet_distance",
           "classifier_features"]


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() != 4:
        raise ValueError(f"expected [N, C, H, W], got {tuple(x.shape)}")
    return x.detach().double(), ref.detach().double()


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over samples of the per-sample PSNR in dB: ``10 log10(range^2 / MSE_i)``.

    A sample identical to its reference has infinite PSNR; if every sample is identical the result
    is ``inf``, and any identical sample makes the mean ``inf`` too (it is never NaN).
    """
    vals = psnr_per_sample(x, ref, data_range)
    return float(sum(vals) / len(vals))


def psnr_per_sample(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """``10 log10(range^2 / MSE_i)`` for each sample i (``inf`` where identical)."""
    x, ref = _check_pair(x, ref)
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0.0 else 10.0 * math.log10(data_range ** 2 / m) for m in mse.tolist()]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03.

    Local statistics are computed with the separable Gaussian filter over "valid" positions only
    (no padding), as in the reference implementation and ``skimage`` with
    ``gaussian_weights=True, use_sample_covariance=False``; the SSIM map is averaged over positions
    and channels per sample, then over samples. Images must be at least ``win_size`` pixels wide.
    """
    x, ref = _check_pair(x, ref)
    n, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"images {h}x{w} are smaller than the {win_size}x{win_size} window")
    g = _gaussian_window(win_size, sigma)
    wh = g.view(1, 1, win_size, 1).repeat(c, 1, 1, 1)
    ww = g.view(1, 1, 1, win_size).repeat(c, 1, 1, 1)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wh, groups=c), ww, groups=c)

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(ref)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(ref * ref) - mu_y ** 2
    sxy = filt(x * ref) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2)
    smap = num / den
    return float(smap.flatten(1).mean(1).mean())


def _classifier(classifier):
    # The metrics take the classifier as an argument: the core never reaches into the zoo.
    if classifier is None:
        from .errors import DitoptError

        raise DitoptError("the classifier metrics need the classifier: pass classifier=ditopt.zoo.load_classifier() "
                          "(the zoo's digit classifier) or one of your own with .features() and a forward")
    return classifier


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier=None, batch_size: int = 256) -> torch.Tensor:
    """Penultimate-layer features of the digit classifier for images in [0, 1] -> [N, D]."""
    clf = _classifier(classifier)
    was_training = clf.training
    clf.eval()
    out = [clf.features(images[i:i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
    clf.train(was_training)
    return torch.cat(out, 0)


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels, classifier=None, batch_size: int = 256) -> float:
    """Fraction of ``images`` (in [0, 1]) that the classifier assigns to the requested ``labels``."""
    clf = _classifier(classifier)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    was_training = clf.training
    clf.eval()
    preds = torch.cat([clf(images[i:i + batch_size].float()).argmax(1)
                       for i in range(0, images.shape[0], batch_size)])
    clf.train(was_training)
    return float((preds == labels).double().mean())


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ([N, D] each):

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with unbiased covariances and
    ``scipy.linalg.sqrtm`` (real part taken; a tiny diagonal offset is added if the product is
    singular and the square root is not finite).
    """
    from scipy import linalg

    a = np.asarray(torch.as_tensor(feats_a).detach().double().cpu().numpy())
    b = np.asarray(torch.as_tensor(feats_b).detach().double().cpu().numpy())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [N, D] feature sets with equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        off = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


def feature_frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor, classifier=None) -> float:
    """Fréchet distance between the classifier's penultimate features of two image sets in [0, 1]."""
    clf = _classifier(classifier)
    return frechet_distance(classifier_features(images_a, clf), classifier_features(images_b, clf))
