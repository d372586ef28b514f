"""`SlidePatchDataset`: patches at a chosen µm/px drawn on the fly inside the tissue mask of
whole slides, paired through a registered second slide (offset or affine) or unpaired.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset

from ..generate.resample import PixelMap, read_resampled, snap_step
from ..slide.readers import SlideError, open_slide
from ..slide.readers.base import SlideReader
from ..slide.tissue import TissueMap, tissue_mask
from .items import DatasetError, Transform, fingerprint_of, size_pair, to_unit_float


def _affine(value: Any) -> np.ndarray:
    """A 2x3 map (source level-0 px -> target level-0 px) from None, (dx, dy), 2x3 or 3x3."""
    if value is None:
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape == (2,):
        return np.array([[1.0, 0.0, matrix[0]], [0.0, 1.0, matrix[1]]])
    if matrix.shape == (3, 3):
        if not np.allclose(matrix[2], [0, 0, 1]):
            raise ValueError(f"a 3x3 affine must end in [0, 0, 1], got {matrix[2].tolist()}")
        matrix = matrix[:2]
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise ValueError(f"target_affine must be (dx, dy), a 2x3 or 3x3 invertible affine matrix, got {value!r}")
    return matrix


def read_patch(reader: SlideReader, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) float patch in [0, 1] of `size` (h, w) pixels whose pixel coordinates
    map to the slide's level-0 pixel coordinates by the 2x3 `matrix` (continuous
    coordinates, pixel i covering [i, i + 1)).

    Axis-aligned maps go through the engine's resampler (`generate/resample.py`), so a model
    trains on pixels made exactly as the pixels it will stain; rotations, flips and shears
    sample the region read around the patch bilinearly."""
    height, width = size
    linear = matrix[:, :2]
    base_mpp = reader.level_mpp(0)
    if linear[0, 1] == 0 and linear[1, 0] == 0 and linear[0, 0] > 0 and linear[1, 1] > 0:
        level = reader.best_level_for_mpp(min(linear[0, 0] * base_mpp[0], linear[1, 1] * base_mpp[1]))
        ds = reader.level_downsamples[level]
        pmap = PixelMap(level, (matrix[0, 2] / ds, matrix[1, 2] / ds),
                        (snap_step(linear[0, 0] / ds), snap_step(linear[1, 1] / ds)))
        patch = read_resampled(reader, pmap, 0, 0, height, width)
        if isinstance(patch, np.ndarray):  # whole level pixels one to one: read as they are
            patch = torch.from_numpy(to_unit_float(patch).transpose(2, 0, 1).copy())
        return patch.clamp(0, 1)
    scale = math.sqrt(abs(np.linalg.det(linear)))
    level = reader.best_level_for_mpp(scale * base_mpp[0])
    ds = reader.level_downsamples[level]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xs = (linear[0, 0] * u + linear[0, 1] * v + matrix[0, 2]) / ds
    ys = (linear[1, 0] * u + linear[1, 1] * v + matrix[1, 2]) / ds
    rx, ry = math.floor(xs.min()) - 1, math.floor(ys.min()) - 1
    rw, rh = math.ceil(xs.max()) + 2 - rx, math.ceil(ys.max()) + 2 - ry
    region = torch.from_numpy(to_unit_float(reader.read_region(level, rx, ry, rw, rh)).transpose(2, 0, 1).copy())
    grid = torch.from_numpy(np.stack([2 * (xs - rx) / rw - 1, 2 * (ys - ry) / rh - 1], axis=-1)).float()
    out = F.grid_sample(region[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].clamp(0, 1)


class _SlideSampler:
    """Where patch centres may fall on one slide: mask pixels whose patch-sized
    neighbourhood is at least `min_tissue` tissue."""

    def __init__(self, mask: np.ndarray, downsample: float, box_mask_px: tuple[float, float], min_tissue: float):
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = float(downsample)
        bw, bh = (max(1, round(v)) for v in box_mask_px)
        self.box_mask_px = box_mask_px
        fraction = ndimage.uniform_filter(self.mask.astype(np.float32), size=(bh, bw), mode="constant", cval=0.0)
        self.valid = (fraction >= min_tissue - 1e-6) & self.mask  # centres always on tissue
        self.row_counts = np.cumsum(self.valid.sum(axis=1))
        self.count = int(self.row_counts[-1]) if self.row_counts.size else 0
        self.tissue = TissueMap(self.mask, self.downsample)

    def sample_centre(self, rng: np.random.Generator) -> tuple[float, float]:
        """A uniformly random point (level-0 px) inside a valid mask pixel."""
        k = int(rng.integers(self.count))
        row = int(np.searchsorted(self.row_counts, k, side="right"))
        before = int(self.row_counts[row - 1]) if row else 0
        column = int(np.flatnonzero(self.valid[row])[k - before])
        jitter = rng.random(2)
        return (column + jitter[0]) * self.downsample, (row + jitter[1]) * self.downsample

    def tissue_fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Tissue fraction of a level-0 box; parts outside the mask count as no tissue."""
        return self.tissue.fraction(x, y, w, h)


class SlidePatchDataset(Dataset):
    """`length` patches of `patch_size` px at `mpp` µm/px drawn inside the tissue of slides.

    Item i is fully determined by (seed, epoch, i): which slide (by tissue area, or
    uniformly with ``slide_weights="uniform"``), where, and any `transform`. A patch is
    accepted when its tissue fraction is at least `min_tissue` (the best of `max_tries`
    draws otherwise); ``sampler="uniform"`` ignores the mask (a baseline).

    Paired mode (``targets`` given, ``paired=True``): ``targets[k]`` is registered to
    ``slides[k]``; the target patch is read at the same level-0 place mapped through
    `target_affine` (a (dx, dy) offset, or a 2x3/3x3 matrix from source level-0 px to
    target level-0 px; `target_affines` gives one per pair; None means the same
    physical place, i.e. level-0 px scaled by the ratio of the two slides' pixel sizes). Unpaired mode
    (``paired=False``): the target comes from its own slide list and tissue, drawn
    independently. Without targets, ``"target"`` is None.

    `masks` / `target_masks`: precomputed `tissue_mask` results (else computed on open).
    `slide_mpp`: the level-0 µm/px for slides that do not state one.
    `captions` / `rna_ids`: one per source slide (e.g. a bulk RNA sample id), copied into
    each item. Slides are opened lazily per process, so the data set pickles (DataLoader
    workers) as paths.
    """

    def __init__(
        self,
        slides: Sequence[str | os.PathLike],
        patch_size: int | Sequence[int],
        mpp: float,
        length: int,
        *,
        targets: Sequence[str | os.PathLike] | None = None,
        paired: bool = True,
        target_affine: Any = None,
        target_affines: Sequence[Any] | None = None,
        seed: int = 0,
        min_tissue: float = 0.5,
        slide_weights: str = "tissue",
        sampler: str = "tissue",
        max_tries: int = 20,
        slide_mpp: float | None = None,
        masks: Sequence[tuple[np.ndarray, float]] | None = None,
        target_masks: Sequence[tuple[np.ndarray, float]] | None = None,
        captions: Sequence[str] | None = None,
        rna_ids: Sequence[str] | None = None,
        transform: Transform | None = None,
    ):
        if isinstance(slides, (str, os.PathLike)):
            slides = [slides]
        if isinstance(targets, (str, os.PathLike)):
            targets = [targets]
        self.slides = [Path(p).expanduser() for p in slides]
        if not self.slides:
            raise ValueError("no slides given")
        self.patch_size = size_pair(patch_size, "patch_size")
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"mpp must be a positive number, got {mpp!r}")
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if not 0 <= min_tissue <= 1:
            raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
        if slide_weights not in ("tissue", "uniform"):
            raise ValueError(f"slide_weights must be 'tissue' or 'uniform', got {slide_weights!r}")
        if sampler not in ("tissue", "uniform"):
            raise ValueError(f"sampler must be 'tissue' or 'uniform', got {sampler!r}")
        self.mpp = float(mpp)
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        self.min_tissue = float(min_tissue)
        self.slide_weights = slide_weights
        self.sampler = sampler
        self.max_tries = max(1, int(max_tries))
        self.slide_mpp = slide_mpp
        self.transform = transform
        self.targets = [Path(p).expanduser() for p in targets] if targets is not None else None
        self.paired = bool(paired) and self.targets is not None
        self.captions = self._per_slide(captions, "captions")
        self.rna_ids = self._per_slide(rna_ids, "rna_ids")
        if self.paired and len(self.targets) != len(self.slides):
            raise ValueError(
                f"paired mode needs one target per slide: {len(self.slides)} slides, {len(self.targets)} targets"
            )
        if self.targets is not None and not self.targets:
            raise ValueError("targets is empty")
        if target_affine is not None and target_affines is not None:
            raise ValueError("give target_affine (one for all pairs) or target_affines (one per pair), not both")
        if (target_affine is not None or target_affines is not None) and not self.paired:
            raise ValueError("target_affine(s) need paired targets (targets=..., paired=True)")
        if target_affines is not None and len(target_affines) != len(self.slides):
            raise ValueError(
                f"target_affines needs one entry per pair: {len(self.slides)} pairs, {len(target_affines)} given"
            )
        per_pair = target_affines if target_affines is not None else [target_affine] * len(self.slides)
        self.target_affines = [None if a is None else _affine(a) for a in per_pair]
        self._readers: dict[Path, SlideReader] = {}
        self._pid = os.getpid()
        self.source_samplers, self.source_weights = self._prepare(self.slides, masks, "slide")
        if self.targets is not None and not self.paired:
            self.target_samplers, self.target_weights = self._prepare(self.targets, target_masks, "target slide")
        else:
            self.target_samplers, self.target_weights = None, None

    def _per_slide(self, values: Sequence[str] | None, name: str) -> list[str] | None:
        if values is None:
            return None
        values = [str(v) for v in values]
        if len(values) != len(self.slides):
            raise ValueError(f"{name} needs one entry per slide: {len(self.slides)} slides, {len(values)} {name}")
        return values

    # -- slides

    def reader(self, path: Path) -> SlideReader:
        """The open reader of a slide in this process (opened on first use)."""
        if self._pid != os.getpid():  # a forked worker: never share file handles
            self._readers = {}
            self._pid = os.getpid()
        if path not in self._readers:
            self._readers[path] = open_slide(path, mpp=self.slide_mpp) if self.slide_mpp else open_slide(path)
        return self._readers[path]

    def _box_level0(self, reader: SlideReader) -> tuple[float, float]:
        """The patch's size in level-0 px of that slide (w, h)."""
        base = reader.level_mpp(0)
        return self.patch_size[1] * self.mpp / base[0], self.patch_size[0] * self.mpp / base[1]

    def _prepare(self, paths: list[Path], masks, what: str):
        if masks is not None and len(masks) != len(paths):
            raise ValueError(f"{len(masks)} masks for {len(paths)} {what}s")
        samplers, weights = [], []
        for k, path in enumerate(paths):
            try:
                reader = self.reader(path)
                mask, downsample = masks[k] if masks is not None else tissue_mask(reader)
                box_w, box_h = self._box_level0(reader)
            except SlideError as error:
                raise DatasetError(f"{what} {k}: {error}") from error
            sampler = _SlideSampler(mask, downsample, (box_w / downsample, box_h / downsample), self.min_tissue)
            samplers.append(sampler)
            if self.sampler == "uniform":
                weight = 1.0 if self.slide_weights == "uniform" else float(np.prod(reader.dimensions))
            elif sampler.count == 0:
                warnings.warn(
                    f"{path}: no place for a {self.patch_size[1]}x{self.patch_size[0]} px patch at {self.mpp} µm/px "
                    f"with >= {self.min_tissue:.0%} tissue; this {what} is skipped",
                    UserWarning,
                    stacklevel=3,
                )
                weight = 0.0
            elif self.slide_weights == "uniform":
                weight = 1.0
            else:
                weight = sampler.count * downsample**2 * float(np.prod(reader.level_mpp(0)))
            weights.append(weight)
        total = sum(weights)
        if total <= 0:
            raise DatasetError(
                f"no {what} has room for a {self.patch_size[1]}x{self.patch_size[0]} px patch at {self.mpp} µm/px "
                f"with >= {self.min_tissue:.0%} tissue ({', '.join(str(p) for p in paths)}); "
                "lower min_tissue or the patch size"
            )
        return samplers, np.asarray(weights) / total

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __enter__(self) -> SlidePatchDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # -- items

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _draw(self, rng: np.random.Generator, paths, samplers, weights) -> tuple[int, float, float, float]:
        """(slide, x, y, tissue fraction): a patch's level-0 top-left on a chosen slide."""
        k = int(rng.choice(len(paths), p=weights))
        reader = self.reader(paths[k])
        box_w, box_h = self._box_level0(reader)
        sampler = samplers[k]
        best = None
        for _ in range(self.max_tries):
            if self.sampler == "uniform":
                width, height = reader.dimensions
                x, y = float(rng.random() * max(width - box_w, 0)), float(rng.random() * max(height - box_h, 0))
            else:
                cx, cy = sampler.sample_centre(rng)
                x, y = cx - box_w / 2, cy - box_h / 2
            fraction = sampler.tissue_fraction(x, y, box_w, box_h)
            if best is None or fraction > best[3]:
                best = (k, x, y, fraction)
            if self.sampler == "uniform" or fraction >= self.min_tissue:
                break
        return best  # type: ignore[return-value]

    def _matrix(self, path: Path, x: float, y: float) -> np.ndarray:
        """Patch px -> level-0 px of a slide, for a patch with level-0 top-left (x, y)."""
        box_w, box_h = self._box_level0(self.reader(path))
        return np.array([[box_w / self.patch_size[1], 0.0, x], [0.0, box_h / self.patch_size[0], y]])

    def _paired_matrix(self, pair: int, source_matrix: np.ndarray) -> np.ndarray:
        """The target's patch px -> level-0 px: the source's map, then the pair's affine
        (default: the same physical place, i.e. scaled by the ratio of level-0 pixel sizes)."""
        affine = self.target_affines[pair]
        if affine is None:
            (smx, smy), (tmx, tmy) = self.reader(self.slides[pair]).level_mpp(0), self.reader(
                self.targets[pair]).level_mpp(0)
            affine = np.array([[smx / tmx, 0.0, 0.0], [0.0, smy / tmy, 0.0]])
        return affine[:, :2] @ source_matrix + np.array([[0.0, 0.0, affine[0, 2]], [0.0, 0.0, affine[1, 2]]])

    def _read(self, path: Path, matrix: np.ndarray) -> torch.Tensor:
        try:
            return read_patch(self.reader(path), matrix, self.patch_size)
        except SlideError as error:
            raise DatasetError(f"cannot read a patch (level-0 map {matrix.round(3).tolist()}): {error}") from error

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        sequence = np.random.SeedSequence([self.seed, self.epoch, index])
        rng = np.random.default_rng(sequence)
        slide, x, y, fraction = self._draw(rng, self.slides, self.source_samplers, self.source_weights)
        # Snap to the level-0 grid so patches at the scan's own pixel size are exact pixels.
        x, y = float(round(x)), float(round(y))
        source_matrix = self._matrix(self.slides[slide], x, y)
        item: dict[str, Any] = {
            "source": self._read(self.slides[slide], source_matrix),
            "target": None,
            "has_target": False,
            "caption": self.captions[slide] if self.captions else "",
            "rna_id": self.rna_ids[slide] if self.rna_ids else "",
            "index": index,
            "slide": slide,
            "xy": (x, y),
            "tissue_fraction": fraction,
        }
        if self.targets is not None:
            if self.paired:
                target_matrix = self._paired_matrix(slide, source_matrix)
                target_slide, tx, ty = slide, float(target_matrix[0, 2]), float(target_matrix[1, 2])
                item["target"] = self._read(self.targets[slide], target_matrix)
            else:
                target_slide, tx, ty, _ = self._draw(rng, self.targets, self.target_samplers, self.target_weights)
                tx, ty = float(round(tx)), float(round(ty))
                target_path = self.targets[target_slide]
                item["target"] = self._read(target_path, self._matrix(target_path, tx, ty))
            item.update(has_target=True, target_slide=target_slide, target_xy=(tx, ty))
        if self.transform is not None:
            generator = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            item = self.transform(item, generator)
        return item

    def fingerprint(self) -> str:
        """A hash of the slide files (path, size, mtime) and every sampling setting."""
        def stamp(path: Path) -> list[Any]:
            stat = path.stat()
            return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

        config = {
            "class": "SlidePatchDataset",
            "slides": [stamp(p) for p in self.slides],
            "targets": [stamp(p) for p in self.targets] if self.targets is not None else None,
            "paired": self.paired,
            "affines": [None if a is None else a.tolist() for a in self.target_affines] if self.paired else None,
            "patch_size": self.patch_size,
            "mpp": self.mpp,
            "length": self.length,
            "seed": self.seed,
            "min_tissue": self.min_tissue,
            "slide_weights": self.slide_weights,
            "sampler": self.sampler,
            "max_tries": self.max_tries,
            "slide_mpp": self.slide_mpp,
            "masks": [hashlib.sha256(np.packbits(s.mask).tobytes()).hexdigest() for s in self.source_samplers],
            "captions": self.captions,
            "rna_ids": self.rna_ids,
            "transform": fingerprint_of(self.transform),
        }
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        mode = "single" if self.targets is None else ("paired" if self.paired else "unpaired")
        return (
            f"SlidePatchDataset({len(self.slides)} slides, {mode}, patch={self.patch_size}, mpp={self.mpp}, "
            f"length={self.length}, seed={self.seed})"
        )
