"""OME-Zarr backend: NGFF 0.4 (zarr v2) and 0.5 (zarr v3) images, our own outputs included.

The multiscales datasets are the levels; the pixel size is the first dataset's scale
transform (times any multiscales-wide scale) when the spatial axes carry a length unit;
channel names come from the `omero` block. All group attributes are kept in
`properties`, which is where the pipeline's provenance lives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from mupad_core.slide.readers.base import (
    Kind,
    LazyImageMap,
    MppLike,
    SlideError,
    SlideReader,
    aligned_chunk,
    lazy_level,
    to_yxc,
)

# µm per NGFF (UDUNITS-2) length unit.
NGFF_LENGTH_UNITS_UM = {
    "picometer": 1e-6,
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
    "inch": 25400.0,
}
RGB_LABELS = (("r", "g", "b"), ("red", "green", "blue"))


def is_ome_zarr_folder(path: Path) -> bool:
    """A folder that holds zarr group metadata (v2 .zattrs/.zgroup or v3 zarr.json)."""
    return path.is_dir() and any((path / name).is_file() for name in (".zattrs", ".zgroup", "zarr.json"))


def _axis_letters(axes: list[Any]) -> str:
    """NGFF axes as tifffile-style letters: c→C, t→T, y→Y, x→X, other space axes→Z."""
    letters = []
    for axis in axes:
        name = (axis["name"] if isinstance(axis, dict) else axis).lower()
        kind = axis.get("type") if isinstance(axis, dict) else None
        if kind == "channel" or name == "c":
            letters.append("C")
        elif kind == "time" or name == "t":
            letters.append("T")
        else:
            letters.append(name.upper() if name in ("x", "y") else "Z")
    return "".join(letters)


def _scale(transforms: list[dict[str, Any]] | None, ndim: int) -> list[float]:
    for transform in transforms or []:
        if transform.get("type") == "scale":
            return [float(v) for v in transform["scale"]]
    return [1.0] * ndim


def _translation(transforms: list[dict[str, Any]] | None, ndim: int) -> list[float]:
    for transform in transforms or []:
        if transform.get("type") == "translation" and "translation" in transform:
            return [float(v) for v in transform["translation"]]
    return [0.0] * ndim


class OmeZarrReader(SlideReader):
    """An OME-Zarr image group as a lazy pyramid."""

    backend = "omezarr"

    def __init__(self, path: str | os.PathLike, mpp: MppLike | None = None, *, require_mpp: bool = True):
        path = Path(path)
        try:
            group = zarr.open_group(path, mode="r")
        except (zarr.errors.BaseZarrError, OSError, ValueError) as error:
            raise SlideError(path, f"not a zarr group: {error}") from error
        attributes = group.attrs.asdict()
        ngff = attributes.get("ome", attributes)  # 0.5 nests its metadata under "ome"
        multiscales = ngff.get("multiscales")
        if not multiscales:
            raise SlideError(path, "is a zarr group without OME-NGFF multiscales metadata, not an OME-Zarr image")
        multiscale = multiscales[0]
        axes = _axis_letters(multiscale["axes"])
        if "Y" not in axes or "X" not in axes:
            raise SlideError(path, f"has no y and x axes (axes {multiscale['axes']})")
        try:
            arrays = [group[dataset["path"]] for dataset in multiscale["datasets"]]
        except KeyError as error:
            raise SlideError(path, f"lists dataset {error} that the store does not hold") from error
        global_scale = _scale(multiscale.get("coordinateTransformations"), len(axes))
        scales = [
            [s * g for s, g in zip(_scale(dataset.get("coordinateTransformations"), len(axes)), global_scale)]
            for dataset in multiscale["datasets"]
        ]
        y, x = axes.index("Y"), axes.index("X")
        levels = [self._level(path, array, index, axes) for index, array in enumerate(arrays)]
        omero_channels = ngff.get("omero", {}).get("channels", [])
        labels = [str(channel.get("label", "")) for channel in omero_channels]
        colors = [str(channel.get("color", "")).lstrip("#").upper() for channel in omero_channels]
        channels = levels[0].shape[2]
        rgb_labels = not labels or tuple(label.lower() for label in labels) in RGB_LABELS
        kind: Kind = "brightfield" if channels == 3 and levels[0].dtype == np.uint8 and rgb_labels else "fluorescence"
        if len(labels) != channels or not all(labels):
            labels = ["R", "G", "B"] if kind == "brightfield" else [f"channel {i}" for i in range(channels)]
        super().__init__(
            path,
            levels=levels,
            level_downsamples=[(s[x] / scales[0][x] + s[y] / scales[0][y]) / 2 for s in scales],
            file_mpp=self._file_mpp(multiscale["axes"], scales[0], x, y),
            mpp=mpp,
            require_mpp=require_mpp,
            kind=kind,
            channel_names=labels,
            vendor="ome-zarr",
            objective_power=None,
            associated_images=LazyImageMap([], lambda name: np.empty(0)),
            properties=attributes,
        )
        self.ngff_version = str(ngff.get("version") or multiscale.get("version") or "")
        if len(colors) == channels and all(len(c) == 6 for c in colors):
            self.channel_colors = colors
        self.origin = self._origin(multiscale, global_scale, y, x, len(axes))

    @staticmethod
    def _origin(multiscale: dict[str, Any], global_scale: list[float], y: int, x: int, ndim: int) -> tuple[float, float]:
        """(y, x) of level-0 pixel (0, 0)'s centre: its translation (then the global one), in µm
        when the axes name a length unit, else in the file's units."""
        local = _translation(multiscale["datasets"][0].get("coordinateTransformations"), ndim)
        outer = _translation(multiscale.get("coordinateTransformations"), ndim)
        position = [t * g + o for t, g, o in zip(local, global_scale, outer)]
        units = [a.get("unit") if isinstance(a, dict) else None for a in multiscale["axes"]]
        factor = [NGFF_LENGTH_UNITS_UM.get(units[i], 1.0) for i in (y, x)]
        return position[y] * factor[0], position[x] * factor[1]

    @staticmethod
    def _level(path: Path, array: zarr.Array, index: int, axes: str) -> da.Array:
        stored_chunks = array.shards or array.chunks
        chunks = tuple(
            aligned_chunk(native, extent) if axis in "YX" else extent
            for axis, native, extent in zip(axes, stored_chunks, array.shape)
        )
        return to_yxc(lazy_level(array, path, index, chunks, "omezarr"), axes, path)

    @staticmethod
    def _file_mpp(axes: list[Any], scale: list[float], x: int, y: int) -> tuple[float, float] | None:
        """µm/px only when both spatial axes state a known length unit."""
        units = [axes[i].get("unit") if isinstance(axes[i], dict) else None for i in (x, y)]
        if not all(unit in NGFF_LENGTH_UNITS_UM for unit in units):
            return None
        return scale[x] * NGFF_LENGTH_UNITS_UM[units[0]], scale[y] * NGFF_LENGTH_UNITS_UM[units[1]]

    def close(self) -> None:
        """Nothing to release: zarr opens chunk files per read."""
