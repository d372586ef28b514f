"""napari-mupad: the napari plugin for MUPAD (multimodal pathology diffusion).

This module is imported by napari at start-up (plugin discovery), so it stays
light: it must not import torch, diffusers or the mupad_core models. Widgets,
readers and writers import the heavy parts lazily, when they are used.
"""

__version__ = "0.1.0.dev1"

__all__ = ["__version__"]
