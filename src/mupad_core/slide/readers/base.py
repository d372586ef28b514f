"""One interface for every whole-slide format, modelled on napari-wsi's backends.

A reader exposes the slide as a pyramid of lazy dask arrays, shape (H, W, C), highest
resolution first, chunked along the file's own tiles, plus the metadata the pipeline
needs (pixel size, channels, kind). Opening a reader never decodes pixels; chunks are
read when computed, and a file that fails then raises a `SlideError` naming the file,
the level and the region.

Pixel sizes are never guessed: a reader either has the file's own, the caller's
override, or raises `MissingPixelSizeError` (unless built with ``require_mpp=False``,
for viewing only, in which case ``mpp`` is None).
"""

from __future__ import annotations

import abc
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import dask.array as da
import numpy as np
from dask.base import tokenize

Kind = Literal["brightfield", "fluorescence"]
MppLike = float | tuple[float, float]

# A base level coarser than this is no microscope's: it is a print/screen resolution that
# image software writes by default (72 dpi = 352.8 µm, 96 dpi = 264.6 µm, 300 dpi = 84.7 µm).
MAX_PLAUSIBLE_MPP = 50.0
MIN_PLAUSIBLE_MPP = 0.01
# Chunks of about this many pixels per side keep the dask graph small on 100k-px slides
# while staying aligned to the file's own tiles.
TARGET_CHUNK_PX = 1024
# Axis letters (tifffile's, and NGFF axis types mapped onto them) that may hold channels
# when they are the only non-singleton axis besides Y and X.
CHANNEL_LIKE_AXES = "CSIQ"
ArrayT = TypeVar("ArrayT", np.ndarray, da.Array)


class SlideError(Exception):
    """A slide that cannot be opened or read; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


class MissingPixelSizeError(SlideError):
    """The file states no usable pixel size and the caller gave none."""


def resolve_mpp(
    path: str | os.PathLike,
    file_mpp: tuple[float, float] | None,
    override: MppLike | None,
    *,
    required: bool = True,
) -> tuple[float, float] | None:
    """The pixel size to use: the caller's if given (warning when it contradicts the file),
    else the file's, else an error. Implausible file values count as missing."""
    placeholder_note = ""
    if file_mpp is not None and not all(MIN_PLAUSIBLE_MPP <= v <= MAX_PLAUSIBLE_MPP for v in file_mpp):
        placeholder_note = (
            f" (it states {file_mpp[0]:.4g} µm/px, a print/screen placeholder resolution, "
            "not a microscope pixel size)"
        )
        file_mpp = None
    if override is None:
        if file_mpp is None and required:
            raise MissingPixelSizeError(
                path,
                f"the file has no pixel size{placeholder_note}; pass --mpp with the size of a "
                "level-0 pixel in µm (mpp= in Python)",
            )
        return file_mpp
    mpp = mpp_pair(override)
    if file_mpp is not None and not np.allclose(file_mpp, mpp, rtol=0.01):
        warnings.warn(
            f"{path}: the given mpp {mpp[0]:.4g}x{mpp[1]:.4g} µm/px overrides the file's "
            f"{file_mpp[0]:.4g}x{file_mpp[1]:.4g} µm/px",
            UserWarning,
            stacklevel=3,
        )
    return mpp


def mpp_pair(mpp: MppLike) -> tuple[float, float]:
    """(x, y) µm/px from a number or a pair; rejects non-positive sizes."""
    pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
    if len(pair) != 2 or not all(v > 0 and math.isfinite(v) for v in pair):
        raise ValueError(f"mpp must be a positive number or an (x, y) pair of them, got {mpp!r}")
    return pair


def background_value(dtype: np.dtype, kind: Kind) -> float | int:
    """White glass for brightfield, no signal for fluorescence."""
    if kind == "fluorescence":
        return 0
    return np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0


def composite_alpha(rgba: np.ndarray, background: float, *, premultiplied: bool) -> np.ndarray:
    """Drop alpha by compositing onto the background, so transparent reads as 'no slide here'.

    Straight alpha is what openslide-python, PNG and most TIFFs give; TIFF 'associated'
    alpha is premultiplied. Only partly transparent pixels need the float arithmetic: opaque
    ones keep their colour and, with straight alpha, clear ones (OpenSlide's padding past the
    scan's edge) are the background, so a read that reaches past the edge costs a mask and a
    fill, not a float pass over the whole region."""
    opaque = np.iinfo(rgba.dtype).max if rgba.dtype.kind in "ui" else 1.0
    alpha = rgba[..., 3]
    if (alpha == opaque).all():
        return np.ascontiguousarray(rgba[..., :3])
    out = np.ascontiguousarray(rgba[..., :3])
    mixed = alpha != opaque
    if not premultiplied:
        clear = alpha == 0
        out[clear] = np.asarray(background).astype(rgba.dtype)
        mixed &= ~clear
    if mixed.any():
        rgb = out[mixed].astype(np.float32)
        a = alpha[mixed, None].astype(np.float32) / float(opaque)
        composited = rgb + background * (1 - a) if premultiplied else rgb * a + background * (1 - a)
        if rgba.dtype.kind in "ui":
            composited = np.rint(composited)
        out[mixed] = composited.astype(rgba.dtype)
    return out


