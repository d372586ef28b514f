"""tifffile backend (OME-TIFF, SubIFD and series pyramids, plain TIFF) and PIL backend
(PNG, JPEG and other flat images).

OpenSlide shows an OME-TIFF's SubIFD pyramid as one level and rejects many OME-TIFFs
outright; tifffile exposes every level as a zarr store that dask reads tile by tile.
Pixel sizes come from OME PhysicalSizeX/Y (unit-converted) or from TIFF resolution tags
when their unit is a length; PNG/JPEG dpi fields are screen placeholders and are ignored.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from PIL import Image, UnidentifiedImageError

from mupad_core.slide.readers.base import (
    ContiguousPixels,
    DecodeOnce,
    Kind,
    LazyImageMap,
    MppLike,
    SlideError,
    TARGET_CHUNK_PX,
    SlideReader,
    aligned_chunk,
    background_value,
    composite_alpha,
    lazy_level,
    to_yxc,
)

# µm per unit, for OME length units.
OME_LENGTH_UNITS_UM = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "in": 25400.0,
}
# µm per TIFF ResolutionUnit (2 inch, 3 cm; 4 mm and 5 µm are tifffile extensions); 1 is "none".
TIFF_RESOLUTION_UNITS_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
ASSOCIATED_NAMES = ("label", "macro", "thumbnail")
RGB_PHOTOMETRICS = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
# PIL modes read as one fluorescence channel, with the dtype their pixels keep.
PIL_GREY_DTYPES = {
    "L": np.uint8,
    "I;16": np.uint16,
    "I;16B": np.uint16,
    "I;16L": np.uint16,
    "I": np.int32,
    "F": np.float32,
}


def _local_name(element: ElementTree.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def _ome_children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element.iter() if _local_name(child) == name]


def parse_ome(xml: str) -> dict[str, Any]:
    """Pixel size (µm), channel names and objective power of the first OME Image."""
    root = ElementTree.fromstring(xml)
    result: dict[str, Any] = {"mpp": None, "channel_names": [], "channel_colors": [], "objective_power": None}
    pixels = _ome_children(root, "Pixels")
    if pixels:
        sizes = []
        for axis in "XY":
            value = pixels[0].get(f"PhysicalSize{axis}")
            unit = pixels[0].get(f"PhysicalSize{axis}Unit", "µm")
            if value is None or unit not in OME_LENGTH_UNITS_UM:
                break
            sizes.append(float(value) * OME_LENGTH_UNITS_UM[unit])
        if len(sizes) == 2:
            result["mpp"] = (sizes[0], sizes[1])
        channels = _ome_children(pixels[0], "Channel")
        result["channel_names"] = [channel.get("Name", "") for channel in channels]
        result["channel_colors"] = [ome_color_hex(channel.get("Color")) for channel in channels]
    objectives = [o.get("NominalMagnification") for o in _ome_children(root, "Objective")]
    if objectives and objectives[0]:
        result["objective_power"] = float(objectives[0])
    return result


def ome_color_hex(value: str | None) -> str | None:
    """RRGGBB of an OME Color (a signed 32-bit RGBA integer), None when absent or malformed."""
    try:
        return f"{(int(value) & 0xFFFFFFFF) >> 8:06X}" if value is not None else None
    except ValueError:
        return None


def tiff_resolution_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """µm/px from the resolution tags, only when their unit is a length (not 'none')."""
    unit_um = TIFF_RESOLUTION_UNITS_UM.get(int(page.resolutionunit))
    x_res, y_res = page.resolution
    if unit_um is None or x_res <= 0 or y_res <= 0:
        return None
    return unit_um / x_res, unit_um / y_res


def _svs_mpp(tif: tifffile.TiffFile) -> tuple[float, float] | None:
    mpp = tifffile.svs_description_metadata(tif.pages.first.description).get("MPP")
    return (float(mpp), float(mpp)) if mpp else None


def _default_channel_names(count: int, kind: Kind) -> list[str]:
    if kind == "brightfield":
        return ["R", "G", "B"][:count]
    return [f"channel {index}" for index in range(count)]


class TiffFileReader(SlideReader):
    """OME-TIFF (SubIFD or series pyramids, RGB or multichannel) and plain TIFF."""

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike, mpp: MppLike | None = None, *, require_mpp: bool = True):
        path = Path(path)
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as error:
            raise SlideError(path, f"tifffile cannot open it: {error}") from error
        try:
            self._open_series(path, self._tif.series[0], mpp, require_mpp)
        except (ValueError, IndexError) as error:  # tifffile's complaints about the layout
            self._tif.close()
            raise SlideError(path, f"tifffile cannot read its image layout: {error}") from error
        except BaseException:
            self._tif.close()
            raise

    def _open_series(
        self, path: Path, series: tifffile.TiffPageSeries, mpp: MppLike | None, require_mpp: bool
    ) -> None:
        first_page = series.keyframe
        for level in series.levels:
            compression = level.keyframe.compression
            if compression not in tifffile.TIFF.DECOMPRESSORS:
                raise SlideError(path, f"tifffile cannot decode its TIFF compression {int(compression)}")
        samples = first_page.samplesperpixel
        kind: Kind = "brightfield" if first_page.photometric in RGB_PHOTOMETRICS and samples >= 3 else "fluorescence"
        levels = [self._yxc_level(path, series, index) for index in range(len(series.levels))]
        if kind == "brightfield" and samples == 4:
            premultiplied = tuple(first_page.extrasamples) == (tifffile.EXTRASAMPLE.ASSOCALPHA,)
            white = background_value(levels[0].dtype, kind)
            levels = [
                level.map_blocks(
                    composite_alpha,
                    white,
                    premultiplied=premultiplied,
                    chunks=(*level.chunks[:2], (3,)),
                    dtype=level.dtype,
                )
                for level in levels
            ]
        ome = parse_ome(self._tif.ome_metadata) if self._tif.is_ome else None
        if ome is not None:
            file_mpp = ome["mpp"]
        elif self._tif.is_svs:
            file_mpp = _svs_mpp(self._tif)
        else:
            file_mpp = tiff_resolution_mpp(first_page)
        channels = levels[0].shape[2]
        names = ome["channel_names"] if ome else []
        if len(names) != channels or not all(names):
            names = _default_channel_names(channels, kind)
        height0, width0 = levels[0].shape[:2]
        super().__init__(
            path,
            levels=levels,
            level_downsamples=[(width0 / lv.shape[1] + height0 / lv.shape[0]) / 2 for lv in levels],
            file_mpp=file_mpp,
            mpp=mpp,
            require_mpp=require_mpp,
            kind=kind,
            channel_names=names,
            vendor="ome-tiff" if ome is not None else ("aperio" if self._tif.is_svs else "tiff"),
            objective_power=ome["objective_power"] if ome else None,
            associated_images=self._associated_images(),
            properties=self._properties(first_page),
        )
        colors = ome["channel_colors"] if ome else []
        if len(colors) == channels and all(colors):
            self.channel_colors = colors

    def _yxc_level(self, path: Path, series: tifffile.TiffPageSeries, index: int) -> da.Array:
        level = series.levels[index]
        if level.dataoffset is not None and level.keyframe.compression == tifffile.COMPRESSION.NONE:
            # Uncompressed and contiguous (often one strip of the whole image): tifffile's zarr
            # view would read the whole strip for any chunk; this reads only the bytes asked for.
            source = ContiguousPixels(path, level.dataoffset, level.shape,
                                      level.dtype.newbyteorder(self._tif.byteorder))
            chunks = tuple(min(TARGET_CHUNK_PX, extent) if axis in "YX" else extent
                           for axis, extent in zip(series.axes, level.shape))
            return to_yxc(lazy_level(source, path, index, chunks, "tifffile"), series.axes, path)
        source = zarr.open_array(series.aszarr(level=index), mode="r")
        chunks = tuple(
            aligned_chunk(native, extent) if axis in "YX" else extent
            for axis, native, extent in zip(series.axes, source.chunks, source.shape)
        )
        return to_yxc(lazy_level(source, path, index, chunks, "tifffile"), series.axes, path)

    def _associated_images(self) -> LazyImageMap:
        by_name: dict[str, tifffile.TiffPageSeries] = {}
        for series in self._tif.series[1:]:
            for name in ASSOCIATED_NAMES:
                if name in (series.name or "").lower():
                    by_name.setdefault(name, series)

        def load(name: str) -> np.ndarray:
            series = by_name[name]
            image = to_yxc(series.asarray(), series.axes, self.path)
            return composite_alpha(image, 255, premultiplied=False) if image.shape[2] == 4 else image

        return LazyImageMap(list(by_name), load)

    def _properties(self, page: tifffile.TiffPage) -> dict[str, Any]:
        properties: dict[str, Any] = {
            f"tiff.{tag.name}": tag.value
            for tag in page.tags
            if isinstance(tag.value, (str, int, float)) and tag.name not in ("ImageDescription",)
        }
        if self._tif.is_ome:
            properties["ome.xml"] = self._tif.ome_metadata
        elif page.description:
            properties["tiff.ImageDescription"] = page.description
        return properties

    def close(self) -> None:
        self._tif.close()


@contextlib.contextmanager
def open_large_image(path: Path):
    """PIL's Image.open without its decompression-bomb limit (about 179 megapixels): a whole
    slide exported as PNG is a file the user chose to open, routinely larger than that. The
    limit is PIL-global, so it is lifted only while this image is open and put back after."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = limit


