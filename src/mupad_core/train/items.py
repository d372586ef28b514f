"""What every training data set shares: items as plain dicts seeded by (seed, epoch, index),
images read into float tensors in [0, 1], the collate function and the helpers for crops.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..slide.readers.base import to_yxc


TIFF_SUFFIXES = {".tif", ".tiff", ".btf"}


Transform = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]


class DatasetError(ValueError):
    """A data set that cannot be built or an item that cannot be read; the message names
    the manifest (or slide) and the row."""


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from (seed, epoch, index) with NumPy's SeedSequence."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The torch generator for one item's random choices."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels scaled by their type's full range, floats clipped; float32 [0, 1]."""
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)
    if pixels.dtype == bool:
        return pixels.astype(np.float32)
    return np.clip(pixels.astype(np.float32), 0, 1)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] to RGB: grey repeated, alpha composited on white."""
    channels = pixels.shape[2]
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 2:  # grey + alpha
        grey, alpha = pixels[..., :1], pixels[..., 1:2]
        return np.repeat(grey * alpha + (1 - alpha), 3, axis=2)
    if channels == 3:
        return pixels
    if channels == 4:
        alpha = pixels[..., 3:4]
        return pixels[..., :3] * alpha + (1 - alpha)
    raise ValueError(f"{channels} channels cannot be shown as RGB; use channels='native'")


def read_image(path: str | os.PathLike, channels: str = "rgb") -> np.ndarray:
    """An image file as (H, W, C) float32 in [0, 1].

    PNG/JPEG (and anything PIL reads) through PIL, TIFF through tifffile (any channel
    count and bit depth). ``channels="rgb"`` gives 3 channels (grey repeated, alpha
    composited on white); ``"native"`` keeps the file's channels."""
    if channels not in ("rgb", "native"):
        raise ValueError(f"channels must be 'rgb' or 'native', got {channels!r}")
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pixels = to_yxc(series.asarray(), series.axes, path)
            # A 4th channel is alpha only where the file says so; else it is a 4th marker.
            alpha = any(int(e) in (1, 2) for e in getattr(tif.pages[0], "extrasamples", ()) or ())
        if channels == "rgb" and pixels.shape[2] == 4 and not alpha:
            raise ValueError(f"{pixels.shape[2]} channels (no alpha) cannot be shown as RGB; use channels='native'")
    else:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "CMYK":
                image = image.convert("RGB")
            pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
    pixels = to_unit_float(np.asarray(pixels))
    return to_rgb(pixels) if channels == "rgb" else pixels


def collate_items(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch a list of items: tensors stacked (a None among tensors becomes zeros, so
    check the matching ``has_*`` flag), numbers and bools to tensors, strings to lists;
    a key that is None in every item stays None."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item.get(key) for item in items]
        present = [v for v in values if v is not None]
        if not present:
            batch[key] = None
        elif isinstance(present[0], torch.Tensor):
            template = present[0]
            shapes = {tuple(v.shape) for v in present}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack '{key}': items have shapes {sorted(shapes)}; crop to one size")
            batch[key] = torch.stack([torch.zeros_like(template) if v is None else v for v in values])
        elif all(isinstance(v, bool) for v in present) and len(present) == len(values):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present) and len(present) == len(
            values
        ):
            batch[key] = torch.tensor(values)
        elif all(isinstance(v, tuple) and all(isinstance(e, (int, float)) for e in v) for v in present) and len(
            present
        ) == len(values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def cycle(loader: Any, start_epoch: int = 0) -> Iterator[Any]:
    """Endless batches: re-iterates the loader, calling `set_epoch` on its data set (when
    it has one) before each pass, so epochs differ but are reproducible."""
    epoch = start_epoch
    dataset = getattr(loader, "dataset", None)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader gave no batches (empty data set, or drop_last with too few items)")
        epoch += 1


def crop_box(height: int, width: int, size: tuple[int, int], mode: str, generator: torch.Generator):
    ch, cw = size
    if mode == "center":
        return (height - ch) // 2, (width - cw) // 2
    top = int(torch.randint(0, height - ch + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - cw + 1, (1,), generator=generator))
    return top, left


def size_pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (int(size), int(size)) if np.isscalar(size) else tuple(int(v) for v in size)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or an (height, width) pair, got {size!r}")
    return pair  # type: ignore[return-value]


def fingerprint_of(transform: Any) -> str | None:
    if transform is None:
        return None
    if hasattr(transform, "fingerprint"):
        return str(transform.fingerprint())
    return f"{type(transform).__module__}.{type(transform).__qualname__}"
