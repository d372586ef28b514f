"""Regions drawn elsewhere (QuPath's GeoJSON export) as the places a run covers.

QuPath exports annotations as GeoJSON in level-0 pixel coordinates: a FeatureCollection (or a
single Feature, or a list of Features) whose geometries are Polygons or MultiPolygons, each
polygon an exterior ring followed by hole rings. `read_regions` reads that, checks it against
the slide, and `Regions` answers what the engine asks: the bounding box to stain, whether an
output block touches a region, and which of its pixels lie inside (the rest stays background).
Pixels are inside by their centres, holes excluded, the even-odd rule of scikit-image's
`polygon2mask`. Any problem is one `RegionsError` naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RegionsError(ValueError):
    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


@dataclass
class Polygon:
    exterior: np.ndarray  # (N, 2) level-0 (x, y)
    holes: list[np.ndarray] = field(default_factory=list)


@dataclass
class Regions:
    polygons: list[Polygon]
    source: str = ""  # the file they came from, for provenance

    def bbox(self) -> tuple[int, int, int, int]:
        """Level-0 (x, y, w, h) covering every region, in whole pixels."""
        points = np.concatenate([p.exterior for p in self.polygons])
        x0, y0 = np.floor(points.min(0)).astype(int)
        x1, y1 = np.ceil(points.max(0)).astype(int)
        return int(x0), int(y0), int(max(x1 - x0, 1)), int(max(y1 - y0, 1))

    def mask(self, roi: tuple[int, int, int, int], scale: tuple[float, float], oy: int, ox: int, oh: int,
             ow: int) -> np.ndarray:
        """(oh, ow) bool: output pixels (of a run over `roi` at `scale` = (x, y) level-0 px per
        output px) whose centres lie inside a region and outside its holes."""
        from skimage.draw import polygon2mask

        def to_output(ring: np.ndarray) -> np.ndarray:  # level-0 (x, y) -> block (row, col), pixel centres at .0
            rows = (ring[:, 1] - roi[1]) / scale[1] - 0.5 - oy
            cols = (ring[:, 0] - roi[0]) / scale[0] - 0.5 - ox
            return np.stack([rows, cols], axis=1)

        inside = np.zeros((oh, ow), bool)
        for polygon in self.polygons:
            shape = polygon2mask((oh, ow), to_output(polygon.exterior))
            for hole in polygon.holes:
                shape &= ~polygon2mask((oh, ow), to_output(hole))
            inside |= shape
        return inside

    def touches(self, roi, scale, oy: int, ox: int, oh: int, ow: int) -> bool:
        """Whether an output box overlaps any region's bounding box (a cheap, safe superset)."""
        x0, y0 = roi[0] + ox * scale[0], roi[1] + oy * scale[1]
        x1, y1 = x0 + ow * scale[0], y0 + oh * scale[1]
        for polygon in self.polygons:
            (px0, py0), (px1, py1) = polygon.exterior.min(0), polygon.exterior.max(0)
            if px0 < x1 and px1 > x0 and py0 < y1 and py1 > y0:
                return True
        return False

    def as_geojson(self) -> dict:
        """A FeatureCollection of the regions (level-0 px), for provenance and export."""
        def ring(points: np.ndarray) -> list[list[float]]:
            closed = np.concatenate([points, points[:1]]) if not np.array_equal(points[0], points[-1]) else points
            return closed.round(3).tolist()

        features = [{"type": "Feature", "properties": {"objectType": "annotation"},
                     "geometry": {"type": "Polygon", "coordinates": [ring(p.exterior), *(ring(h) for h in p.holes)]}}
                    for p in self.polygons]
        return {"type": "FeatureCollection", "features": features}


def read_regions(path: str | Path, slide_size: tuple[int, int] | None = None) -> Regions:
    """Polygons of a GeoJSON file in level-0 px; `slide_size` (W, H) refuses regions off the slide."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise RegionsError(path, f"cannot be read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegionsError(path, f"not JSON ({exc})") from exc
    polygons = regions_from_geojson(document, path)
    if slide_size is not None:
        width, height = slide_size
        for n, polygon in enumerate(polygons):
            (x0, y0), (x1, y1) = polygon.exterior.min(0), polygon.exterior.max(0)
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise RegionsError(path, f"region {n + 1} ({x0:.0f}..{x1:.0f} x {y0:.0f}..{y1:.0f} px) lies outside "
                                         f"the slide ({width} x {height} px at level 0)")
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise RegionsError(path, f"region {n + 1} reaches outside the slide ({x0:.0f}..{x1:.0f} x "
                                         f"{y0:.0f}..{y1:.0f} px; the slide is {width} x {height} px at level 0)")
    return Regions(polygons, source=str(path))


def regions_from_geojson(document, path: str | Path = "<geojson>") -> list[Polygon]:
    """Every Polygon / MultiPolygon of a FeatureCollection, Feature, geometry or list of Features."""
    if isinstance(document, list):
        features = document
    elif isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features") or []
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    elif isinstance(document, dict) and document.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": document}]
    else:
        raise RegionsError(path, "not GeoJSON regions: expected a FeatureCollection, a Feature or a Polygon")
    polygons: list[Polygon] = []
    for k, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            continue
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        try:
            if kind == "Polygon":
                polygons.append(_polygon(coordinates))
            elif kind == "MultiPolygon":
                polygons.extend(_polygon(rings) for rings in coordinates)
        except (TypeError, ValueError, IndexError) as exc:
            raise RegionsError(path, f"feature {k + 1}: malformed {kind} coordinates ({exc})") from exc
    if not polygons:
        raise RegionsError(path, "no Polygon or MultiPolygon regions in it (points and lines are not regions)")
    return polygons


def _polygon(rings) -> Polygon:
    arrays = []
    for ring in rings:
        points = np.asarray(ring, dtype=float)
        if points.ndim != 2 or points.shape[1] < 2 or len(points) < 3:
            raise ValueError("a ring needs at least three (x, y) points")
        points = points[:, :2]
        if not all(math.isfinite(v) for v in points.ravel()):
            raise ValueError("coordinates must be finite numbers")
        arrays.append(points)
    if not arrays:
        raise ValueError("a polygon needs an exterior ring")
    return Polygon(arrays[0], arrays[1:])
