"""`open_slide`: one entry point that picks the reader for a file.

- OpenSlide formats (svs, ndpi, mrxs, scn, bif, DICOM, generic tiled TIFF) → OpenSlide,
  chosen by `OpenSlide.detect_format`; a folder of .dcm files opens through one of them.
- OME-TIFF → tifffile (OpenSlide sees a SubIFD pyramid as one level and ignores OME
  metadata); other .tif/.tiff that OpenSlide cannot open → tifffile.
- .zarr folders, or folders holding .zattrs/zarr.json → OME-Zarr.
- .png/.jpg/.jpeg → PIL.
"""

from __future__ import annotations

import os
from pathlib import Path

import openslide
import tifffile

from mupad_core.slide.readers.base import MissingPixelSizeError, MppLike, SlideError, SlideReader
from mupad_core.slide.readers.omezarr_reader import OmeZarrReader, is_ome_zarr_folder
from mupad_core.slide.readers.openslide_reader import OpenSlideReader
from mupad_core.slide.readers.overview_cache import Progress, add_overview
from mupad_core.slide.readers.tifffile_reader import PlainImageReader, TiffFileReader

__all__ = [
    "BACKENDS",
    "MissingPixelSizeError",
    "OmeZarrReader",
    "OpenSlideReader",
    "PlainImageReader",
    "SlideError",
    "SlideReader",
    "TiffFileReader",
    "open_slide",
]

BACKENDS: dict[str, type[SlideReader]] = {
    "openslide": OpenSlideReader,
    "tifffile": TiffFileReader,
    "pil": PlainImageReader,
    "omezarr": OmeZarrReader,
}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".tf2"}
FLAT_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def open_slide(
    path: str | os.PathLike,
    mpp: MppLike | None = None,
    backend: str | None = None,
    *,
    require_mpp: bool = True,
    overview: bool | str = True,
    progress: Progress | None = None,
) -> SlideReader:
    """Open a slide lazily with the backend its file type calls for.

    `mpp` (µm per level-0 pixel, a number or an (x, y) pair) overrides the file's pixel
    size with a warning when they differ; a file without one needs it, else
    `MissingPixelSizeError` (``require_mpp=False`` opens it anyway with ``mpp=None``, for
    viewing). Every failure to open is a `SlideError` naming the file. A big image without
    a pyramid gets cached coarse levels (`overview_cache`; built on its first open, with
    `progress(done, total)`) unless ``overview=False``. ``overview="background"`` (a viewer)
    returns at once and builds it in a thread (`reader.overview_build`), the coarse levels
    filling in meanwhile; `progress` is then called from that thread."""
    if overview not in (True, False, "background"):
        raise ValueError(f"overview must be True, False or 'background', got {overview!r}")
    reader = _open(path, mpp, backend, require_mpp)
    if overview:
        reopen = (lambda: _open(path, mpp, reader.backend, False)) if overview == "background" else None
        try:
            add_overview(reader, progress, background=reopen)
        except BaseException:
            reader.close()
            raise
    return reader


def _open(path: str | os.PathLike, mpp: MppLike | None, backend: str | None, require_mpp: bool) -> SlideReader:
    path = Path(path).expanduser()
    if not path.exists():
        raise SlideError(path, "does not exist")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
        target = _dicom_file(path) if backend == "openslide" and path.is_dir() else path
        return BACKENDS[backend](target, mpp, require_mpp=require_mpp)
    if path.is_dir():
        if is_ome_zarr_folder(path):
            return OmeZarrReader(path, mpp, require_mpp=require_mpp)
        return OpenSlideReader(_dicom_file(path), mpp, require_mpp=require_mpp)
    if path.stat().st_size == 0:
        raise SlideError(path, "is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in FLAT_IMAGE_SUFFIXES:
        return PlainImageReader(path, mpp, require_mpp=require_mpp)
    vendor = openslide.OpenSlide.detect_format(str(path))
    if suffix in TIFF_SUFFIXES:
        if vendor is None or _is_ome_tiff(path):
            return TiffFileReader(path, mpp, require_mpp=require_mpp)
        return _openslide_then_tifffile(path, mpp, require_mpp)
    if vendor is None:
        raise SlideError(
            path,
            f"is not a slide format OpenSlide recognises (extension {suffix or 'none'}); supported: svs, ndpi, "
            "mrxs, scn, bif, DICOM, tiled TIFF, OME-TIFF, OME-Zarr, PNG, JPEG",
        )
    return OpenSlideReader(path, mpp, require_mpp=require_mpp)


def _dicom_file(folder: Path) -> Path:
    """One file of a DICOM WSI folder; OpenSlide finds the other levels beside it."""
    dicom_files = sorted(folder.glob("*.dcm"))
    if not dicom_files:
        raise SlideError(
            folder, "is a folder but neither an OME-Zarr (no .zattrs or zarr.json) nor a DICOM slide (no .dcm files)"
        )
    return dicom_files[0]


def _is_ome_tiff(path: Path) -> bool:
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.is_ome
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def _openslide_then_tifffile(path: Path, mpp: MppLike | None, require_mpp: bool) -> SlideReader:
    """A TIFF OpenSlide recognises but may not open (compression, layout): tifffile is
    the second chance; if both fail, the error says why for each."""
    try:
        return OpenSlideReader(path, mpp, require_mpp=require_mpp)
    except MissingPixelSizeError:
        raise
    except SlideError as openslide_error:
        try:
            return TiffFileReader(path, mpp, require_mpp=require_mpp)
        except MissingPixelSizeError:
            raise
        except SlideError as tifffile_error:
            raise SlideError(
                path, f"cannot be opened: {openslide_error.problem}; {tifffile_error.problem}"
            ) from tifffile_error
