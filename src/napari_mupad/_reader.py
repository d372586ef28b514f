"""npe2 reader: whole-slide files and OME-Zarr images as lazy napari layers.

`get_reader` claims paths by name (and zarr folders by their NGFF metadata) without
opening them, and returns None for anything else so napari can try other readers. The
claimed file is opened by `mupad_core.slide.open_slide`; a file that turns out to be
corrupt raises a `SlideError` whose one-line message names the file and the problem,
which napari shows as a notification. Nothing is decoded at open but one pixel of the
coarsest level, so a file whose tiles cannot be read fails here rather than mid-draw.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mupad_core.slide.readers import MissingPixelSizeError, SlideError, SlideReader, open_slide
from napari_mupad._layers import LayerDataTuple, slide_layer_data

# Files open_slide reads (OpenSlide's formats, TIFF/OME-TIFF, DICOM, flat images).
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".tif",
    ".tiff",
    ".btf",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
)
ZARR_METADATA_FILES = (".zattrs", "zarr.json")

ReaderFunction = Callable[[Any], list[LayerDataTuple]]


def get_reader(path: str | os.PathLike | list) -> ReaderFunction | None:
    """`read_slide` for a slide file, our OME-Zarr or any NGFF image folder; None otherwise."""
    if isinstance(path, list):
        if len(path) != 1:
            return None  # stacks of slides are not a thing
        path = path[0]
    if not isinstance(path, str | os.PathLike):
        return None
    path = Path(path)
    if path.is_dir():
        claimed = path.name.lower().endswith(".ome.zarr") or is_ngff_image(path) or any(path.glob("*.dcm"))
        return read_slide if claimed else None
    return read_slide if path.name.lower().endswith(SLIDE_SUFFIXES) else None


def is_ngff_image(folder: Path) -> bool:
    """Whether a zarr group's attributes hold NGFF multiscales (read as JSON, no zarr needed)."""
    for name in ZARR_METADATA_FILES:
        try:
            document = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        attributes = document.get("attributes", document) if name == "zarr.json" else document
        ngff = attributes.get("ome", attributes) if isinstance(attributes, dict) else {}
        if isinstance(ngff, dict) and ngff.get("multiscales"):
            return True
    return False


def read_slide(path: str | os.PathLike | list) -> list[LayerDataTuple]:
    """Layer data tuples for the slide(s) at `path`."""
    paths = path if isinstance(path, list) else [path]
    layers: list[LayerDataTuple] = []
    for one_path in paths:
        reader = open_for_viewing(Path(one_path))
        tuples = slide_layer_data(reader)
        close_with_layers(reader, tuples)
        if reader.overview_build is not None:
            for _data, meta, _kind in tuples:
                meta["metadata"]["mupad_overview_building"] = str(reader.overview_build.store)
            OverviewWatcher(reader).start()
        layers.extend(tuples)
    return layers


def close_with_layers(reader: SlideReader, tuples: list[LayerDataTuple]) -> None:
    """Close the reader (its file handles) once every layer made from it is gone: each layer's
    full-resolution array is watched, and the last one collected closes the file."""
    import dask.array as da

    held = {id(level) for level in reader.levels}  # the reader keeps these: never collected first
    anchors = []
    for data, _meta, _kind in tuples:
        first = data[0] if isinstance(data, list) else data
        if id(first) in held:  # the layer gets its own array object over the same graph
            first = da.Array(first.dask, first.name, first.chunks, meta=first._meta)
            data[0] = first
        anchors.append(first)
    remaining = [len(anchors)]

    def release() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            reader.close()

    for anchor in anchors:
        weakref.finalize(anchor, release)


