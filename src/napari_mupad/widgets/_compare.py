"""Source and virtual stain side by side, the first thing a pathologist does with a new stain.

napari's grid puts each visible layer in its own box under one camera, so panning or zooming
one box moves them all: H&E | IHC, or H&E | DAPI | Lap2β | Ki67 for an mIF result. Every
layer's visibility and opacity are kept and given back when the comparison ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import napari.viewer
from napari.layers import Layer


class SideBySide:
    """Turns the comparison on and off for one viewer."""

    def __init__(self, viewer: napari.viewer.Viewer):
        self.viewer = viewer
        self._saved: dict[int, tuple[Layer, bool, float]] | None = None
        self._grid: tuple[bool, int, tuple[int, int]] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def show(self, source: Layer, stains: Sequence[Layer]) -> None:
        """Only `source` and `stains`, each in its own box, opaque, one camera for all."""
        stains = [layer for layer in stains if layer is not source]
        if not stains:
            raise ValueError("no stain layer to compare with the source: run a stain, or select its layers")
        if self.active:
            self.end()
        grid = self.viewer.canvas.grid
        self._saved = {id(layer): (layer, layer.visible, layer.opacity) for layer in self.viewer.layers}
        self._grid = (grid.enabled, grid.stride, grid.shape)
        shown = [source, *stains]
        for layer in self.viewer.layers:
            layer.visible = any(layer is s for s in shown)
        for layer in shown:
            layer.opacity = 1.0
        grid.stride = 1
        grid.shape = (1, len(shown)) if len(shown) <= 4 else (-1, -1)
        grid.enabled = True
        self.viewer.reset_view()

    def end(self) -> None:
        """The layers and the grid as they were (layers removed meanwhile are skipped)."""
        if self._saved is None:
            return
        grid = self.viewer.canvas.grid
        enabled, stride, shape = self._grid
        grid.enabled, grid.stride, grid.shape = enabled, stride, shape
        present = {id(layer) for layer in self.viewer.layers}
        for key, (layer, visible, opacity) in self._saved.items():
            if key in present:
                layer.visible, layer.opacity = visible, opacity
        self._saved = self._grid = None
