"""Where the tissue is on a slide, and the tile grid that covers it.

The mask is computed once on a low-resolution view (about 1-2k px on its long side), so
it costs a thumbnail's worth of decoding whatever the slide size:

- brightfield: Otsu on HSV saturation (glass is grey-white, stained tissue is coloured),
  after taking out pen marks, which are more saturated than any stain or of a hue no
  H&E/IHC stain has (green, deep blue) or near black; then closing, small objects and
  holes, and components without texture (a blurred pen fringe or smear) are dropped;
- fluorescence: Li threshold on the log of the smoothed brightest channel (the
  background is dark, tissue glows or autofluoresces; smoothing bridges sparse nuclei).

Morphology sizes are fractions of the mask area because the mask is always about the
same size whatever the slide's resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_li, threshold_otsu
from skimage.measure import label
from skimage.morphology import disk, remove_small_holes, remove_small_objects

from mupad_core.slide.readers.base import SlideReader

MASK_MIN_SIDE = 1024
MASK_MAX_SIDE = 2048
# Glass stays below ~0.05 saturation and even pale tissue (fat septa, loose stroma, faint
# eosin) reaches ~0.15: Otsu adapts to the stain within this range, never outside it.
TISSUE_SATURATION_RANGE = (0.08, 0.15)
# Median local grey-level spread (0-255 scale, 3x3) below which a component is a smooth
# smear (blurred pen, stain puddle), not tissue.
MIN_TISSUE_TEXTURE = 3.0
MIN_OBJECT_FRACTION = 2e-4
MAX_HOLE_FRACTION = 1e-3
MIN_PEN_STROKE_FRACTION = 5e-4


@dataclass(frozen=True)
class Tile:
    """One tile of a grid: where to read it and where it lands on the target canvas.

    (x, y, w, h) are level-0 pixels; (level_x, ...) the same box on `level`, the level to
    read it from; (target_x, ...) the box on the output canvas at the target pixel size."""

    level: int
    x: int
    y: int
    w: int
    h: int
    level_x: int
    level_y: int
    level_w: int
    level_h: int
    target_x: int
    target_y: int
    target_w: int
    target_h: int
    tissue_fraction: float


def pen_mark_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink on the glass: red above any eosin's saturation, green and dark blue
    (hues no H&E or IHC stain has; light haematoxylin blue is kept), and near black.
    Only stroke-sized objects count, so scattered red cells or dark nuclei stay."""
    return _pen_marks(rgb2hsv(rgb))