class PlainImageReader(SlideReader):
    """PNG, JPEG and other flat images PIL decodes: one level, decoded on first read.

    Alpha is composited onto white on purpose (histology tiles exported as RGBA are opaque
    or transparent-means-nothing). Greyscale images are one fluorescence channel and keep
    their dtype (16-bit stays 16-bit)."""

    backend = "pil"

    def __init__(self, path: str | os.PathLike, mpp: MppLike | None = None, *, require_mpp: bool = True):
        path = Path(path)
        try:
            with open_large_image(path) as image:
                mode, (width, height), image_format = image.mode, image.size, image.format or "image"
                properties = {
                    key: value for key, value in image.info.items() if isinstance(value, (str, int, float, tuple))
                }
        except (UnidentifiedImageError, OSError) as error:
            raise SlideError(path, f"not a readable image: {error}") from error
        kind: Kind = "fluorescence" if mode in PIL_GREY_DTYPES else "brightfield"
        dtype = np.dtype(PIL_GREY_DTYPES.get(mode, np.uint8))
        shape = (height, width, 1 if kind == "fluorescence" else 3)

        def decode() -> np.ndarray:
            with open_large_image(path) as image:
                if kind == "fluorescence":
                    return np.asarray(image, dtype=dtype).reshape(shape)
                if image.mode == "RGB":  # no alpha to composite: one copy, not three
                    return np.asarray(image)
                rgba = np.asarray(image.convert("RGBA"))
            return composite_alpha(rgba, 255, premultiplied=False)

        chunks = (min(TARGET_CHUNK_PX, height), min(TARGET_CHUNK_PX, width), shape[2])
        super().__init__(
            path,
            levels=[lazy_level(DecodeOnce(shape, dtype, decode), path, 0, chunks, "pil")],
            level_downsamples=[1.0],
            file_mpp=None,
            mpp=mpp,
            require_mpp=require_mpp,
            kind=kind,
            channel_names=_default_channel_names(shape[2], kind),
            vendor=image_format.lower(),
            objective_power=None,
            associated_images=LazyImageMap([], lambda name: np.empty(0)),
            properties={"image.mode": mode, **properties},
        )

    def close(self) -> None:
        """Nothing stays open: PIL reopens the file for the one decode."""
