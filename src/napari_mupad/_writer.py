"""npe2 writers: image layers to OME-Zarr through `mupad_core.store.PyramidWriter`, and to
pyramidal OME-TIFF (for QuPath) through that store and `mupad_core.store.ometiff`.

One RGB or single-channel layer becomes one image; several single-channel layers (an mIF
panel) become one multichannel image with their names, colours and contrast windows.
Level 0 of a multiscale layer is streamed in chunk-aligned regions, so a whole slide is
never held in memory, and PyramidWriter writes under ``NAME.partial`` and renames it when
complete. The pixel size comes from the layer's scale when its units are a length, else
from the metadata our reader stored; provenance comes from that metadata too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import dask
import numpy as np

from mupad_core.slide.readers.base import composite_alpha
from mupad_core.slide.readers.omezarr_reader import NGFF_LENGTH_UNITS_UM
from mupad_core.store import PyramidWriter

FullLayerData = tuple[Any, dict[str, Any], str]
# Level-0 pixels per side read and written at once: whole writer chunks, a few MB per read.
EXPORT_REGION_PX = 2048


def write_image_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """One image layer (RGB, or one channel) to an OME-Zarr at `path`."""
    level0 = layer_level0(data, meta)
    if meta.get("rgb"):
        if level0.shape[2] not in (3, 4):
            raise ValueError(f"{path}: layer {meta.get('name')!r} is RGB with {level0.shape[2]} samples, not 3 or 4")
        writer = PyramidWriter(
            path,
            shape_yx=level0.shape[:2],
            channels=3,
            dtype=level0.dtype,
            mpp=layer_mpp(meta),
            kind="rgb",
            provenance=layer_provenance([meta]),
            overwrite=True,
            generated=is_generated([meta]),
            origin=layer_origin(meta),
        )
        stream_regions(writer, lambda rows, cols: rgb_region(level0, rows, cols))
        return [str(writer.finalize())]
    return write_channel_layers(path, [(data, meta, "image")])


def write_channel_layers(path: str, layer_data: Sequence[FullLayerData]) -> list[str]:
    """Single-channel image layers of one size to one multichannel OME-Zarr at `path`.

    The channels' regions are computed together, so channels sliced from one RGB level
    (fluorescence NDPI) decode each tile once."""
    channels = [layer_level0(data, meta) for data, meta, _ in layer_data]
    metas = [meta for _, meta, _ in layer_data]
    for level0, meta in zip(channels, metas):
        if meta.get("rgb"):
            raise ValueError(
                f"{path}: layer {meta.get('name')!r} is RGB; export it on its own, not as one channel of several"
            )
        if level0.shape != channels[0].shape:
            raise ValueError(
                f"{path}: layer {meta.get('name')!r} is {level0.shape}, not {channels[0].shape} like "
                f"{metas[0].get('name')!r}; channels of one image must have one size"
            )
    pixel_sizes = {layer_mpp(meta) for meta in metas}
    if len(pixel_sizes) > 1:
        raise ValueError(f"{path}: the layers have different pixel sizes {sorted(map(str, pixel_sizes))}")
    writer = PyramidWriter(
        path,
        shape_yx=channels[0].shape,
        channels=len(channels),
        dtype=np.result_type(*(level0.dtype for level0 in channels)),
        mpp=pixel_sizes.pop(),
        kind="fluorescence",
        channel_names=[channel_name(meta) for meta in metas],
        channel_colors=[colormap_hex(meta.get("colormap")) for meta in metas],
        channel_windows=[tuple(float(v) for v in meta["contrast_limits"]) for meta in metas]
        if all(meta.get("contrast_limits") is not None for meta in metas)
        else None,
        provenance=layer_provenance(metas),
        overwrite=True,
        generated=is_generated(metas),
        origin=layer_origin(metas[0]),
    )
    stream_regions(writer, lambda rows, cols: np.stack(dask.compute(*(level0[rows, cols] for level0 in channels))))
    return [str(writer.finalize())]


def write_image_layer_ome_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """One image layer to a pyramidal OME-TIFF at `path`."""
    return _as_ome_tiff(path, lambda stage: write_image_layer(stage, data, meta))


def write_channel_layers_ome_tiff(path: str, layer_data: Sequence[FullLayerData]) -> list[str]:
    """Single-channel layers of one size to one multichannel pyramidal OME-TIFF at `path`."""
    return _as_ome_tiff(path, lambda stage: write_channel_layers(stage, layer_data))


def _as_ome_tiff(path: str, write_store: Callable[[str], list[str]]) -> list[str]:
    """Stage the layers as an OME-Zarr beside `path` (streamed, pyramid built on disk), then
    convert it tile by tile: both steps keep memory flat, and the stage is removed after."""
    import shutil
    from pathlib import Path

    from mupad_core.slide.readers.omezarr_reader import OmeZarrReader
    from mupad_core.store.ometiff import export_ome_tiff

    stage = Path(path).with_name(Path(path).name + ".work.ome.zarr")
    try:
        write_store(str(stage))
        reader = OmeZarrReader(stage, require_mpp=False)
        export_ome_tiff(reader, path, overwrite=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return [str(path)]


def layer_level0(data: Any, meta: dict[str, Any]) -> Any:
    """The full-resolution array of a layer (still lazy), 2D or (H, W, samples) for RGB."""
    level0 = data[0] if meta.get("multiscale") else data
    expected = 3 if meta.get("rgb") else 2
    if level0.ndim != expected:
        raise ValueError(
            f"layer {meta.get('name')!r} has shape {tuple(level0.shape)}: only 2D images "
            f"({'H, W, RGB' if meta.get('rgb') else 'H, W'}) can be exported to OME-Zarr"
        )
    return level0


def stream_regions(writer: PyramidWriter, read: Callable[[slice, slice], np.ndarray]) -> None:
    """Fill the writer's level 0 region by region; `read` returns (C, h, w) pixels."""
    _, height, width = writer.shape
    step = writer.chunk * max(1, EXPORT_REGION_PX // writer.chunk)
    for top in range(0, height, step):
        for left in range(0, width, step):
            rows, cols = slice(top, min(top + step, height)), slice(left, min(left + step, width))
            writer.write_tile(top, left, read(rows, cols))


def rgb_region(level0: Any, rows: slice, cols: slice) -> np.ndarray:
    """(3, h, w) of an RGB(A) layer; alpha is composited onto white like the slide readers do."""
    pixels = np.asarray(level0[rows, cols])
    if pixels.shape[2] == 4:
        white = np.iinfo(pixels.dtype).max if pixels.dtype.kind in "iu" else 1.0
        pixels = composite_alpha(pixels, white, premultiplied=False)
    return np.moveaxis(pixels, -1, 0)


def layer_mpp(meta: dict[str, Any]) -> tuple[float, float] | None:
    """(x, y) µm/px: the layer's y/x scale in its length units, else the mpp our reader
    recorded, else None (the store is then written in unitless pixels)."""
    scale = meta.get("scale")
    units = [str(unit) for unit in (meta.get("units") or ())]
    if scale is not None and len(units) >= 2 and all(unit in NGFF_LENGTH_UNITS_UM for unit in units[-2:]):
        y_um, x_um = (float(s) * NGFF_LENGTH_UNITS_UM[u] for s, u in zip(list(scale)[-2:], units[-2:]))
        return (x_um, y_um)
    recorded = (meta.get("metadata") or {}).get("mpp")
    return (float(recorded[0]), float(recorded[1])) if recorded else None


def layer_origin(meta: dict[str, Any]) -> tuple[float, float] | None:
    """(y, x) of the layer's pixel (0, 0) centre in the store's units (µm when the pixel size
    is known): its translate counted in its own pixels, times the pixel size. A generated ROI
    or a cropped region thus reopens where it lay."""
    translate = meta.get("translate")
    if translate is None:
        return None
    scale = meta.get("scale")
    scale_yx = [1.0, 1.0] if scale is None else [float(v) for v in list(scale)[-2:]]
    pixels = [float(t) / s for t, s in zip(list(translate)[-2:], scale_yx)]
    mpp = layer_mpp(meta)
    return (pixels[0] * mpp[1], pixels[1] * mpp[0]) if mpp else (pixels[0], pixels[1])


def layer_provenance(metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The provenance the first layer carries (our outputs' `mupad` attributes), plus the
    file it came from and the exported layer names; JSON-safe, as store attributes must be."""
    provenance = dict(next((found for meta in metas if (found := recorded_provenance(meta))), {}))
    metadatas = [meta.get("metadata") or {} for meta in metas]
    source = next((m["path"] for m in metadatas if m.get("path")), None)
    if source:
        provenance.setdefault("source", source)
    provenance["exported_layers"] = [str(meta.get("name", "")) for meta in metas]
    return json.loads(json.dumps(provenance, default=str))


def recorded_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """What a layer says about its making: our reader's `provenance` (from the store), else the
    `mupad` record the widgets attach to layers they create in memory (ROI generation)."""
    metadata = meta.get("metadata") or {}
    return dict(metadata.get("provenance") or metadata.get("mupad") or {})


def is_generated(metas: Sequence[dict[str, Any]]) -> bool:
    """Whether any exported layer holds generated pixels (our outputs say so in their
    provenance); a scanned slide's region is exported without the generated-image notice."""
    for meta in metas:
        provenance = recorded_provenance(meta)
        if provenance.get("generated") or provenance.get("model_id"):
            return True
    return False


def channel_name(meta: dict[str, Any]) -> str:
    """The marker name our reader recorded, else the layer's name."""
    return str((meta.get("metadata") or {}).get("channel") or meta.get("name") or "channel")


def colormap_hex(colormap: Any) -> str:
    """RRGGBB of the brightest colour of a napari colormap argument (name, dict or Colormap)."""
    from napari.utils.colormaps import ensure_colormap

    if colormap is None:
        return "FFFFFF"
    brightest = np.clip(np.asarray(ensure_colormap(colormap).colors[-1][:3], dtype=float), 0.0, 1.0)
    return "".join(f"{round(value * 255):02X}" for value in brightest)

