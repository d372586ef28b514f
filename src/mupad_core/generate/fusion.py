"""Overlapping windows and the smooth weights that fuse them (MultiDiffusion-style).

At every sampler step each window predicts a velocity; the canvas velocity is the
weighted mean of the windows covering each position. Weights ramp down towards a
window's edges (where it has least context) but never reach zero, so a canvas border
covered by a single window is still defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    y: int
    x: int
    h: int
    w: int


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts covering [0, length) with windows of `size`; the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def window_grid(height: int, width: int, size: int, overlap: int) -> list[Window]:
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), got {overlap}")
    stride = size - overlap
    return [
        Window(y, x, min(size, height), min(size, width))
        for y in window_starts(height, size, stride)
        for x in window_starts(width, size, stride)
    ]


def ramp_weights(h: int, w: int, ramp: int, floor: float = 1e-3) -> torch.Tensor:
    """(h, w) weights: a raised-cosine ramp of `ramp` px at each edge, 1 inside."""

    def profile(n: int) -> torch.Tensor:
        p = torch.ones(n)
        r = min(ramp, n // 2)
        if r > 0:
            edge = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(r) + 0.5) / r)
            p[:r] = torch.minimum(p[:r], edge)
            p[n - r :] = torch.minimum(p[n - r :], edge.flip(0))
        return p.clamp_min(floor)

    return profile(h)[:, None] * profile(w)[None, :]
