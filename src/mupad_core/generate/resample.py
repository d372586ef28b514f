"""Source pixels at the target pixel size, the same whichever block asks for them.

The engine reads each block (plus margin) on its own, so resampling a block's box as a
whole would tie every pixel's value to where its block happens to start: two block sizes
would give two slides. Here each output pixel is a fixed function of its global
position instead: one slide-wide map sends its centre to source-level coordinates, and
it averages the source there with a triangle kernel widened to the pixel's footprint
when downsampling (antialiased bilinear). Blocks then only choose which pixels to
compute, never their values. At the source's own pixel size the map is the identity
and pixels pass through untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PixelMap:
    """Output pixel (row, col) of the ROI grid -> source level coordinates, one per slide."""

    level: int
    origin: tuple[float, float]  # (x, y) of the ROI corner in level px
    step: tuple[float, float]  # (x, y) level px per output px

    @property
    def identity(self) -> bool:
        """Whole level pixels one to one: read them, nothing to resample."""
        return self.step == (1.0, 1.0) and all(float(o).is_integer() for o in self.origin)


def pixel_map(reader, roi: tuple[int, int, int, int], target_mpp: float) -> PixelMap:
    """The map for output pixels of `target_mpp` over `roi` (level-0 px) of `reader`.

    The level is the coarsest one still at least as fine as the target, so the map only
    ever downsamples (or upsamples from level 0 when the target is finer than the scan).
    """
    mpp_x, mpp_y = reader.level_mpp(0)
    level = reader.best_level_for_mpp(target_mpp)
    ds = reader.level_downsamples[level]
    step = (snap_step(target_mpp / mpp_x / ds), snap_step(target_mpp / mpp_y / ds))
    return PixelMap(level, (roi[0] / ds, roi[1] / ds), step)


def snap_step(step: float) -> float:
    """A step within float noise of 1 is 1: mpp values rarely divide exactly."""
    return 1.0 if abs(step - 1.0) < 1e-9 else step


def axis_taps(start: int, count: int, origin: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (count, K) and normalised weights (count, K) of output pixels start..start+count.

    Computed from each pixel's global index only, so any block gets identical taps.
    """
    radius = max(step, 1.0)
    centres = origin + (np.arange(start, start + count, dtype=np.float64) + 0.5) * step - 0.5
    first = np.floor(centres - radius).astype(np.int64) + 1
    width = math.ceil(2 * radius) + 1
    index = first[:, None] + np.arange(width)[None, :]
    weight = np.clip(1.0 - np.abs(index - centres[:, None]) / radius, 0.0, None)
    weight /= weight.sum(axis=1, keepdims=True)
    return index, weight.astype(np.float32)


def read_resampled(reader, pmap: PixelMap, oy: int, ox: int, oh: int, ow: int) -> np.ndarray | torch.Tensor:
    """Output box (oy, ox, oh, ow) of the ROI grid: (h, w, C) raw pixels where the map is the
    identity, else (C, oh, ow) float32 in [0, 1] resampled."""
    if pmap.identity:
        x0, y0 = int(pmap.origin[0]), int(pmap.origin[1])
        return reader.read_region(pmap.level, x0 + ox, y0 + oy, ow, oh)
    iy, wy = axis_taps(oy, oh, pmap.origin[1], pmap.step[1])
    ix, wx = axis_taps(ox, ow, pmap.origin[0], pmap.step[0])
    # Read only the part of the taps' box that lies on the slide: at a coarse target the
    # window margin reaches far past the edges, and reading (then compositing) all that
    # background cost more than the network on a small slide. Taps outside get the
    # background's value, exactly what reading it would have given.
    width, height = _level_size(reader, pmap.level)
    y0, y1 = max(int(iy.min()), 0), min(int(iy.max()) + 1, height)
    x0, x1 = max(int(ix.min()), 0), min(int(ix.max()) + 1, width)
    fill = float(reader.background) / _peak(reader.dtype)
    if y1 <= y0 or x1 <= x0:  # wholly off the slide
        return torch.full((reader.levels[pmap.level].shape[2], oh, ow), fill)
    source = to_unit_float(reader.read_region(pmap.level, x0, y0, x1 - x0, y1 - y0))  # (C, h, w)
    rows = _weighted_gather(source, iy - y0, wy, dim=1, fill=fill)
    return _weighted_gather(rows, ix - x0, wx, dim=2, fill=fill)


def _level_size(reader, level: int) -> tuple[int, int]:
    """(W, H) of a level."""
    height, width = reader.levels[level].shape[:2]
    return int(width), int(height)


def _weighted_gather(image: torch.Tensor, index: np.ndarray, weight: np.ndarray, dim: int, fill: float) -> torch.Tensor:
    """sum_k weight[:, k] * image.index_select(dim, index[:, k]), tap by tap (no dense matrix);
    taps outside the image read `fill`."""
    shape = [1, 1, 1]
    shape[dim] = -1
    inside = (index >= 0) & (index < image.shape[dim])
    outside_weight = torch.from_numpy((weight * ~inside).sum(axis=1, dtype=np.float32))
    index = torch.from_numpy(np.clip(index, 0, image.shape[dim] - 1))
    weight = torch.from_numpy(weight * inside)
    out = (fill * outside_weight).reshape(shape).expand(
        *[image.shape[d] if d != dim else index.shape[0] for d in range(3)]).clone()
    for k in range(index.shape[1]):
        out += image.index_select(dim, index[:, k]) * weight[:, k].reshape(shape)
    return out


def _peak(dtype: np.dtype) -> float:
    dtype = np.dtype(dtype)
    return 255.0 if dtype == np.uint8 else float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0


def to_unit_float(pixels: np.ndarray) -> torch.Tensor:
    """(h, w, C) pixels of any integer or float dtype as (C, h, w) float32 in [0, 1]."""
    # Channels first in memory: index_select along rows of a channels-last view was 8x slower.
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous().float() / _peak(pixels.dtype)
