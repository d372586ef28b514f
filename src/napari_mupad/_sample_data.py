"""npe2 sample data: the bundled CMU-1-Small-Region.svs, a real CC0 H&E slide from the
OpenSlide test data, opened through the plugin's own reader (see mupad_core/data/README.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from napari_mupad._layers import LayerDataTuple


def bundled_slide_path() -> Path:
    """Where the installed package keeps CMU-1-Small-Region.svs."""
    path = Path(str(resources.files("mupad_core").joinpath("data", "CMU-1-Small-Region.svs")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundled sample slide is missing from the mupad_core install")
    return path


def cmu1_small_region() -> list[LayerDataTuple]:
    """CMU-1-Small-Region (Aperio H&E, 2220 x 2967 px at 0.499 µm/px) as one RGB layer."""
    from napari_mupad._reader import read_slide

    return read_slide(bundled_slide_path())
