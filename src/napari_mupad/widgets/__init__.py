"""napari-mupad's dock widgets: virtual stain (`stain.StainWidget`) and ROI generation
(`roi_generate.RoiGenerateWidget`). Importing them pulls Qt and napari but not torch:
the models load inside the worker threads when a run starts."""
