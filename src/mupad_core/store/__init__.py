"""Where generated images go: streaming, resumable OME-Zarr pyramids with provenance."""

from mupad_core.store.omezarr import PyramidWriter, validate_omezarr

__all__ = ["PyramidWriter", "validate_omezarr"]
