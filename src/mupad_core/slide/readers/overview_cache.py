"""Coarse levels for big images that have none (flat TIFF, PNG), computed once and cached.

A 40k² single-level TIFF has no pyramid: a viewer zoomed out to the whole image would read every
pixel at every redraw, and the tissue mask would read level 0. The first open streams the image
once in row bands (memory: one band), averages 4x4, then 2x2 again and again, into a small zarr
pyramid in the user cache, keyed by the file's path, size and modification time, and renamed
into place only when complete. Later opens read the coarse levels from there in milliseconds.
A PNG can only be decoded whole, so its level 0 is cached too (tiled), and later opens never
decode it again.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from mupad_core.slide.readers.base import SlideReader, lazy_level

# Single-level images with a side above this get cached coarse levels.
MIN_FLAT_SIDE_PX = 8192
FIRST_FACTOR = 4  # no 2x level: zoomed in that far, a viewer reads only a canvas-sized part of level 0
COARSEST_SIDE_PX = 1024
BAND_ROWS = 2048  # a level-0 block read at once: 2048 x 4096 x 3 bytes = 25 MB for RGB;
# whole chunks of the 4x level (FIRST_FACTOR * CHUNK_PX rows), so threads never share a chunk
BLOCK_COLUMNS = 4096  # a multiple of FIRST_FACTOR * CHUNK_PX (and of CHUNK_PX at level 0)
CHUNK_PX = 512

Progress = Callable[[int, int], None]


def cache_root() -> Path:
    """`$MUPAD_HOME/overviews` (default ~/.cache/mupad/overviews)."""
    from mupad_core.hub import mupad_cache_dir

    return mupad_cache_dir() / "overviews"


def cache_path(path: Path) -> Path:
    """Where the overview of `path` lives: changes when the file does (size, mtime)."""
    stat = Path(path).stat()
    key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_root() / f"{Path(path).name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.zarr"


def needs_overview(reader: SlideReader) -> bool:
    return len(reader.levels) == 1 and max(reader.levels[0].shape[:2]) > MIN_FLAT_SIDE_PX


def add_overview(reader: SlideReader, progress: Progress | None = None) -> SlideReader:
    """Give a big single-level image cached coarse levels (built now when missing)."""
    if not needs_overview(reader):
        return reader
    store = cache_path(reader.path)
    if not store.exists():
        build_overview(reader, store, progress)
    group = zarr.open_group(store, mode="r")
    factors = [int(f) for f in group.attrs["factors"]]
    levels = [lazy_level(group[str(f)], reader.path, i, group[str(f)].chunks, f"overview-{store.name}")
              for i, f in enumerate(factors)]
    if factors[0] == 1:  # a whole-decode format: level 0 from the cache, not a second decode
        reader.levels = levels
        reader.level_downsamples = [float(f) for f in factors]
    else:
        reader.levels = [reader.levels[0], *levels]
        reader.level_downsamples = [1.0, *(float(f) for f in factors)]
    reader.properties["mupad.overview_cache"] = str(store)
    return reader


def build_overview(reader: SlideReader, store: Path, progress: Progress | None = None) -> Path:
    """Stream level 0 once into the cached pyramid at `store` (via a partial of this process).

    Two processes may build the same overview at once (dask workers on one slide, two
    viewers): each writes its own partial and the first to finish wins; the other keeps it."""
    level0 = reader.levels[0]
    height, width, channels = level0.shape
    whole_decode = reader.backend == "pil"
    factors = ([1] if whole_decode else []) + [FIRST_FACTOR]
    while max(math.ceil(height / factors[-1]), math.ceil(width / factors[-1])) > COARSEST_SIDE_PX:
        factors.append(factors[-1] * 2)
    partial = store.with_name(f"{store.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(partial, mode="w")
    arrays = {
        f: group.create_array(str(f), shape=(math.ceil(height / f), math.ceil(width / f), channels),
                              chunks=(CHUNK_PX, CHUNK_PX, channels), dtype=level0.dtype)
        for f in factors
    }
    band = max(BAND_ROWS // FIRST_FACTOR, 1) * FIRST_FACTOR
    blocks = [(top, left) for top in range(0, height, band) for left in range(0, width, BLOCK_COLUMNS)]

    def copy(block: tuple[int, int]) -> None:
        # Each block covers whole chunks of every array it writes, so threads never share a chunk.
        top, left = block
        pixels = np.asarray(level0[top : top + band, left : left + BLOCK_COLUMNS].compute(scheduler="sync"))
        if whole_decode:
            arrays[1][top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        pooled = mean_pool(pixels, FIRST_FACTOR)
        row, column = top // FIRST_FACTOR, left // FIRST_FACTOR
        arrays[FIRST_FACTOR][row : row + pooled.shape[0], column : column + pooled.shape[1]] = pooled

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mupad-overview") as pool:
        for done, _ in enumerate(pool.map(copy, blocks), start=1):
            if progress is not None:
                progress(done, len(blocks) + 1)
    coarse = [f for f in factors if f > FIRST_FACTOR]
    for finer, f in zip([FIRST_FACTOR, *coarse], coarse):
        for top in range(0, arrays[finer].shape[0], 2 * CHUNK_PX):  # bands again: memory stays flat
            arrays[f][top // 2 : (top + 2 * CHUNK_PX) // 2] = mean_pool(arrays[finer][top : top + 2 * CHUNK_PX], 2)
    group.attrs["factors"] = factors
    group.attrs["source"] = {"path": str(reader.path), "shape": [height, width, channels]}
    if progress is not None:
        progress(len(blocks) + 1, len(blocks) + 1)
    try:
        os.replace(partial, store)
    except OSError:  # another process finished the same overview first: its copy is as good
        if not (store / "zarr.json").exists() and not (store / ".zgroup").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return store


def mean_pool(pixels: np.ndarray, factor: int) -> np.ndarray:
    """factor x factor area mean of (H, W, C); a partial last block averages what it has."""
    height, width = pixels.shape[:2]
    pad = ((0, -height % factor), (0, -width % factor), (0, 0))
    padded = np.pad(pixels, pad, mode="edge") if any(p[1] for p in pad) else pixels
    h, w = padded.shape[0] // factor, padded.shape[1] // factor
    mean = padded.reshape(h, factor, w, factor, -1).mean(axis=(1, 3), dtype=np.float32)
    if pixels.dtype.kind in "iu":
        np.rint(mean, out=mean)
    return mean.astype(pixels.dtype)

