"""OpenSlide backend: Aperio svs, Hamamatsu ndpi, Mirax mrxs, Leica scn, Ventana bif,
DICOM WSI and generic tiled TIFF.

Each level is a dask array whose chunks call ``OpenSlide.read_region`` (as napari-wsi and
tiatoolbox do): nothing is decoded until a chunk is computed. OpenSlide returns RGBA
where transparent means "outside the scanned area" (premultiplied in C; openslide-python
un-premultiplies it); it is composited onto the slide's background on purpose, so the
rest of the pipeline sees plain RGB.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import openslide

from mupad_core.slide.readers.base import (
    Kind,
    LazyImageMap,
    MppLike,
    SlideError,
    SlideReader,
    aligned_chunk,
    background_value,
    composite_alpha,
    file_token,
)


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def hamamatsu_fluorescence_channels(properties: dict[str, str]) -> list[str] | None:
    """RGB channel names of a Hamamatsu fluorescence NDPI, None for brightfield.

    NDP.scan writes its filter cube into the shading-data block: an excitation wavelength
    marks a fluorescence scan, and the RGB channel with a non-zero shading average is the
    one carrying the filter's signal (DAPI lands in blue, TRITC in red)."""
    shading = " ".join(f"{key}={value}" for key, value in properties.items() if "Shading" in key)
    excitation = re.search(r"ExcitationWaveLength=(\d+)", shading)
    if not excitation or int(excitation.group(1)) <= 0:
        return None
    name_match = re.search(r"Name=([^\r;]*)", shading)
    filter_name = name_match.group(1).strip() if name_match else "fluorescence"
    names = ["R", "G", "B"]
    for index, colour in enumerate("RGB"):
        average = re.search(rf"ShadingAve{colour}_\d+=(\d+)", shading)
        if average and int(average.group(1)) > 0:
            names[index] = filter_name
    return names


class OpenSlideRegions:
    """Reads composited regions from one slide; pickles as its path so dask workers in
    other processes reopen the slide themselves. Once closed it stays closed: a read after
    `close()` is an error naming the file, not a silent reopen that leaks a handle."""

    def __init__(self, path: Path, background: float, slide: openslide.OpenSlide | None = None):
        self.path = path
        self.background = background
        self._slide = slide
        self._closed = False

    @property
    def slide(self) -> openslide.OpenSlide:
        if self._closed:
            raise SlideError(self.path, "the reader is closed; open the slide again to read it")
        if self._slide is None:
            self._slide = openslide.OpenSlide(str(self.path))
        return self._slide

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process opens its own handle (this one's state does not travel).
        return {"path": self.path, "background": self.background, "_slide": None, "_closed": False}

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 at level coordinates; outside the scan reads as background."""
        downsample = self.slide.level_downsamples[level]
        try:
            rgba = np.asarray(self.slide.read_region((round(x * downsample), round(y * downsample)), level, (w, h)))
        except openslide.OpenSlideError as error:
            raise SlideError(self.path, f"cannot read level {level} region x={x} y={y} w={w} h={h}: {error}") from error
        return composite_alpha(rgba, self.background, premultiplied=False)

    def read_block(self, level: int, block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return self.read(level, x0, y0, x1 - x0, y1 - y0)

    def close(self) -> None:
        self._closed = True
        if self._slide is not None:
            self._slide.close()
            self._slide = None


class OpenSlideReader(SlideReader):
    """Slides that OpenSlide opens, as lazy RGB levels (fluorescence NDPI included)."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike, mpp: MppLike | None = None, *, require_mpp: bool = True):
        path = Path(path)
        try:
            slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideError(path, f"OpenSlide cannot open it: {error}") from error
        properties = dict(slide.properties)
        fluorescence_names = hamamatsu_fluorescence_channels(properties)
        kind: Kind = "brightfield" if fluorescence_names is None else "fluorescence"
        self._regions = OpenSlideRegions(path, background_value(np.dtype(np.uint8), kind), slide)
        file_mpp_x = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_X))
        file_mpp_y = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_Y))
        super().__init__(
            path,
            levels=[self._lazy_level(level, properties) for level in range(slide.level_count)],
            level_downsamples=[float(ds) for ds in slide.level_downsamples],
            file_mpp=(file_mpp_x, file_mpp_y) if file_mpp_x and file_mpp_y else None,
            mpp=mpp,
            require_mpp=require_mpp,
            kind=kind,
            channel_names=fluorescence_names or ["R", "G", "B"],
            vendor=properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown",
            objective_power=_float_or_none(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
            associated_images=LazyImageMap(list(slide.associated_images), self._associated_image),
            properties=properties,
        )

    def _lazy_level(self, level: int, properties: dict[str, str]) -> da.Array:
        width, height = self._regions.slide.level_dimensions[level]
        tile_w = int(properties.get(f"openslide.level[{level}].tile-width", 256))
        tile_h = int(properties.get(f"openslide.level[{level}].tile-height", 256))
        chunks = (aligned_chunk(tile_h, height), aligned_chunk(tile_w, width), 3)
        return da.map_blocks(
            functools.partial(self._regions.read_block, level),
            chunks=da.core.normalize_chunks(chunks, (height, width, 3)),
            dtype=np.uint8,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
            name=f"openslide-level{level}-{file_token(self._regions.path, chunks)}",
        )

    def _associated_image(self, name: str) -> np.ndarray:
        image = np.asarray(self._regions.slide.associated_images[name])
        return composite_alpha(image, 255, premultiplied=False) if image.shape[-1] == 4 else image

    def _read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """OpenSlide pads outside the scan with transparency, which composites to background,
        so one direct call serves any region. Levels beyond OpenSlide's own (cached overviews
        of a flat image) are read like any other backend's."""
        if level >= self._regions.slide.level_count:
            return super()._read_region(level, x, y, w, h)
        return self._regions.read(level, x, y, w, h)

    def close(self) -> None:
        self._regions.close()
