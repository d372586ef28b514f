"""Pixel-level agreement of a generated image with its registered reference.

Images are (H, W, C) arrays of one dtype range; every function returns one number per
channel so per-marker results (mIF) stay apart.
"""

from __future__ import annotations

import numpy as np


def psnr(generated: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB, per channel."""
    a, b = _pair(generated, reference)
    mse = ((a - b) ** 2).mean(axis=(0, 1))
    return 10 * np.log10(peak**2 / np.maximum(mse, 1e-12))


def pearson(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pixel-wise Pearson correlation, per channel (NaN where a channel is constant)."""
    a, b = _pair(generated, reference)
    return _corr(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))


def patch_pearson(generated: np.ndarray, reference: np.ndarray, box: int = 8) -> np.ndarray:
    """Correlation of `box`-px box means, per channel: GigaTIME's patch-level PCC for mIF,
    which forgives the sub-cellular misplacement that pixel PCC punishes."""
    a, b = _pair(generated, reference)
    h, w = (a.shape[0] // box) * box, (a.shape[1] // box) * box
    if h == 0 or w == 0:
        raise ValueError(f"image {a.shape[:2]} is smaller than one {box}-px box")

    def means(x):
        return x[:h, :w].reshape(h // box, box, w // box, box, -1).mean(axis=(1, 3))

    ma, mb = means(a), means(b)
    return _corr(ma.reshape(-1, ma.shape[-1]), mb.reshape(-1, mb.shape[-1]))


def _pair(generated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(generated, np.float64), np.asarray(reference, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.shape != b.shape:
        raise ValueError(f"generated {a.shape} and reference {b.shape} differ in shape")
    return a, b


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denominator = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=0) / denominator, np.nan)
