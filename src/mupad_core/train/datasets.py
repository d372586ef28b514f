"""Training data sets: image pairs listed in a manifest, and patches drawn from slides.

Items are plain dicts so they work with a standard `torch.utils.data.DataLoader` (use
`collate_items` as its `collate_fn`: it copes with rows that have no target):

- images: float tensors (C, H, W) in [0, 1], the range every latent codec in
  `mupad_core.models.vae` encodes from (they map to [-1, 1] themselves);
- ``"target"`` is None where a row has none (unpaired or text-only rows; the source is
  then the image itself), with ``"has_target"`` saying which;
- strings: ``"caption"`` and ``"rna_id"`` ("" where absent; an RNA id is a sample/spot
  id into an expression table, kept as text), ``"split"``.

Randomness (crops, augmentation, patch positions) comes from a generator seeded by
(seed, epoch, index), never from global state or the worker, so an item is the same on
every run, in every DataLoader worker, and after a resume (`set_epoch` changes the
stream per epoch).

`ManifestDataset`: a CSV or Parquet manifest with columns ``source`` (required),
``target``, ``caption``, ``rna_id`` and ``split`` (train/val/test); image paths are
relative to the manifest's folder. Every problem is a `DatasetError` naming the
manifest and the row.

`SlidePatchDataset`: patches of a fixed size at a chosen µm/px, drawn on the fly inside
the tissue mask of whole slides (read from the best pyramid level and resampled). Paired
mode reads a registered second slide at the same place (optionally through an offset or
affine map); unpaired mode draws the target from its own slide list independently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from torch.utils.data import Dataset

from ..slide.readers import SlideError, open_slide
from ..slide.readers.base import SlideReader, to_yxc
from ..slide.tissue import TissueMap, tissue_mask

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("source", "target", "caption", "rna_id", "split")
OPTIONAL_IMAGE_COLUMNS = ("target",)
TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}

Transform = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]


class DatasetError(ValueError):
    """A data set that cannot be built or an item that cannot be read; the message names
    the manifest (or slide) and the row."""


# ---------------------------------------------------------------------------- helpers


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from (seed, epoch, index) with NumPy's SeedSequence."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The torch generator for one item's random choices."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels scaled by their type's full range, floats clipped; float32 [0, 1]."""
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)
    if pixels.dtype == bool:
        return pixels.astype(np.float32)
    return np.clip(pixels.astype(np.float32), 0, 1)


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] to RGB: grey repeated, alpha composited on white."""
    channels = pixels.shape[2]
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 2:  # grey + alpha
        grey, alpha = pixels[..., :1], pixels[..., 1:2]
        return np.repeat(grey * alpha + (1 - alpha), 3, axis=2)
    if channels == 3:
        return pixels
    if channels == 4:
        alpha = pixels[..., 3:4]
        return pixels[..., :3] * alpha + (1 - alpha)
    raise ValueError(f"{channels} channels cannot be shown as RGB; use channels='native'")


def read_image(path: str | os.PathLike, channels: str = "rgb") -> np.ndarray:
    """An image file as (H, W, C) float32 in [0, 1].

    PNG/JPEG (and anything PIL reads) through PIL, TIFF through tifffile (any channel
    count and bit depth). ``channels="rgb"`` gives 3 channels (grey repeated, alpha
    composited on white); ``"native"`` keeps the file's channels."""
    if channels not in ("rgb", "native"):
        raise ValueError(f"channels must be 'rgb' or 'native', got {channels!r}")
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pixels = to_yxc(series.asarray(), series.axes, path)
            # A 4th channel is alpha only where the file says so; else it is a 4th marker.
            alpha = any(int(e) in (1, 2) for e in getattr(tif.pages[0], "extrasamples", ()) or ())
        if channels == "rgb" and pixels.shape[2] == 4 and not alpha:
            raise ValueError(f"{pixels.shape[2]} channels (no alpha) cannot be shown as RGB; use channels='native'")
    else:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "CMYK":
                image = image.convert("RGB")
            pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
    pixels = to_unit_float(np.asarray(pixels))
    return _to_rgb(pixels) if channels == "rgb" else pixels


