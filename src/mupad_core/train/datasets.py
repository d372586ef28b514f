"""Training data sets: image pairs listed in a manifest, and patches drawn from slides
(`items.py` what they share, `manifest.py`, `slide_patches.py`; this module names them).

Items are plain dicts so they work with a standard `torch.utils.data.DataLoader` (use
`collate_items` as its `collate_fn`: it copes with rows that have no target):

- images: float tensors (C, H, W) in [0, 1], the range every latent codec in
  `mupad_core.models.vae` encodes from (they map to [-1, 1] themselves);
- ``"target"`` is None where a row has none (unpaired or text-only rows; the source is
  then the image itself), with ``"has_target"`` saying which;
- strings: ``"caption"`` and ``"rna_id"`` ("" where absent; an RNA id is a sample/spot
  id into an expression table, kept as text), ``"split"``.

Randomness (crops, augmentation, patch positions) comes from a generator seeded by
(seed, epoch, index), never from global state or the worker, so an item is the same on
every run, in every DataLoader worker, and after a resume (`set_epoch` changes the
stream per epoch).

`ManifestDataset`: a CSV or Parquet manifest with columns ``source`` (required),
``target``, ``caption``, ``rna_id`` and ``split`` (train/val/test); image paths are
relative to the manifest's folder. Every problem is a `DatasetError` naming the
manifest and the row.

`SlidePatchDataset`: patches of a fixed size at a chosen µm/px, drawn on the fly inside
the tissue mask of whole slides (read from the best pyramid level and resampled). Paired
mode reads a registered second slide at the same place (optionally through an offset or
affine map); unpaired mode draws the target from its own slide list independently.
"""

from .items import (
    DatasetError,
    Transform,
    collate_items,
    cycle,
    item_generator,
    item_seed,
    read_image,
    to_unit_float,
)
from .manifest import MANIFEST_COLUMNS, SPLITS, ManifestDataset
from .slide_patches import SlidePatchDataset, read_patch

__all__ = [
    "MANIFEST_COLUMNS",
    "SPLITS",
    "DatasetError",
    "ManifestDataset",
    "SlidePatchDataset",
    "Transform",
    "collate_items",
    "cycle",
    "item_generator",
    "item_seed",
    "read_image",
    "read_patch",
    "to_unit_float",
]
