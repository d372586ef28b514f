"""Pyramidal OME-TIFF from any pyramid we can read: the file QuPath opens as an overlay.

The OME-TIFF pyramid layout (OME 6): level 0 in the main IFDs, every coarser level a SubIFD
of them; tiled and compressed. Pixels stream one tile at a time from the source's lazy levels
(an OME-Zarr result, or any slide behind `SlideReader`), so memory does not grow with the
slide. The OME-XML is built with ome-types (pixel size, channel names and colours, the run's
provenance as a MapAnnotation), checked against the OME schema, and the file is written
under ``NAME.partial`` and renamed only when complete and valid: an interrupted export never
leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from mupad_core.slide.readers.base import SlideReader

PARTIAL_SUFFIX = ".partial"
TILE_PX = 512
COMPRESSIONS = ("zlib", "jpeg", "lzw", "zstd", "none")
PROVENANCE_NAMESPACE = "napari-mupad.org/provenance"
OME_PIXEL_TYPES = {
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "float32": "float",
    "float64": "double",
}
# Channel colours for fluorescence when the source names none (OME colours are RGBA).
DEFAULT_COLOURS = ("0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF")

Progress = Callable[[int, int], None]


class ExportError(ValueError):
    """An export that cannot be written: names the file and the problem."""


def is_ome_tiff_path(path: str | os.PathLike[str]) -> bool:
    name = str(path).lower()
    return name.endswith((".ome.tif", ".ome.tiff"))


def export_ome_tiff(
    source: SlideReader,
    out_path: str | os.PathLike[str],
    *,
    tile: int = TILE_PX,
    compression: str = "zlib",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write `source`'s pyramid as one pyramidal OME-TIFF at `out_path`; returns the path.

    Every level the source holds becomes a SubIFD level (QuPath and tifffile read each
    level's size from the file, so factors need not be powers of two). Brightfield RGB is
    written interleaved (one RGB plane, as scanners do); fluorescence one plane per channel.
    `progress(done, total)` counts tiles over all levels."""
    out = Path(out_path)
    if not is_ome_tiff_path(out):
        raise ExportError(f"{out}: an OME-TIFF path ends in .ome.tif or .ome.tiff")
    if compression not in COMPRESSIONS:
        raise ExportError(f"{out}: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if tile <= 0 or tile % 16:
        raise ExportError(f"{out}: the tile size must be a positive multiple of 16, got {tile}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    levels = list(source.levels)
    dtype = np.dtype(levels[0].dtype)
    if dtype.name not in OME_PIXEL_TYPES:
        raise ExportError(f"{source.path}: pixels of type {dtype} have no OME-TIFF pixel type")
    rgb = source.kind == "brightfield" and levels[0].shape[2] == 3 and dtype == np.uint8
    if compression == "jpeg" and not (dtype == np.uint8):
        raise ExportError(f"{out}: JPEG holds 8-bit pixels only; this image is {dtype} (use zlib)")

    xml = ome_xml(source, name=out.name.removesuffix(".tiff").removesuffix(".tif").removesuffix(".ome"), rgb=rgb)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    partial.unlink(missing_ok=True)
    channels = levels[0].shape[2]
    planes = 1 if rgb else channels
    total = sum(planes * _tile_count(level.shape[:2], tile) for level in levels)
    counter = _Counter(total, progress)
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "compression": None if compression == "none" else compression,
        "photometric": "rgb" if rgb else "minisblack",
        "planarconfig": "contig" if rgb else None,  # fluorescence: one page per channel
        "metadata": None,  # the OME-XML below is the only description
        "software": "napari-mupad",
    }
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    resolution = _resolution(source.mpp)
    try:
        with tifffile.TiffWriter(partial, bigtiff=True, ome=False) as tif:
            for index, level in enumerate(levels):
                height, width = level.shape[:2]
                shape = (height, width, 3) if rgb else (channels, height, width)
                extra: dict[str, Any] = {"subifds": len(levels) - 1, "description": xml.encode("utf-8")} if index == 0 else {"subfiletype": 1}
                downsample = source.level_downsamples[index]
                tif.write(
                    _tiles(level, tile, rgb, counter),
                    shape=shape,
                    dtype=dtype,
                    resolution=None if resolution is None else (resolution[0] / downsample, resolution[1] / downsample),
                    resolutionunit="CENTIMETER" if resolution is not None else None,
                    **extra,
                    **options,
                )
        check_ome_tiff(partial, expected_levels=len(levels))
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


def ome_xml(source: SlideReader, *, name: str, rgb: bool) -> str:
    """The OME-XML of the exported image, validated against the OME schema."""
    from ome_types import from_xml, to_xml
    from ome_types import model as ome

    height, width, channels = source.levels[0].shape
    pixel_size: dict[str, Any] = {}
    if source.mpp is not None:
        pixel_size = {
            "physical_size_x": float(source.mpp[0]),
            "physical_size_y": float(source.mpp[1]),
            "physical_size_x_unit": ome.UnitsLength.MICROMETER,
            "physical_size_y_unit": ome.UnitsLength.MICROMETER,
        }
    colours = _channel_colours(source, channels)
    if rgb:
        channel_list = [ome.Channel(id="Channel:0:0", name="RGB", samples_per_pixel=3)]
        tiff_data = [ome.TiffData(ifd=0, first_c=0, plane_count=1)]
        size_c = 3
    else:
        channel_list = [
            ome.Channel(id=f"Channel:0:{c}", name=source.channel_names[c], samples_per_pixel=1,
                        color=ome.Color(f"#{colours[c]}FF"))
            for c in range(channels)
        ]
        tiff_data = [ome.TiffData(ifd=c, first_c=c, plane_count=1) for c in range(channels)]
        size_c = channels
    provenance = _provenance(source)
    annotations = None
    refs = []
    if provenance:
        annotation = ome.MapAnnotation(
            id="Annotation:0",
            namespace=PROVENANCE_NAMESPACE,
            value=ome.Map(ms=[ome.Map.M(k=key, value=value) for key, value in provenance.items()]),
        )
        annotations = ome.StructuredAnnotations(map_annotations=[annotation])
        refs = [ome.AnnotationRef(id="Annotation:0")]
    image = ome.Image(
        id="Image:0",
        name=name,
        pixels=ome.Pixels(
            id="Pixels:0",
            dimension_order="XYCZT",
            type=OME_PIXEL_TYPES[np.dtype(source.levels[0].dtype).name],
            size_x=width,
            size_y=height,
            size_c=size_c,
            size_z=1,
            size_t=1,
            channels=channel_list,
            tiff_data_blocks=tiff_data,
            **pixel_size,
        ),
        annotation_refs=refs,
    )
    document = ome.OME(images=[image], structured_annotations=annotations, creator="napari-mupad")
    xml = to_xml(document)
    from_xml(xml, validate=True)  # the OME schema, not string checks: a bad document fails here
    return xml


def check_ome_tiff(path: str | os.PathLike[str], expected_levels: int) -> None:
    """Read back what was written: an OME series with every level, and schema-valid OME-XML."""
    from ome_types import from_xml

    with tifffile.TiffFile(path) as tif:
        if not tif.is_ome:
            raise ExportError(f"{path}: written file is not recognised as OME-TIFF")
        levels = len(tif.series[0].levels)
        if levels != expected_levels:
            raise ExportError(f"{path}: {levels} pyramid levels read back, {expected_levels} written")
        from_xml(tif.ome_metadata, validate=True)


def _tiles(level: Any, tile: int, rgb: bool, counter: _Counter) -> Iterator[np.ndarray]:
    """Tiles in the order tifffile writes them: plane by plane, rows then columns."""
    height, width, channels = level.shape
    planes = [None] if rgb else range(channels)
    for plane in planes:
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                region = level[top : top + tile, left : left + tile]
                block = np.asarray(region if rgb else region[..., plane])
                counter.step()
                yield np.ascontiguousarray(block)


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def _tile_count(shape_yx: tuple[int, int], tile: int) -> int:
    return -(-shape_yx[0] // tile) * -(-shape_yx[1] // tile)


def _resolution(mpp: tuple[float, float] | None) -> tuple[float, float] | None:
    """Pixels per centimetre (x, y), the TIFF tags QuPath and OpenSlide read."""
    if mpp is None:
        return None
    return 1e4 / float(mpp[0]), 1e4 / float(mpp[1])


def _channel_colours(source: SlideReader, channels: int) -> list[str]:
    if source.channel_colors and len(source.channel_colors) == channels:
        return list(source.channel_colors)
    return [DEFAULT_COLOURS[c % len(DEFAULT_COLOURS)] for c in range(channels)]


def _provenance(source: SlideReader) -> dict[str, str]:
    """The run's provenance (our stores' `mupad` attributes), one string value per key."""
    record = source.properties.get("mupad")
    if not isinstance(record, dict):
        return {"source": str(source.path)}
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in record.items()}