def collate_items(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch a list of items: tensors stacked (a None among tensors becomes zeros, so
    check the matching ``has_*`` flag), numbers and bools to tensors, strings to lists;
    a key that is None in every item stays None."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item.get(key) for item in items]
        present = [v for v in values if v is not None]
        if not present:
            batch[key] = None
        elif isinstance(present[0], torch.Tensor):
            template = present[0]
            shapes = {tuple(v.shape) for v in present}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack '{key}': items have shapes {sorted(shapes)}; crop to one size")
            batch[key] = torch.stack([torch.zeros_like(template) if v is None else v for v in values])
        elif all(isinstance(v, bool) for v in present) and len(present) == len(values):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present) and len(present) == len(
            values
        ):
            batch[key] = torch.tensor(values)
        elif all(isinstance(v, tuple) and all(isinstance(e, (int, float)) for e in v) for v in present) and len(
            present
        ) == len(values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def cycle(loader: Any, start_epoch: int = 0) -> Iterator[Any]:
    """Endless batches: re-iterates the loader, calling `set_epoch` on its data set (when
    it has one) before each pass, so epochs differ but are reproducible."""
    epoch = start_epoch
    dataset = getattr(loader, "dataset", None)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader gave no batches (empty data set, or drop_last with too few items)")
        epoch += 1


def _crop_box(height: int, width: int, size: tuple[int, int], mode: str, generator: torch.Generator):
    ch, cw = size
    if mode == "center":
        return (height - ch) // 2, (width - cw) // 2
    top = int(torch.randint(0, height - ch + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - cw + 1, (1,), generator=generator))
    return top, left


def _size_pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (int(size), int(size)) if np.isscalar(size) else tuple(int(v) for v in size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or an (height, width) pair, got {size!r}")
    return pair  # type: ignore[return-value]


def _fingerprint_of(transform: Any) -> str | None:
    if transform is None:
        return None
    if hasattr(transform, "fingerprint"):
        return str(transform.fingerprint())
    return f"{type(transform).__module__}.{type(transform).__qualname__}"


# ---------------------------------------------------------------------------- manifest


class ManifestDataset(Dataset):
    """Images listed in a CSV or Parquet manifest.

    Columns: ``source`` (required), ``target``, ``caption``, ``rna_id``, ``split``
    (train/val/test); other columns are ignored. Empty cells mean absent. Paths are
    relative to the manifest's folder (or `root`); absolute paths are kept.

    `split`: one split name, several, or None for every row (then no ``split`` column is
    needed). `crop_size`: crop every image to this size (int or (h, w)); ``crop`` is
    ``"random"`` (seeded per item) or ``"center"``; a pair gets the same box, and a pair
    whose images differ in size is refused (register them first). `transform(item,
    generator)` runs after the crop (e.g. `augment.PairAugment`). `channels` /
    `target_channels`: ``"rgb"`` or ``"native"`` (e.g. a multi-channel mIF TIFF target).
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        split: str | Sequence[str] | None = "train",
        *,
        crop_size: int | Sequence[int] | None = None,
        crop: str = "random",
        channels: str = "rgb",
        target_channels: str | None = None,
        transform: Transform | None = None,
        seed: int = 0,
        root: str | os.PathLike | None = None,
    ):
        self.manifest = Path(manifest).expanduser()
        self.root = Path(root).expanduser() if root is not None else self.manifest.parent
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        for name, value in (("channels", channels), ("target_channels", target_channels)):
            if value not in ("rgb", "native", None) or (name == "channels" and value is None):
                raise ValueError(f"{name} must be 'rgb' or 'native', got {value!r}")
        self.crop_size = _size_pair(crop_size, "crop_size")
        self.crop = crop
        self.channels = channels
        self.target_channels = target_channels or channels
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.splits = self._requested_splits(split)
        table = self._read_table()
        self.rows = self._select_rows(table)
        self._check_files()

    # -- construction

    def _where(self, row: int) -> str:
        if self._is_csv:
            return f"{self.manifest}: row {row} (line {row + 2})"
        return f"{self.manifest}: row {row}"

    @property
    def _is_csv(self) -> bool:
        return self.manifest.suffix.lower() not in (".parquet", ".pq")

    def _requested_splits(self, split: str | Sequence[str] | None) -> tuple[str, ...] | None:
        if split is None:
            return None
        splits = (split,) if isinstance(split, str) else tuple(split)
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (or None for all rows), got {split!r}")
        return splits

    def _read_table(self) -> pd.DataFrame:
        if not self.manifest.is_file():
            raise DatasetError(f"{self.manifest}: manifest not found")
        suffix = self.manifest.suffix.lower()
        try:
            if suffix in (".parquet", ".pq"):
                table = pd.read_parquet(self.manifest)
            elif suffix in (".csv", ".tsv", ".txt"):
                table = pd.read_csv(
                    self.manifest, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ","
                )
            else:
                raise DatasetError(
                    f"{self.manifest}: unknown manifest type {suffix or '(none)'}; use .csv, .tsv or .parquet"
                )
        except DatasetError:
            raise
        except ImportError as error:
            raise DatasetError(f"{self.manifest}: reading Parquet needs pyarrow ({error})") from error
        except Exception as error:  # pandas/pyarrow raise many types; name the file and why
            raise DatasetError(f"{self.manifest}: cannot read the manifest: {type(error).__name__}: {error}") from error
        table.columns = [str(c).strip() for c in table.columns]
        missing = [c for c in ("source",) if c not in table.columns]
        if self.splits is not None and "split" not in table.columns:
            missing.append("split")
        if missing:
            raise DatasetError(
                f"{self.manifest}: missing column(s) {', '.join(missing)}; it has {', '.join(table.columns) or 'none'}"
                f" (expected {', '.join(MANIFEST_COLUMNS)}; split is needed to select split={self.splits})"
            )
        return table

    @staticmethod
    def _cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float) and math.isnan(value):
            return ""
        if value is pd.NA or value is pd.NaT:
            return ""
        return str(value).strip()

    def _select_rows(self, table: pd.DataFrame) -> list[dict[str, Any]]:
        rows = []
        bad_splits = []
        for row_number, record in enumerate(table.to_dict("records")):
            cells = {c: self._cell(record.get(c)) for c in MANIFEST_COLUMNS if c in table.columns}
            split = cells.get("split", "")
            if "split" in table.columns and split not in SPLITS:
                bad_splits.append(f"{self._where(row_number)}: split {split!r}")
                continue
            if self.splits is not None and split not in self.splits:
                continue
            if not cells["source"]:
                raise DatasetError(f"{self._where(row_number)}: empty source")
            rows.append(
                {
                    "row": row_number,
                    "source": cells["source"],
                    "target": cells.get("target", ""),
                    "caption": cells.get("caption", ""),
                    "rna_id": cells.get("rna_id", ""),
                    "split": split,
                }
            )
        if bad_splits:
            shown = "; ".join(bad_splits[:5]) + (f"; and {len(bad_splits) - 5} more" if len(bad_splits) > 5 else "")
            raise DatasetError(f"unknown split value(s), expected one of {', '.join(SPLITS)}: {shown}")
        if not rows:
            raise DatasetError(f"{self.manifest}: no rows for split={self.splits}")
        return rows

    def _path(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.root / path

    def _check_files(self) -> None:
        missing = []
        for row in self.rows:
            for column in ("source", "target"):
                if row[column] and not self._path(row[column]).is_file():
                    missing.append(f"{self._where(row['row'])}: {column} file {row[column]!r} not found "
                                   f"({self._path(row[column])})")
        if missing:
            shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DatasetError(f"{len(missing)} missing image file(s): {shown}")

    # -- items

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops/augmentations for a new pass (reproducibly)."""
        self.epoch = int(epoch)

    def _load(self, row: dict[str, Any], column: str, channels: str) -> np.ndarray:
        path = self._path(row[column])
        try:
            return read_image(path, channels)
        except (OSError, UnidentifiedImageError, ValueError, SlideError, SyntaxError) as error:
            raise DatasetError(
                f"{self._where(row['row'])}: cannot read {column} image {row[column]!r} ({path}): "
                f"{type(error).__name__}: {error}"
            ) from error

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} rows")
        row = self.rows[index]
        generator = item_generator(self.seed, self.epoch, index)
        source = self._load(row, "source", self.channels)
        target = self._load(row, "target", self.target_channels) if row["target"] else None
        if target is not None and target.shape[:2] != source.shape[:2]:
            raise DatasetError(
                f"{self._where(row['row'])}: source is {source.shape[1]}x{source.shape[0]} px but target is "
                f"{target.shape[1]}x{target.shape[0]} px; a pair must be registered at the same size"
            )
        if self.crop_size is not None:
            height, width = source.shape[:2]
            if height < self.crop_size[0] or width < self.crop_size[1]:
                raise DatasetError(
                    f"{self._where(row['row'])}: image {row['source']!r} is {width}x{height} px, smaller than the "
                    f"crop {self.crop_size[1]}x{self.crop_size[0]}"
                )
            top, left = _crop_box(height, width, self.crop_size, self.crop, generator)
            box = (slice(top, top + self.crop_size[0]), slice(left, left + self.crop_size[1]))
            source = source[box]
            target = target[box] if target is not None else None
        item = {
            "source": torch.from_numpy(np.ascontiguousarray(source.transpose(2, 0, 1))),
            "target": None if target is None else torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1))),
            "has_target": target is not None,
            "caption": row["caption"],
            "rna_id": row["rna_id"],
            "split": row["split"],
            "index": index,
            "row": row["row"],
        }
        if self.transform is not None:
            item = self.transform(item, generator)
        return item

    def validate(self) -> None:
        """Decode every image once (slow): raises the first unreadable one, naming its row."""
        for index in range(len(self)):
            self[index]

    def fingerprint(self) -> str:
        """A hash of the manifest file and of every setting that changes the items."""
        digest = hashlib.sha256(self.manifest.read_bytes())
        config = {
            "class": "ManifestDataset",
            "splits": self.splits,
            "crop_size": self.crop_size,
            "crop": self.crop,
            "channels": self.channels,
            "target_channels": self.target_channels,
            "seed": self.seed if (self.crop == "random" and self.crop_size) or self.transform else None,
            "transform": _fingerprint_of(self.transform),
        }
        digest.update(json.dumps(config, sort_keys=True).encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"ManifestDataset({str(self.manifest)!r}, split={self.splits}, rows={len(self)}, crop={self.crop_size})"


# ---------------------------------------------------------------------------- slides


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


def _resize(patch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) float to (C, H, W): antialiased when shrinking, bilinear when enlarging."""
    if tuple(patch.shape[-2:]) == size:
        return patch
    shrink = patch.shape[-2] > size[0] or patch.shape[-1] > size[1]
    out = F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
    return out.clamp(0, 1)


def read_patch(reader: SlideReader, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A (C, H, W) float patch in [0, 1] of `size` (h, w) pixels whose pixel coordinates
    map to the slide's level-0 pixel coordinates by the 2x3 `matrix` (continuous
    coordinates, pixel i covering [i, i + 1)).

    Axis-aligned maps read one region from the best level (the coarsest one still as fine
    as the patch) and resample it; rotations, flips and shears sample the region read
    around the patch bilinearly."""
    height, width = size
    linear = matrix[:, :2]
    base_mpp = reader.level_mpp(0)
    if linear[0, 1] == 0 and linear[1, 0] == 0 and linear[0, 0] > 0 and linear[1, 1] > 0:
        level = reader.best_level_for_mpp(min(linear[0, 0] * base_mpp[0], linear[1, 1] * base_mpp[1]))
        ds = reader.level_downsamples[level]
        x0, y0 = matrix[0, 2] / ds, matrix[1, 2] / ds
        w, h = max(1, round(width * linear[0, 0] / ds)), max(1, round(height * linear[1, 1] / ds))
        pixels = reader.read_region(level, round(x0), round(y0), w, h)
        patch = torch.from_numpy(to_unit_float(pixels).transpose(2, 0, 1).copy())
        return _resize(patch, size)
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
        self.patch_size = _size_pair(patch_size, "patch_size")
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
            "transform": _fingerprint_of(self.transform),
        }
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        mode = "single" if self.targets is None else ("paired" if self.paired else "unpaired")
        return (
            f"SlidePatchDataset({len(self.slides)} slides, {mode}, patch={self.patch_size}, mpp={self.mpp}, "
            f"length={self.length}, seed={self.seed})"
        )
