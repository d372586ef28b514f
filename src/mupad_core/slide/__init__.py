"""Whole slides in: lazy multi-format readers, tissue masks and tile grids."""

from mupad_core.slide.readers import MissingPixelSizeError, SlideError, SlideReader, open_slide

__all__ = ["MissingPixelSizeError", "SlideError", "SlideReader", "open_slide"]