def aligned_chunk(native: int, extent: int, target: int = TARGET_CHUNK_PX) -> int:
    """A chunk length that is a whole number of the file's tiles and about `target` long."""
    native = max(1, min(native, extent))
    if native >= target:
        return native
    return min(native * math.ceil(target / native), extent)


def file_token(path: Path, *extra: Any) -> str:
    """A dask name part that changes when the file does, so cached chunks never go stale."""
    stat = path.stat()
    return tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size, *extra)


def to_yxc(level: ArrayT, axes: str, path: Path) -> ArrayT:
    """Reorder a level to (Y, X, C): singleton extra axes are dropped, one extra axis of
    channel-like kind becomes C, anything else (Z stacks, time series) is refused."""
    extra = [(index, axis) for index, axis in enumerate(axes) if axis not in "YX"]
    big = [(index, axis) for index, axis in extra if level.shape[index] > 1]
    if len(big) > 1 or (big and big[0][1] not in CHANNEL_LIKE_AXES):
        described = ", ".join(f"{axis}={level.shape[index]}" for index, axis in big)
        raise SlideError(path, f"has several planes per pixel ({described}); only 2D slides are supported")
    channel_index = big[0][0] if big else None
    selection = tuple(
        slice(None) if axis in "YX" or index == channel_index else 0 for index, axis in enumerate(axes)
    )
    kept = [axis for index, axis in enumerate(axes) if axis in "YX" or index == channel_index]
    level = level[selection]
    if channel_index is None:
        return level.transpose([kept.index("Y"), kept.index("X")])[..., np.newaxis]
    return level.transpose([kept.index("Y"), kept.index("X"), kept.index(axes[channel_index])])


class GuardedArray:
    """An array-like over a file's pixels whose read failures become a `SlideError`.

    Dask calls `__getitem__` per chunk; whatever the decoder raises (corrupt tile,
    unsupported codec, truncated file) is re-raised naming the file, level and region."""

    def __init__(self, source: Any, path: Path, level: int):
        self.source = source
        self.path = path
        self.level = level
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(source.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        try:
            return np.asarray(self.source[key])
        except SlideError:
            raise
        except Exception as error:
            region = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in key)
            raise SlideError(
                self.path, f"cannot read level {self.level} pixels [{region}]: {type(error).__name__}: {error}"
            ) from error


class ContiguousPixels:
    """Array-like over uncompressed pixels stored contiguously in a file (a flat TIFF written in
    one strip, or strips back to back): each read is a few `pread`s of just the bytes asked for.

    A memory map would do the same reads but keep every page it touched resident, so an overview
    of a 40k² image would hold gigabytes; tifffile's zarr view would decode the whole strip."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        items = [key[axis] if axis < len(key) else slice(None) for axis in range(self.ndim)]
        if not all(isinstance(item, slice) and (item.step or 1) > 0 for item in items):
            raise TypeError(f"{self.path}: only slices with a positive step are supported, got {key!r}")
        if any((item.step or 1) != 1 for item in items):  # read the span, then take every n-th
            span = tuple(slice(item.start, item.stop) for item in items)
            return self[span][tuple(slice(None, None, item.step) for item in items)]
        ranges = []
        for item, extent in zip(items, self.shape):
            start, stop, _ = item.indices(extent)
            ranges.append((start, max(start, stop)))
        out_shape = tuple(b - a for a, b in ranges)
        out = np.empty(out_shape, self.dtype)
        if out.size == 0:
            return out
        # Trailing axes read whole merge into one contiguous run with the last partial axis.
        split = self.ndim - 1
        while split > 0 and ranges[split] == (0, self.shape[split]):
            split -= 1
        inner = int(np.prod(self.shape[split + 1 :], dtype=np.int64))
        run = out_shape[split] * inner
        strides = [int(np.prod(self.shape[axis + 1 :], dtype=np.int64)) for axis in range(self.ndim)]
        runs = out.reshape(-1, run)
        nbytes = run * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for row, lead in enumerate(np.ndindex(*out_shape[:split])):
                element = sum((ranges[a][0] + i) * strides[a] for a, i in enumerate(lead))
                element += ranges[split][0] * strides[split]
                data = os.pread(fd, nbytes, self.offset + element * self.dtype.itemsize)
                if len(data) != nbytes:
                    raise OSError(f"file ends early: {len(data)} of {nbytes} bytes at row {row}")
                runs[row] = np.frombuffer(data, self.dtype)
        finally:
            os.close(fd)
        return out


class DecodeOnce:
    """Array-like for formats that can only be decoded whole (PNG, JPEG): the first chunk
    read decodes the image, later chunks slice the cached pixels."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, decode: Callable[[], np.ndarray]):
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.ndim = len(shape)
        self._decode = decode
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                self._pixels = self._decode()
        return self._pixels[key]


