"""An open slide as napari layer data tuples: the one place that decides how slides look.

Brightfield (H&E, IHC) is one RGB layer with fixed 0..max contrast, so napari runs no
statistics pass over a whole slide. Fluorescence is one additive layer per channel, named
after its marker and coloured as the file says (OME-Zarr `omero`), else by position. The
scale is the pixel size in micrometres; the levels stay the reader's lazy dask arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from mupad_core.slide.readers.base import SlideReader
from mupad_core.store.omezarr import FLUORESCENCE_COLORS, RGB_CHANNELS

LayerDataTuple = tuple[list[da.Array], dict[str, Any], str]

# napari draws the coarsest level when zoomed out; a pyramid whose coarsest level is still
# larger than this gets strided overview levels, so a one-level slide never becomes one
# giant texture (the overview still reads every tile of the level once, when drawn).
OVERVIEW_MAX_PX = 2048
# napari's own colormap names for the hex colours OME-Zarr files and our writer use.
NAPARI_COLORMAP_NAMES = {
    "FF0000": "red",
    "00FF00": "green",
    "0000FF": "blue",
    "FF00FF": "magenta",
    "00FFFF": "cyan",
    "FFFF00": "yellow",
    "FFFFFF": "gray",
}
SLIDE_NAME_SUFFIXES = (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif")


def slide_layer_data(reader: SlideReader) -> list[LayerDataTuple]:
    """Layer data tuples for every layer a slide shows as: one RGB layer or one per channel."""
    levels = with_overview_levels(reader.levels)
    common: dict[str, Any] = {"multiscale": True, "axis_labels": ("y", "x")}
    if reader.mpp is not None:
        common["scale"] = (reader.mpp[1], reader.mpp[0])
        common["units"] = ("micrometer", "micrometer")
    origin = tuple(float(v) for v in getattr(reader, "origin", (0.0, 0.0)))
    if origin != (0.0, 0.0):
        common["translate"] = origin  # a region's result lies where the region lies on its slide
    metadata = slide_metadata(reader)
    if reader.kind == "brightfield" and reader.levels[0].shape[2] == 3:
        meta = {
            "name": slide_display_name(reader.path),
            "rgb": True,
            "contrast_limits": list(dtype_range(reader.dtype)),
            "metadata": metadata,
            **common,
        }
        return [(levels, meta, "image")]

    channels = omero_channels(reader.properties)
    pyramid_is_small = len(levels) == len(reader.levels)
    layers = []
    for index, name in enumerate(reader.channel_names):
        omero = channels[index] if len(channels) == len(reader.channel_names) else {}
        meta = {
            "name": name,
            "colormap": napari_colormap(channel_color(reader, index, omero)),
            "blending": "additive",
            "metadata": {**metadata, "channel": name, "channel_index": index},
            **common,
        }
        window = omero.get("window") or {}
        if "start" in window and "end" in window and window["end"] > window["start"]:
            meta["contrast_limits"] = [float(window["start"]), float(window["end"])]
        elif not pyramid_is_small:
            # napari would estimate limits from the coarsest level, here a strided view
            # that reads the whole slide: the dtype's range costs nothing.
            meta["contrast_limits"] = list(dtype_range(reader.dtype))
        layers.append(([level[..., index] for level in levels], meta, "image"))
    return layers


def with_overview_levels(levels: list[da.Array]) -> list[da.Array]:
    """The file's levels plus strided ones until the coarsest fits OVERVIEW_MAX_PX."""
    levels = list(levels)
    while max(levels[-1].shape[:2]) > OVERVIEW_MAX_PX:
        levels.append(levels[-1][::2, ::2])
    return levels


def slide_metadata(reader: SlideReader) -> dict[str, Any]:
    """What a layer keeps about its file: enough to trace it, re-export it and warn about it."""
    provenance = reader.properties.get("mupad")
    provenance = dict(provenance) if isinstance(provenance, dict) else None
    return {
        "path": str(reader.path),
        "backend": reader.backend,
        "vendor": reader.vendor,
        "kind": reader.kind,
        "mpp": None if reader.mpp is None else tuple(reader.mpp),
        "objective_power": reader.objective_power,
        "level_shapes": [tuple(int(n) for n in level.shape) for level in reader.levels],
        "level_downsamples": list(reader.level_downsamples),
        "channel_names": list(reader.channel_names),
        "provenance": provenance,
        "notice": provenance.get("notice") if provenance else None,
    }


def slide_display_name(path: Path) -> str:
    """The file name without its (compound) image suffix: "CMU-1" for CMU-1.svs or CMU-1.ome.zarr."""
    name = path.name
    for suffix in SLIDE_NAME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """The full value range of a dtype: integer limits, or 0..1 for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def omero_channels(properties: dict[str, Any]) -> list[dict[str, Any]]:
    """The `omero` channel list of an OME-Zarr's attributes (NGFF 0.4 top level, 0.5 under "ome")."""
    for holder in (properties.get("ome"), properties):
        if isinstance(holder, dict) and isinstance(holder.get("omero"), dict):
            channels = holder["omero"].get("channels")
            return channels if isinstance(channels, list) else []
    return []


def channel_color(reader: SlideReader, index: int, omero: dict[str, Any]) -> str:
    """RRGGBB of a channel: the file's omero colour or OME-XML Color, RGB order for OpenSlide's RGB-packed
    fluorescence (NDPI), else the writer's marker palette by position."""
    color = str(omero.get("color", "")).lstrip("#").upper()
    if len(color) == 6 and all(char in "0123456789ABCDEF" for char in color):
        return color
    if reader.channel_colors and index < len(reader.channel_colors):
        return reader.channel_colors[index]
    if reader.backend == "openslide" and len(reader.channel_names) == 3:
        return RGB_CHANNELS[index][1]
    return FLUORESCENCE_COLORS[index % len(FLUORESCENCE_COLORS)]


def napari_colormap(color: str) -> str:
    """A napari colormap argument for black → the colour."""
    return NAPARI_COLORMAP_NAMES.get(color, f"#{color.lower()}")
