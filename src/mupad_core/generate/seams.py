"""How visible are window borders? The measure used by tests and benchmarks."""

from __future__ import annotations

import numpy as np


def seam_ratio(image: np.ndarray, edges: set[int]) -> float:
    """Mean |gradient| across the given borders over the mean elsewhere, worst of x and y.

    `image` is (H, W, C); `edges` are pixel offsets where a window starts or ends (the
    gradient between columns i-1 and i counts as "at an edge" when i is in `edges`).
    1.0 means borders are invisible to this measure; independent tiles give well above.
    """
    img = image.astype(np.float64)
    ratios = []
    for axis, reduce in ((1, (0, 2)), (0, (1, 2))):
        g = np.abs(np.diff(img, axis=axis)).mean(axis=reduce)
        at = np.array([i + 1 in edges for i in range(len(g))])
        ratios.append(g[at].mean() / g[~at].mean())
    return max(ratios)


def window_edges(window_px: int, overlap_px: int, extent: int) -> set[int]:
    """Starts and ends of the engine's global window grid within [0, extent)."""
    stride = window_px - overlap_px
    starts = range(-window_px, extent + window_px, stride)
    return {e for s in starts for e in (s, s + window_px) if 0 < e < extent}