def lazy_level(
    source: Any, path: Path, level: int, chunks: tuple[int, ...], name_prefix: str
) -> da.Array:
    """A dask array over an array-like, guarded so read failures name the file."""
    return da.from_array(
        GuardedArray(source, path, level),
        chunks=chunks,
        name=f"{name_prefix}-level{level}-{file_token(path, chunks)}",
        meta=np.empty((0,) * len(source.shape), dtype=source.dtype),
        asarray=True,
        fancy=False,
        lock=False,
    )


class LazyImageMap(Mapping[str, np.ndarray]):
    """Associated images (label, macro, thumbnail), decoded on first access and cached."""

    def __init__(self, names: Sequence[str], load: Callable[[str], np.ndarray]):
        self._names = list(names)
        self._load = load
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LazyImageMap({self._names})"


class SlideReader(abc.ABC):
    """An open slide: lazy (H, W, C) levels, highest resolution first, and its metadata.

    Attributes: `path`, `levels`, `level_downsamples`, `mpp` ((x, y) µm per level-0 pixel;
    None only when opened with ``require_mpp=False``), `file_mpp` (what the file states),
    `kind`, `channel_names`, `vendor`, `objective_power`, `associated_images` (decoded on
    access) and `properties` (the raw metadata).

    Subclasses gather everything from the file and hand it to this constructor, which
    settles the pixel size in one place for all formats."""

    backend: str = ""
    # (y, x) of level-0 pixel (0, 0)'s centre in the file's world, µm (pixels without a size):
    # non-zero for OME-Zarr results of a region, which lie where the region lies on its slide.
    origin: tuple[float, float] = (0.0, 0.0)
    # RRGGBB per channel when the file states display colours (OME-Zarr omero, OME-XML Color).
    channel_colors: list[str] | None = None
    # A big flat image opened for a viewer while its overview is still being built
    # (`open_slide(overview="background")`): an `overview_cache.OverviewBuild`, else None.
    overview_build = None

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        levels: list[da.Array],
        level_downsamples: list[float],
        file_mpp: tuple[float, float] | None,
        mpp: MppLike | None,
        require_mpp: bool,
        kind: Kind,
        channel_names: list[str],
        vendor: str,
        objective_power: float | None,
        associated_images: Mapping[str, np.ndarray],
        properties: dict[str, Any],
    ):
        self.path = Path(path)
        self.levels = levels
        self.level_downsamples = level_downsamples
        self.file_mpp = file_mpp
        self.kind: Kind = kind
        self.channel_names = channel_names
        self.vendor = vendor
        self.objective_power = objective_power
        self.associated_images = associated_images
        self.properties = properties
        if len(channel_names) != levels[0].shape[2]:
            raise SlideError(
                self.path, f"{len(channel_names)} channel names for {levels[0].shape[2]} channels: {channel_names}"
            )
        self.mpp = resolve_mpp(self.path, file_mpp, mpp, required=require_mpp)
        # Where the pixel size came from, for provenance: the file's own, or given by the user.
        self.mpp_origin = "given" if mpp is not None else ("file" if self.mpp is not None else None)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(W, H) of level 0, OpenSlide's order."""
        height, width = self.levels[0].shape[:2]
        return int(width), int(height)

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def background(self) -> float | int:
        """The value that pads reads outside the slide."""
        return background_value(self.dtype, self.kind)

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) µm/px of a level."""
        mpp = self._require_mpp()
        downsample = self.level_downsamples[level]
        return mpp[0] * downsample, mpp[1] * downsample

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level still at least as fine as `target_mpp`, so reaching the target
        only ever downsamples (level 0 when the target is finer than the scan)."""
        base = self._require_mpp()[0]
        fitting = [i for i, ds in enumerate(self.level_downsamples) if base * ds <= target_mpp * (1 + 1e-3)]
        return max(fitting, default=0)

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, C) pixels of `level` at that level's pixel coordinates (x, y); parts outside
        the slide are background (white for brightfield, 0 for fluorescence)."""
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} out of range: {self.path.name} has {len(self.levels)} levels")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w} h={h}")
        return self._read_region(level, int(x), int(y), int(w), int(h))

    def _read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Reads the inside part through the dask level and pads the rest; backends with a
        native region reader override this."""
        height, width, channels = self.levels[level].shape
        out = np.full((h, w, channels), self.background, dtype=self.dtype)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            inside = self.levels[level][y0:y1, x0:x1].compute(scheduler="threads")
            out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    def _require_mpp(self) -> tuple[float, float]:
        if self.mpp is None:
            raise MissingPixelSizeError(self.path, "the reader was opened without a pixel size; reopen it with --mpp")
        return self.mpp

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file handles; the dask levels stop working afterwards."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp[0]:.4g}"
        return (
            f"{type(self).__name__}({str(self.path)!r}, vendor={self.vendor!r}, kind={self.kind!r}, "
            f"dimensions={self.dimensions}, levels={len(self.levels)}, mpp={mpp}, channels={self.channel_names})"
        )