def _pen_marks(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    red = ((hue >= 335) | (hue < 12)) & (saturation > 0.6)
    green = (hue >= 70) & (hue < 190) & (saturation > 0.25)
    blue = (hue >= 190) & (hue < 250) & (saturation > 0.25) & ((value < 0.6) | (saturation > 0.6))
    black = value < 0.3
    return remove_small_objects(red | green | blue | black, max_size=int(MIN_PEN_STROKE_FRACTION * hue.size))


def brightfield_tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of a low-resolution uint8 RGB view of a brightfield slide."""
    area = rgb.shape[0] * rgb.shape[1]
    hsv = rgb2hsv(rgb)
    saturation = hsv[..., 1]
    pen_zone = ndimage.binary_dilation(_pen_marks(hsv), disk(2))
    candidates = saturation[~pen_zone]
    if candidates.size == 0 or np.ptp(candidates) == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    low, high = TISSUE_SATURATION_RANGE
    threshold = min(max(threshold_otsu(candidates), low), high)
    tissue = (saturation > threshold) & ~pen_zone
    tissue = _clean(tissue, area) & ~pen_zone
    return _drop_textureless(tissue, rgb.mean(axis=2))


def fluorescence_tissue_mask(image: np.ndarray) -> np.ndarray:
    """Tissue pixels of a low-resolution (H, W, C) fluorescence view, any dtype."""
    data = image.astype(np.float32)
    scale = np.percentile(data, 99.5, axis=(0, 1))
    scale[scale <= 0] = 1
    brightest = (data / scale).max(axis=2)
    smoothed = ndimage.gaussian_filter(brightest, sigma=max(image.shape[:2]) / 100)
    feature = np.log1p(255 * np.clip(smoothed, 0, None))
    if np.ptp(feature) == 0:
        return np.zeros(image.shape[:2], dtype=bool)
    return _clean(feature > threshold_li(feature), feature.size)


def _clean(mask: np.ndarray, area: int) -> np.ndarray:
    """Close small gaps (edge-padded, so tissue touching the border is not eaten), then
    drop specks and fill pinholes."""
    mask = ndimage.binary_closing(np.pad(mask, 2, mode="edge"), disk(2))[2:-2, 2:-2]
    mask = remove_small_objects(mask, max_size=max(int(MIN_OBJECT_FRACTION * area), 4))
    return remove_small_holes(mask, max_size=int(MAX_HOLE_FRACTION * area))


def _drop_textureless(mask: np.ndarray, grey: np.ndarray) -> np.ndarray:
    mean = ndimage.uniform_filter(grey, 3)
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(grey * grey, 3) - mean * mean, 0))
    components = label(mask)
    if components.max() == 0:
        return mask
    medians = ndimage.median(spread, components, index=np.arange(1, components.max() + 1))
    keep = np.concatenate([[False], np.asarray(medians) >= MIN_TISSUE_TEXTURE])
    return keep[components]


def mask_level(reader: SlideReader, min_side: int = MASK_MIN_SIDE) -> int:
    """The coarsest level still at least `min_side` px on its long side (else level 0)."""
    large_enough = [i for i, level in enumerate(reader.levels) if max(level.shape[:2]) >= min_side]
    return max(large_enough, default=0)


def low_resolution_view(reader: SlideReader, level: int, max_side: int = MASK_MAX_SIDE) -> tuple[np.ndarray, float]:
    """The level, block-averaged down to at most `max_side` px, and its level-0 downsample;
    computed chunk by chunk so a single-level gigapixel slide never sits in memory."""
    image = reader.levels[level]
    factor = math.ceil(max(image.shape[:2]) / max_side)
    if factor > 1:
        height, width = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
        rows = factor * max(1, image.chunksize[0] // factor)
        cols = factor * max(1, image.chunksize[1] // factor)
        image = da.coarsen(np.mean, image[:height, :width].rechunk((rows, cols, -1)), {0: factor, 1: factor})
    pixels = np.asarray(image.compute(scheduler="threads"))
    return pixels, reader.level_downsamples[level] * factor


def tissue_mask(
    reader: SlideReader, level: int | None = None, *, max_side: int = MASK_MAX_SIDE
) -> tuple[np.ndarray, float]:
    """(mask, downsample): a boolean tissue mask and the level-0 pixels per mask pixel.

    `level` defaults to the coarsest level of at least ~1k px; it is block-averaged to at
    most `max_side` px. Brightfield and fluorescence slides use different features."""
    level = mask_level(reader) if level is None else level
    pixels, downsample = low_resolution_view(reader, level, max_side)
    if reader.kind == "fluorescence":
        return fluorescence_tissue_mask(pixels), downsample
    full_scale = np.iinfo(reader.dtype).max if np.issubdtype(reader.dtype, np.integer) else 1.0
    rgb = np.clip(np.rint(pixels[..., :3].astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return brightfield_tissue_mask(rgb), downsample


class TissueMap:
    """A tissue mask with its summed-area table: the tissue fraction of any level-0 box in
    constant time (the engine asks it for every block and every window)."""

    def __init__(self, mask: np.ndarray, downsample: float):
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = float(downsample)
        self.summed = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @classmethod
    def of(cls, reader: SlideReader) -> TissueMap:
        return cls(*tissue_mask(reader))

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Tissue fraction of the level-0 box (x, y, w, h); parts beyond the mask count as glass."""
        d = self.downsample
        return _box_fraction(self.summed, x / d, y / d, w / d, h / d)


def tile_grid(
    reader: SlideReader,
    tile_px: int,
    target_mpp: float,
    overlap_px: int = 0,
    mask: tuple[np.ndarray, float] | None = None,
    min_tissue: float = 0.05,
) -> list[Tile]:
    """Tiles of `tile_px` target pixels (at `target_mpp` µm/px) on a regular grid from the
    slide's top-left corner, stepping `tile_px - overlap_px`, keeping those whose tissue
    fraction is at least `min_tissue` (parts beyond the slide count as no tissue).

    `mask` is a `tissue_mask` result; it is computed when not given."""
    if tile_px <= 0 or not 0 <= overlap_px < tile_px:
        raise ValueError(f"need tile_px > 0 and 0 <= overlap_px < tile_px, got {tile_px}, {overlap_px}")
    base_mpp_x, base_mpp_y = reader.level_mpp(0)
    scale_x, scale_y = target_mpp / base_mpp_x, target_mpp / base_mpp_y  # level-0 px per target px
    width, height = reader.dimensions
    stride = tile_px - overlap_px
    columns = max(1, math.ceil((width / scale_x - overlap_px) / stride))
    rows = max(1, math.ceil((height / scale_y - overlap_px) / stride))
    level = reader.best_level_for_mpp(target_mpp)
    level_downsample = reader.level_downsamples[level]
    tissue = TissueMap.of(reader) if mask is None else TissueMap(*mask)

    tiles = []
    for row in range(rows):
        for column in range(columns):
            target_x, target_y = column * stride, row * stride
            x, y = round(target_x * scale_x), round(target_y * scale_y)
            w, h = round(tile_px * scale_x), round(tile_px * scale_y)
            fraction = tissue.fraction(x, y, w, h)
            if fraction < min_tissue:
                continue
            tiles.append(
                Tile(
                    level=level,
                    x=x,
                    y=y,
                    w=w,
                    h=h,
                    level_x=round(x / level_downsample),
                    level_y=round(y / level_downsample),
                    level_w=max(1, round(w / level_downsample)),
                    level_h=max(1, round(h / level_downsample)),
                    target_x=target_x,
                    target_y=target_y,
                    target_w=tile_px,
                    target_h=tile_px,
                    tissue_fraction=fraction,
                )
            )
    return tiles


def _box_fraction(summed: np.ndarray, x: float, y: float, w: float, h: float) -> float:
    """Mean of the mask over a box (mask pixels, at least one pixel), from its summed-area
    table; the part of the box outside the mask counts as zero."""
    x0, y0 = math.floor(x), math.floor(y)
    x1, y1 = max(math.ceil(x + w), x0 + 1), max(math.ceil(y + h), y0 + 1)
    box_area = (x1 - x0) * (y1 - y0)
    mask_h, mask_w = summed.shape[0] - 1, summed.shape[1] - 1
    cx0, cx1 = (min(max(v, 0), mask_w) for v in (x0, x1))
    cy0, cy1 = (min(max(v, 0), mask_h) for v in (y0, y1))
    inside = summed[cy1, cx1] - summed[cy0, cx1] - summed[cy1, cx0] + summed[cy0, cx0]
    return float(inside) / box_area
