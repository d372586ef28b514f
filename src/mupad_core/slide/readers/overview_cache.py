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

import contextlib
import hashlib
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


def add_overview(reader: SlideReader, progress: Progress | None = None, *,
                 background: Callable[[], SlideReader] | None = None) -> SlideReader:
    """Give a big single-level image cached coarse levels (built now when missing).

    `background` (a function that opens the file again, for the build's own handle): when the
    overview is missing, return at once with coarse levels that fill in as a thread builds them
    (`reader.overview_build`; chunks not built yet read as blank), so a viewer opens a 40k² TIFF
    in a second. A PNG is decoded whole whatever happens, so it is built now."""
    if not needs_overview(reader):
        return reader
    store = cache_path(reader.path)
    running = _RUNNING.get(store)
    if not store.exists() and running is not None and background is None:
        running.result()  # this process builds it already (a viewer opened it): wait, do not build twice
    if not store.exists():
        if background is not None and reader.backend != "pil":
            build = OverviewBuild(reader, store, background, progress)
            _set_levels(reader, build.partial, build.factors, build)
            reader.overview_build = build
            return reader
        build_overview(reader, store, progress)
    _set_levels(reader, store, [int(f) for f in zarr.open_group(store, mode="r").attrs["factors"]])
    return reader


def refresh_levels(reader: SlideReader, generation: int) -> bool:
    """Re-point a reader opened while its overview builds (`overview_build`) at what is there
    now: the finished store once built (True), else the partial under fresh names (a viewer's
    chunk cache keeps the blanks it read under the old ones)."""
    build = reader.overview_build
    if build is None:
        return True
    if build.done() and build.future.exception() is None:
        _set_levels(reader, build.store, build.factors)
        reader.overview_build = None
        return True
    _set_levels(reader, build.partial, build.factors, build, generation)
    return False


def _set_levels(reader: SlideReader, store: Path, factors: list[int], build: OverviewBuild | None = None,
                generation: int = 0) -> None:
    group = zarr.open_group(store, mode="r") if build is None else None
    prefix = f"overview-building{generation}-{store.name}" if build else f"overview-{store.name}"
    arrays = [build.levels[f] if build else group[str(f)] for f in factors]
    levels = [lazy_level(a, reader.path, i, (CHUNK_PX, CHUNK_PX, a.shape[2]), prefix) for i, a in enumerate(arrays)]
    if factors[0] == 1:  # a whole-decode format: level 0 from the cache, not a second decode
        reader.levels = levels
        reader.level_downsamples = [float(f) for f in factors]
    else:
        reader.levels = [reader.levels[0], *levels]
        reader.level_downsamples = [1.0, *(float(f) for f in factors)]
    reader.properties["mupad.overview_cache"] = str(store)


class BlankWhileBuilding:
    """A level of an overview being built: read from the build's partial, and from the finished
    store once it is renamed into place. A chunk caught mid-write reads as blank (drawn again
    on the next refresh) instead of failing the viewer's draw."""

    def __init__(self, build: OverviewBuild, factor: int):
        self.build, self.factor = build, str(factor)
        self.partial = zarr.open_group(build.partial, mode="r")[self.factor]
        self.finished = None
        self.shape, self.dtype, self.ndim = self.partial.shape, self.partial.dtype, self.partial.ndim

    def _array(self):
        if self.finished is None and self.build.done() and self.build.future.exception() is None:
            self.finished = zarr.open_group(self.build.store, mode="r")[self.factor]
        return self.finished if self.finished is not None else self.partial

    def __getitem__(self, key):
        try:
            return self._array()[key]
        except Exception:  # noqa: BLE001  (a torn chunk file: zarr's decoders raise several types)
            shape = np.broadcast_to(np.empty((), dtype=bool), self.shape)[key].shape  # no allocation
            return np.full(shape, self.partial.fill_value, dtype=self.dtype)


# Overviews this process is building in the background, by store: a second open waits for it.
_RUNNING: dict[Path, Future] = {}


class OverviewBuild:
    """An overview built by a daemon thread into this build's partial store, renamed into
    place when complete. `done_blocks`/`total_blocks` say how far it is; `result()` waits
    and returns the finished store (or raises what stopped it). A process that exits first
    leaves a partial that the next build of the same file removes."""

    def __init__(self, reader: SlideReader, store: Path, reopen: Callable[[], SlideReader],
                 progress: Progress | None = None):
        self.store = store
        self.partial, self.factors = _create_partial(reader.levels[0], store, reader.backend == "pil")
        self.total_blocks = len(_blocks(*reader.levels[0].shape[:2]))
        self.done_blocks = 0
        self.levels = {f: BlankWhileBuilding(self, f) for f in self.factors}
        self.future: Future = Future()
        self._progress = progress
        _RUNNING[store] = self.future
        self._reopen = reopen
        threading.Thread(target=self._run, name=f"mupad-overview-{reader.path.name}", daemon=True).start()

    def _run(self) -> None:
        try:
            with self._reopen() as own:  # its own file handle: the viewer may close its reader meanwhile
                # One core left to the viewer: on a 2-core machine the build reads with one thread.
                workers = max(1, min(4, (os.cpu_count() or 2) - 1))
                self.future.set_result(_fill_and_finish(own.levels[0], self.partial, self.store, self.factors,
                                                        own.path, self._count, workers=workers))
        except BaseException as error:  # noqa: BLE001  (handed to whoever waits on the build)
            self.future.set_exception(error)
        finally:
            _RUNNING.pop(self.store, None)

    def _count(self, done: int, total: int) -> None:
        self.done_blocks = min(done, self.total_blocks)
        if self._progress is not None:
            self._progress(done, total)

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> Path:
        return self.future.result(timeout)


