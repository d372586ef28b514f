"""`ManifestDataset`: image pairs (and captions, RNA ids) listed in a CSV or Parquet manifest;
every problem a `DatasetError` naming the manifest and the row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from ..slide.readers import SlideError
from .items import DatasetError, Transform, crop_box, fingerprint_of, item_generator, read_image, size_pair


SPLITS = ("train", "val", "test")


MANIFEST_COLUMNS = ("source", "target", "caption", "rna_id", "split")


OPTIONAL_IMAGE_COLUMNS = ("target",)


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
        self.crop_size = size_pair(crop_size, "crop_size")
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
            top, left = crop_box(height, width, self.crop_size, self.crop, generator)
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
            "transform": fingerprint_of(self.transform),
        }
        digest.update(json.dumps(config, sort_keys=True).encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"ManifestDataset({str(self.manifest)!r}, split={self.splits}, rows={len(self)}, crop={self.crop_size})"
