"""ditopt.metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ditopt import metrics


def test_psnr_constant_offset():
    ref = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    # offset 0.1 -> MSE 0.01 -> 10*log10(1/0.01) = 20 dB
    assert metrics.psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=1e-9)
    # data_range 2: 10*log10(4/0.01) = 26.0206 dB
    assert metrics.psnr(ref + 0.1, ref, data_range=2.0) == pytest.approx(10 * math.log10(400.0), abs=1e-9)


def test_psnr_is_mean_of_per_sample_values():
    ref = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    x = ref.clone()
    x[0] += 0.1   # 20 dB
    x[1] += 0.01  # 40 dB
    assert metrics.psnr(x, ref) == pytest.approx(30.0, abs=1e-9)  # not PSNR of the mean MSE (~23 dB)


def test_psnr_identical_is_inf_not_nan():
    ref = torch.rand(2, 1, 8, 8)
    assert metrics.psnr(ref.clone(), ref) == math.inf
    with pytest.raises(ValueError):
        metrics.psnr(ref, ref[:1])


def test_ssim_identical_is_one():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert metrics.ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert metrics.ssim(y, x) < 0.9


def test_ssim_constant_images_closed_form():
    # constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-10)


def test_ssim_single_window_by_hand():
    # 11x11 images: exactly one window position; compute the weighted statistics by hand
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)
    y = (0.6 * x + 0.3 * torch.rand(1, 1, 11, 11, generator=g, dtype=torch.float64)).clamp(0, 1)
    k = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()
    w = np.outer(k, k)
    xa, ya = x[0, 0].numpy(), y[0, 0].numpy()
    mx, my = (w * xa).sum(), (w * ya).sum()
    vx = (w * (xa - mx) ** 2).sum()
    vy = (w * (ya - my) ** 2).sum()
    cxy = (w * (xa - mx) * (ya - my)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-9)
    assert 0.0 < expected < 1.0


def _exact_gaussian_features(n: int, mean: np.ndarray, std: np.ndarray, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly ``mean`` and unbiased sample cov exactly diag(std^2)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, still zero-mean
    z = q * math.sqrt(n - 1)
    return torch.from_numpy(z * std + mean)


def test_frechet_closed_form_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.5])
    fa = _exact_gaussian_features(500, mu_a, sd_a, 0)
    fb = _exact_gaussian_features(400, mu_b, sd_b, 1)
    # |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2 = (1 + 0 + 4) + (4 + 0 + 1) = 10
    assert metrics.frechet_distance(fa, fb) == pytest.approx(10.0, abs=1e-6)
    assert metrics.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6)


def test_frechet_closed_form_1d():
    fa = _exact_gaussian_features(100, np.array([2.0]), np.array([1.0]), 5)
    fb = _exact_gaussian_features(100, np.array([-1.0]), np.array([4.0]), 6)
    # (2 - -1)^2 + 1 + 16 - 2*sqrt(16) = 9 + 9 = 18
    assert metrics.frechet_distance(fa, fb) == pytest.approx(18.0, abs=1e-6)


class _FixedClassifier(nn.Module):
    """Predicts class = round(mean pixel * 10) % 10; features = [mean, std]."""

    def features(self, x):
        return torch.stack([x.flatten(1).mean(1), x.flatten(1).std(1)], 1)

    def forward(self, x):
        cls = (x.flatten(1).mean(1) * 10).round().long() % 10
        return nn.functional.one_hot(cls, 10).float()


def test_class_accuracy_with_given_classifier():
    imgs = torch.stack([torch.full((1, 8, 8), v / 10) for v in range(10)])
    labels = torch.arange(10)
    labels_wrong = labels.clone()
    labels_wrong[:3] = (labels_wrong[:3] + 1) % 10
    clf = _FixedClassifier()
    assert metrics.class_accuracy(imgs, labels, clf) == 1.0
    assert metrics.class_accuracy(imgs, labels_wrong, clf) == pytest.approx(0.7)


def test_feature_frechet_uses_classifier_features():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 1, 8, 8, generator=g)
    clf = _FixedClassifier()
    expected = metrics.frechet_distance(clf.features(a), clf.features(a * 0.5))
    got = metrics.feature_frechet_distance(a, a * 0.5, clf)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > 0.01
    assert metrics.feature_frechet_distance(a, a.clone(), clf) == pytest.approx(0.0, abs=1e-9)


def test_shipped_classifier_on_heldout_digits():
    from ditopt import zoo

    x, y = zoo.heldout_digits()
    clf = zoo.load_classifier()
    acc = metrics.class_accuracy(x, y, clf)
    assert acc >= 0.95
    assert acc == pytest.approx(clf.meta["heldout_accuracy"], abs=1e-6)
    xt, _ = zoo.train_digits()
    # real-vs-real: held-out vs train is close, held-out vs noise is far
    fd_real = metrics.feature_frechet_distance(xt, x, clf)
    fd_noise = metrics.feature_frechet_distance(torch.rand_like(x), x, clf)
    assert fd_real < 0.1 * fd_noise
