"""World boxes, level-0 ROIs and layer placement: the arithmetic between napari and the core.

Conventions (napari's): an image layer's pixel i has its centre at data coordinate i and
covers [i - 0.5, i + 0.5); world = data * scale + translate. A level-0 ROI (x, y, w, h)
of a slide is the pixels whose centres fall inside a world box. Pure functions, no Qt, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EPS = 1e-3  # px: Shapes store float32 vertices, so a corner on a pixel centre comes back ~1e-5 px off


def layer_mpp_xy(layer) -> tuple[float, float]:
    """Level-0 (x, y) pixel size of a slide layer in µm: metadata['mpp'] (number or (x, y)), else its scale."""
    mpp = layer.metadata.get("mpp")
    if mpp is None:
        return float(layer.scale[-1]), float(layer.scale[-2])
    if np.isscalar(mpp):
        return float(mpp), float(mpp)
    x, y = (float(v) for v in list(mpp)[:2])
    return x, y


def layer_mpp(layer) -> float:
    """The finer of a slide layer's level-0 pixel sizes (the engine's default output pixel size)."""
    return min(layer_mpp_xy(layer))


def level0_shape(layer) -> tuple[int, int]:
    """(height, width) of the layer's full-resolution data (rgb channel dropped)."""
    data = layer.data[0] if layer.multiscale else layer.data
    shape = data.shape[:-1] if layer.rgb else data.shape
    return int(shape[-2]), int(shape[-1])


def camera(viewer):
    """The viewer's camera (napari >= 0.9: viewer.scene.camera; before: viewer.camera)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def visible_world_box(viewer) -> tuple[np.ndarray, np.ndarray]:
    """(top-left, bottom-right) world (y, x) of what the 2-D canvas shows now."""
    cam = camera(viewer)
    center = np.asarray(cam.center, dtype=float)[-2:]
    size = np.asarray(viewer.canvas.size, dtype=float)  # (height, width) in screen px
    half = size / 2.0 / float(cam.zoom)
    return center - half, center + half


def world_box_to_roi(layer, top_left_world: Sequence[float], bottom_right_world: Sequence[float],
                     clip: bool = True) -> tuple[int, int, int, int] | None:
    """Level-0 ROI (x, y, w, h) of `layer` whose pixel centres lie in the world box; None if empty."""
    corners_world = np.array([top_left_world, bottom_right_world], dtype=float)
    ndim = layer.ndim
    full = np.zeros((2, ndim))
    full[:, -2:] = corners_world[:, -2:]
    data = np.array([layer.world_to_data(p) for p in full])[:, -2:]
    lo, hi = data.min(axis=0), data.max(axis=0)
    y0, x0 = (math.ceil(v - EPS) for v in lo)
    y1, x1 = (math.ceil(v - EPS) for v in hi)
    if clip:
        height, width = level0_shape(layer)
        y0, x0 = max(y0, 0), max(x0, 0)
        y1, x1 = min(y1, height), min(x1, width)
    if y1 <= y0 or x1 <= x0:
        return None
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def shape_world_boxes(shapes_layer, rectangles_only: bool = True,
                      kinds: tuple[str, ...] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """World (top-left, bottom-right) (y, x) boxes of a Shapes layer's rectangles (or of the
    shapes of `kinds`, or of all shapes)."""
    boxes = []
    for verts, kind in zip(shapes_layer.data, shapes_layer.shape_type):
        if (kinds is not None and kind not in kinds) or (kinds is None and rectangles_only and kind != "rectangle"):
            continue
        world = np.array([shapes_layer.data_to_world(v) for v in np.asarray(verts, dtype=float)])[:, -2:]
        boxes.append((world.min(axis=0), world.max(axis=0)))
    return boxes


def shape_outlines_level0(shapes_layer, source_layer) -> list[tuple[str, np.ndarray]]:
    """(kind, (N, 2) level-0 (x, y) outline) of each rectangle and polygon of a Shapes layer, in
    the source's pixel-edge coordinates (GeoJSON's: pixel k spans [k, k + 1))."""
    outlines = []
    for verts, kind in zip(shapes_layer.data, shapes_layer.shape_type):
        if kind not in ("rectangle", "polygon"):
            continue
        world = [shapes_layer.data_to_world(v) for v in np.asarray(verts, dtype=float)]
        data = np.array([source_layer.world_to_data(np.pad(np.asarray(w)[-2:], (source_layer.ndim - 2, 0)))
                         for w in world])[:, -2:]
        outlines.append((kind, data[:, ::-1] + 0.5))  # (row, col) centres -> (x, y) edges
    return outlines


def level0_to_world(source_layer, points_xy: np.ndarray) -> np.ndarray:
    """(N, 2) level-0 (x, y) pixel-edge coordinates -> (N, 2) world (y, x) on the source layer."""
    data = np.asarray(points_xy, dtype=float)[:, ::-1] - 0.5
    return np.array([np.asarray(source_layer.data_to_world(np.pad(d, (source_layer.ndim - 2, 0))))[-2:] for d in data])


def overlay_placement(source_layer, roi: tuple[int, int, int, int], src_mpp_xy: tuple[float, float],
                      out_mpp: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) in world (y, x) of an output image of ROI `roi` at `out_mpp` µm/px.

    Along each axis an output pixel spans s = out_mpp / source mpp source pixels, so output
    pixel 0 averages source pixels [x0, x0 + s) and its centre sits at source pixel
    x0 + (s - 1) / 2 (the engine's resampling convention, PIL's). The source layer's own world
    transform (scale, translate) is applied, so the overlay sits on the source wherever it is.
    """
    x0, y0 = roi[0], roi[1]
    s = np.array([out_mpp / src_mpp_xy[1], out_mpp / src_mpp_xy[0]])  # (y, x)
    src_scale = np.asarray(source_layer.scale, dtype=float)[-2:]
    src_translate = np.asarray(source_layer.translate, dtype=float)[-2:]
    origin = np.array([y0, x0]) + (s - 1) / 2
    translate = src_translate + origin * src_scale
    scale = src_scale * s
    return (float(scale[0]), float(scale[1])), (float(translate[0]), float(translate[1]))


def layer_units(layer) -> dict:
    """{'units': ...} of a layer's last two axes, for new layers placed on it (napari warns on mixed units)."""
    units = getattr(layer, "units", None)
    if units is None:
        return {}
    return {"units": tuple(str(u) for u in units)[-2:]}


def fit_box(top_left: Sequence[float], bottom_right: Sequence[float], pixel: float
            ) -> tuple[tuple[int, int], tuple[float, float], tuple[float, float]]:
    """Pixels that exactly fill a world box at about `pixel` world units each.

    Returns (height, width), scale and translate (pixel centres) such that the image's pixel
    edges are the box's edges: extent = box shrunk by half a pixel on each side.
    """
    tl, br = np.asarray(top_left, float)[-2:], np.asarray(bottom_right, float)[-2:]
    size = br - tl
    if (size <= 0).any():
        raise ValueError(f"empty box {tuple(tl)} - {tuple(br)}")
    n = np.maximum(1, np.round(size / pixel)).astype(int)
    scale = size / n
    translate = tl + scale / 2
    return (int(n[0]), int(n[1])), (float(scale[0]), float(scale[1])), (float(translate[0]), float(translate[1]))