def open_for_viewing(path: Path) -> SlideReader:
    """Open lazily; a file without a pixel size opens in pixels with a warning; any failure
    is a one-line `SlideError` naming the file."""
    try:
        # A big flat TIFF opens at once and its overview fills in (OverviewWatcher); a PNG,
        # which can only be decoded whole, is built now under a progress bar.
        with OverviewProgress(path) as progress:
            try:
                reader = open_slide(path, progress=progress, overview="background")
            except MissingPixelSizeError as error:
                reader = open_slide(path, require_mpp=False, progress=progress, overview="background")
                warn_no_pixel_size(path, error)
        try:
            reader.levels[-1][:1, :1].compute(scheduler="sync")
        except BaseException:
            reader.close()
            raise
        return reader
    except SlideError:
        raise
    except Exception as error:  # a decoder's or zarr's own complaint about a damaged file
        raise SlideError(path, f"cannot be opened: {type(error).__name__}: {error}") from error


class OverviewProgress:
    """napari's progress bar for the one-time overview of a big flat image (nothing shown for
    slides that have a pyramid: the callback is never called)."""

    def __init__(self, path: Path):
        self.path = path
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # a background build reports through OverviewWatcher, on the main thread
        if self.bar is None:
            from napari.utils import progress

            self.bar = progress(total=total, desc=f"{self.path.name}: overview levels (once; cached)")
        self.bar.n = done
        self.bar.refresh()

    def __enter__(self) -> OverviewProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()


class OverviewWatcher:
    """Follows a big flat image's overview while a thread builds it: a progress bar, and the
    slide's layers redrawn every `refresh_s` so the zoomed-out view fills in band by band, then
    pointed at the finished cache. The build runs on whether or not anyone watches; a failure
    is a notification naming the file (zoomed in, the image still reads from the file)."""

    refresh_s = 2.0

    def __init__(self, reader: SlideReader):
        self.reader = reader
        self.build = reader.overview_build
        self.store = str(self.build.store)
        self.generation = 0
        self.bar = None
        self.last_refresh = 0.0

    def start(self) -> None:
        from napari.qt.threading import create_worker

        self.worker = create_worker(self._ticks, _start_thread=False)
        self.worker.yielded.connect(self._on_tick)
        self.worker.returned.connect(self._on_done)
        self.worker.start()

    def _ticks(self):
        import time

        last = -1
        while not self.build.done():
            if self.build.done_blocks != last:
                last = self.build.done_blocks
                yield last
            time.sleep(0.2)

    def _on_tick(self, done: int) -> None:
        import time

        if self.bar is None:
            from napari.utils import progress

            self.bar = progress(total=self.build.total_blocks,
                                desc=f"{self.reader.path.name}: overview levels (once; cached)")
        self.bar.n = done
        self.bar.refresh()
        if time.monotonic() - self.last_refresh >= self.refresh_s:
            self.last_refresh = time.monotonic()
            self.generation = done  # names the levels: new ones for each redraw
            self._swap_levels()

    def _on_done(self, _result=None) -> None:
        if self.bar is not None:
            self.bar.close()
        error = self.build.future.exception()
        if error is not None:
            from napari.utils.notifications import show_error

            show_error(f"{self.reader.path}: its overview levels could not be built "
                       f"({type(error).__name__}: {error}); zoomed out it shows blank")
            return
        self._swap_levels()

    def _swap_levels(self) -> None:
        """The slide's layers get the reader's levels as they are now; level 0 stays the same
        object (it keeps the file open: close_with_layers)."""
        from mupad_core.slide.readers.overview_cache import refresh_levels

        finished = refresh_levels(self.reader, self.generation)
        fresh = {meta["name"]: data for data, meta, _kind in slide_layer_data(self.reader)}
        for layer in viewer_layers():
            if layer.metadata.get("mupad_overview_building") != self.store or layer.name not in fresh:
                continue
            layer.data = [layer.data[0], *fresh[layer.name][1:]]
            if finished:
                layer.metadata.pop("mupad_overview_building", None)


def viewer_layers() -> list:
    from napari import current_viewer

    viewer = current_viewer()
    return list(viewer.layers) if viewer is not None else []


def warn_no_pixel_size(path: Path, error: MissingPixelSizeError) -> None:
    """A napari warning notification: measurements on this layer are in pixels."""
    from napari.utils.notifications import show_warning

    reason = error.problem.split(";")[0]
    show_warning(f"{path}: {reason}; it is shown in pixels (scale 1), not micrometres")
