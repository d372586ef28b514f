"""How far a set of generated images lies from a set of real ones, in some embedding.

FID (Fréchet distance of Gaussians fitted to the two feature sets) and KID (unbiased
squared MMD with the cubic polynomial kernel, averaged over subsets) as the paper reports
them: with a 95% confidence interval (subsampling bootstrap), because a few hundred pathology tiles give
a noisy FID and a number without its spread invites over-reading. Inputs are feature
matrices (N, D) from `evaluate.features`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import linalg


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # bootstrap 2.5th percentile
    high: float  # bootstrap 97.5th percentile
    n_a: int
    n_b: int
    resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a (N, D) and b (M, D): |mu_a - mu_b|² + Tr(Σa + Σb - 2 (Σa Σb)^½)."""
    a, b = _check(a, b, minimum=2)
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    n, m = len(a), len(b)
    trace_a = (xa**2).sum() / (n - 1)
    trace_b = (xb**2).sum() / (m - 1)
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * _trace_sqrt_product(xa, xb))


def _trace_sqrt_product(xa: np.ndarray, xb: np.ndarray) -> float:
    """Tr((Σa Σb)^½) of centred features. With fewer images than dimensions (the usual case
    for pathology tiles: hundreds of images, 2048-d) it is the nuclear norm of Xa Xbᵀ over
    sqrt((n-1)(m-1)): ΣaΣb = XaᵀXa XbᵀXb / c has the non-zero eigenvalues of (XaXbᵀ)(XaXbᵀ)ᵀ / c.
    Exact, and an (n x m) SVD instead of a (D x D) matrix square root."""
    n, m, d = len(xa), len(xb), xa.shape[1]
    c = (n - 1) * (m - 1)
    if min(n, m) <= d:
        return float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(c))
    cov_a, cov_b = xa.T @ xa / (n - 1), xb.T @ xb / (m - 1)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularise, as pytorch-fid does
        eps = np.eye(d) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(np.trace(root.real))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 1000, subsets: int = 100,
                              seed: int = 0) -> float:
    """KID: unbiased MMD² with k(x, y) = (x·y / D + 1)³, averaged over random subsets
    (the whole sets when they are smaller than `subset_size`)."""
    a, b = _check(a, b, minimum=2)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets if m < max(len(a), len(b)) else 1):
        x = a[rng.choice(len(a), m, replace=False)] if m < len(a) else a
        y = b[rng.choice(len(b), m, replace=False)] if m < len(b) else b
        values.append(_mmd2_unbiased(x, y))
    return float(np.mean(values))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def bootstrap(metric: Callable[[np.ndarray, np.ndarray], float], a: np.ndarray, b: np.ndarray,
              resamples: int = 200, seed: int = 0, fraction: float = 0.5) -> Estimate:
    """The metric on the full sets, and its 95% interval by subsampling (the m-out-of-n
    bootstrap): the metric on random halves drawn without replacement, its deviations from
    the full-set value (centred on their median) shrunk by sqrt(m / n). Drawing with replacement would put duplicate
    images in a set, which biases both FID (a degenerate covariance) and KID (self-similar
    pairs), so the usual bootstrap is not used."""
    a, b = _check(a, b, minimum=4)
    rng = np.random.default_rng(seed)
    value = metric(a, b)
    m_a, m_b = max(2, int(len(a) * fraction)), max(2, int(len(b) * fraction))
    deviations = [metric(a[rng.choice(len(a), m_a, replace=False)], b[rng.choice(len(b), m_b, replace=False)]) - value
                  for _ in range(resamples)]
    shrink = np.sqrt(min(m_a, m_b) / min(len(a), len(b)))
    if not deviations:
        return Estimate(value, float("nan"), float("nan"), len(a), len(b), resamples)
    # Centred on their median: FID on half-size sets is biased upwards (fewer images, noisier
    # covariances), which would otherwise push the whole interval above the full-set value.
    spread = np.percentile(np.asarray(deviations) - np.median(deviations), [2.5, 97.5])
    low, high = value + shrink * spread
    return Estimate(value, float(low), float(high), len(a), len(b), resamples)


def fid(a: np.ndarray, b: np.ndarray, resamples: int = 200, seed: int = 0) -> Estimate:
    return bootstrap(frechet_distance, a, b, resamples, seed)


def kid(a: np.ndarray, b: np.ndarray, resamples: int = 200, seed: int = 0, subset_size: int = 1000) -> Estimate:
    return bootstrap(lambda x, y: kernel_inception_distance(x, y, subset_size=subset_size, subsets=10, seed=seed),
                     a, b, resamples, seed)


def _check(a, b, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with one D, got {a.shape} and {b.shape}")
    if len(a) < minimum or len(b) < minimum:
        raise ValueError(f"need at least {minimum} images per set, got {len(a)} and {len(b)}")
    return a, b
