"""Layers over a store that is still being written, and over a finished one.

While `run_stain` streams blocks into ``NAME.ome.zarr.partial``, `PartialStore` shows what
is done: level 0 is read chunk by chunk from disk, only chunks the writer's progress record
marks as finished (a chunk being written is never read), the rest transparent (RGB gets an
alpha channel) or 0 (fluorescence). Coarser levels for big outputs are small in-memory
thumbnails filled as chunks finish, so a zoomed-out view of a whole slide in progress does
not read the whole slide on every refresh. Call `update()` (GUI thread) after each block,
then `layer.refresh()`.

A finished store is opened by the plugin's reader (`napari_mupad._reader.read_slide`).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np

THUMBNAIL_FACTOR = 8  # coarse preview levels step by this factor
SINGLE_SCALE_MAX_PX = 2048  # outputs up to this size preview as one level


def _progress_record(partial: Path) -> dict | None:
    from mupad_core.store.omezarr import PROGRESS_FILE

    try:
        return json.loads((partial / PROGRESS_FILE).read_text())
    except (OSError, ValueError):  # renamed into place, or replaced this very moment
        return None


def _progress_bits(partial: Path, grid: tuple[int, int]) -> np.ndarray | None:
    record = _progress_record(partial)
    if record is None:
        return None
    packed = np.frombuffer(base64.b64decode(record["done"]), dtype=np.uint8)
    return np.unpackbits(packed, count=grid[0] * grid[1]).astype(bool).reshape(grid)


class PartialStore:
    """Level 0 of a partial OME-Zarr store, its finished chunks, and coarse thumbnails."""

    def __init__(self, partial_path: str | Path):
        import zarr

        self.path = Path(partial_path)
        self.array = zarr.open_array(str(self.path / "0"), mode="r")
        self.channels, self.height, self.width = (int(v) for v in self.array.shape)
        self.chunk = int(self.array.chunks[-1])
        self.grid = (math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk))
        self.done = np.zeros(self.grid, dtype=bool)
        record = _progress_record(self.path) or {}
        self.kind = record.get("params", {}).get("kind") or ("rgb" if self.channels == 3 else "fluorescence")
        self.factors = [1]
        if max(self.height, self.width) > SINGLE_SCALE_MAX_PX:
            f = THUMBNAIL_FACTOR
            while True:
                self.factors.append(f)
                if max(self.height, self.width) / f <= SINGLE_SCALE_MAX_PX // 2:
                    break
                f *= THUMBNAIL_FACTOR
        self.thumbnails = {
            f: np.zeros((self.channels, math.ceil(self.height / f), math.ceil(self.width / f)), self.array.dtype)
            for f in self.factors[1:]
        }
        self.update()

    @property
    def fraction_done(self) -> float:
        return float(self.done.mean()) if self.done.size else 0.0

    def update(self) -> int:
        """Reload the progress record; fill thumbnails from newly finished chunks. Returns chunks done."""
        bits = _progress_bits(self.path, self.grid)
        if bits is None:
            return int(self.done.sum())
        new = np.argwhere(bits & ~self.done)
        for row, col in new:
            y0, x0 = int(row) * self.chunk, int(col) * self.chunk
            y1, x1 = min(y0 + self.chunk, self.height), min(x0 + self.chunk, self.width)
            if self.thumbnails:
                try:
                    block = self.array[:, y0:y1, x0:x1]
                except Exception:  # the store moved: the final layer replaces this one
                    continue
                for f, thumb in self.thumbnails.items():
                    ty0, tx0 = math.ceil(y0 / f), math.ceil(x0 / f)
                    ty1, tx1 = math.ceil(y1 / f), math.ceil(x1 / f)
                    if ty1 > ty0 and tx1 > tx0:
                        thumb[:, ty0:ty1, tx0:tx1] = block[:, ty0 * f - y0 :: f, tx0 * f - x0 :: f][:, : ty1 - ty0, : tx1 - tx0]
            self.done[row, col] = True
        return int(self.done.sum())

    def read(self, factor: int, ys: range, xs: range) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (C, len(ys), len(xs)) of level `factor` (stepped ranges allowed) and the done mask."""
        out = np.zeros((self.channels, len(ys), len(xs)), dtype=self.array.dtype)
        if not len(ys) or not len(xs):
            return out, np.zeros((len(ys), len(xs)), bool)
        yy = np.asarray(ys) * factor  # level-0 coordinates of the requested pixels
        xx = np.asarray(xs) * factor
        mask = self.done[np.minimum(yy // self.chunk, self.grid[0] - 1)[:, None],
                         np.minimum(xx // self.chunk, self.grid[1] - 1)[None, :]]
        if factor > 1:
            out[...] = self.thumbnails[factor][:, np.asarray(ys)[:, None], np.asarray(xs)[None, :]]
            out[:, ~mask] = 0
            return out, mask
        # Level 0: read each finished chunk's part of the request from disk.
        rows = range(int(yy.min()) // self.chunk, int(yy.max()) // self.chunk + 1)
        cols = range(int(xx.min()) // self.chunk, int(xx.max()) // self.chunk + 1)
        for r in rows:
            in_r = (yy // self.chunk) == r
            if not in_r.any():
                continue
            for c in cols:
                if not self.done[r, c]:
                    continue
                in_c = (xx // self.chunk) == c
                if not in_c.any():
                    continue
                ysel, xsel = yy[in_r], xx[in_c]
                try:
                    block = self.array[:, ysel.min() : ysel.max() + 1, xsel.min() : xsel.max() + 1]
                except Exception:  # renamed into place meanwhile: shown as not done
                    mask[np.ix_(in_r, in_c)] = False
                    continue
                out[:, np.flatnonzero(in_r)[:, None], np.flatnonzero(in_c)[None, :]] = \
                    block[:, (ysel - ysel.min())[:, None], (xsel - xsel.min())[None, :]]
        return out, mask


class PreviewLevel:
    """A napari-sliceable (H, W, C+alpha) RGBA view, or (H, W) one-channel view, of a `PartialStore` level."""

    def __init__(self, store: PartialStore, factor: int, channel: int | None = None):
        self.store, self.factor, self.channel = store, factor, channel
        h, w = math.ceil(store.height / factor), math.ceil(store.width / factor)
        self.rgba = channel is None
        self.shape = (h, w, store.channels + 1) if self.rgba else (h, w)
        self.dtype = store.array.dtype
        self.ndim = len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        ky, kx, rest = key[0], key[1], key[2:]
        squeeze = [isinstance(k, (int, np.integer)) for k in (ky, kx)]
        ys = range(self.shape[0])[ky] if not squeeze[0] else range(int(ky) % self.shape[0], int(ky) % self.shape[0] + 1)
        xs = range(self.shape[1])[kx] if not squeeze[1] else range(int(kx) % self.shape[1], int(kx) % self.shape[1] + 1)
        pixels, mask = self.store.read(self.factor, ys, xs)
        if self.rgba:
            alpha = np.where(mask, np.iinfo(self.dtype).max if self.dtype.kind in "ui" else 1, 0).astype(self.dtype)
            out = np.concatenate([np.moveaxis(pixels, 0, -1), alpha[..., None]], axis=-1)
        else:
            out = pixels[self.channel]
        if squeeze[1]:
            out = out[:, 0]
        if squeeze[0]:
            out = out[0]
        return out[(...,) + tuple(rest)] if rest and self.rgba else out


def preview_levels(store: PartialStore, channel: int | None = None) -> list[PreviewLevel]:
    return [PreviewLevel(store, f, channel) for f in store.factors]