def build_overview(reader: SlideReader, store: Path, progress: Progress | None = None) -> Path:
    """Stream level 0 once into the cached pyramid at `store` (via a partial of this build).

    Two processes may build the same overview at once (dask workers on one slide, two
    viewers): each writes its own partial and the first to finish wins; the other keeps it."""
    partial, factors = _create_partial(reader.levels[0], store, reader.backend == "pil")
    return _fill_and_finish(reader.levels[0], partial, store, factors, reader.path, progress,
                            workers=min(4, os.cpu_count() or 1))


def _create_partial(level0, store: Path, whole_decode: bool) -> tuple[Path, list[int]]:
    """This build's empty partial store (every level, blank), its name unique to the build."""
    height, width, channels = level0.shape
    factors = ([1] if whole_decode else []) + [FIRST_FACTOR]
    while max(math.ceil(height / factors[-1]), math.ceil(width / factors[-1])) > COARSEST_SIDE_PX:
        factors.append(factors[-1] * 2)
    _remove_abandoned_partials(store)
    partial = store.with_name(f"{store.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(partial, mode="w")
    # Not built yet reads as blank: white glass for brightfield RGB, dark for fluorescence.
    blank = np.iinfo(level0.dtype).max if channels == 3 and level0.dtype.kind == "u" else 0
    for f in factors:
        group.create_array(str(f), shape=(math.ceil(height / f), math.ceil(width / f), channels),
                           chunks=(CHUNK_PX, CHUNK_PX, channels), dtype=level0.dtype, fill_value=blank)
    return partial, factors


def _remove_abandoned_partials(store: Path) -> None:
    """Partials of builds whose process is gone (killed, or a viewer closed mid-build)."""
    for stale in store.parent.glob(f"{store.name}.partial-*") if store.parent.exists() else []:
        pid = stale.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _blocks(height: int, width: int) -> list[tuple[int, int]]:
    band = max(BAND_ROWS // FIRST_FACTOR, 1) * FIRST_FACTOR
    return [(top, left) for top in range(0, height, band) for left in range(0, width, BLOCK_COLUMNS)]


def _fill_and_finish(level0, partial: Path, store: Path, factors: list[int], source: Path,
                     progress: Progress | None, workers: int) -> Path:
    """Every level of each level-0 block at once (a viewer sees the overview fill in), then the
    partial renamed into place; a failure removes the partial."""
    height, width, channels = level0.shape
    group = zarr.open_group(partial, mode="r+")
    arrays = {f: group[str(f)] for f in factors}
    blocks = _blocks(height, width)
    band = max(BAND_ROWS // FIRST_FACTOR, 1) * FIRST_FACTOR
    coarse_lock = threading.Lock()  # levels past the first share chunks between blocks

    def copy(block: tuple[int, int]) -> None:
        top, left = block
        pixels = np.asarray(level0[top : top + band, left : left + BLOCK_COLUMNS].compute(scheduler="sync"))
        if 1 in arrays:
            arrays[1][top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        pooled = {FIRST_FACTOR: mean_pool(pixels, FIRST_FACTOR)}
        for finer, f in zip(factors[factors.index(FIRST_FACTOR):], factors[factors.index(FIRST_FACTOR) + 1:]):
            pooled[f] = mean_pool(pooled[finer], 2)  # blocks are whole multiples of every factor but the edge's
        for f, values in pooled.items():
            row, column = top // f, left // f
            with coarse_lock if f > FIRST_FACTOR else _NO_LOCK:  # the first level: whole chunks per block
                arrays[f][row : row + values.shape[0], column : column + values.shape[1]] = values

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mupad-overview") as pool:
            for done, _ in enumerate(pool.map(copy, blocks), start=1):
                if progress is not None:
                    progress(done, len(blocks) + 1)
        group.attrs["factors"] = factors
        group.attrs["source"] = {"path": str(source), "shape": [height, width, channels]}
        if progress is not None:
            progress(len(blocks) + 1, len(blocks) + 1)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.replace(partial, store)
    except OSError:  # another process finished the same overview first: its copy is as good
        if not (store / "zarr.json").exists() and not (store / ".zgroup").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return store


_NO_LOCK = contextlib.nullcontext()


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

