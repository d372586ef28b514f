"""Where generated images go: streaming, resumable OME-Zarr pyramids with provenance."""

from mupad_core.store.omezarr import PyramidWriter, spread_path, validate_omezarr

__all__ = ["PyramidWriter", "spread_path", "validate_omezarr"]
