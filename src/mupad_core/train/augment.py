"""Training augmentations for (paired) pathology images.

- `HEDJitter`: H&E stain jitter in haematoxylin-eosin-DAB optical-density space
  (Ruifrok & Johnston colour deconvolution, scikit-image's `rgb2hed` / `hed2rgb`
  matrices and scaling): each stain channel is scaled by a factor from
  ``[1 - scale, 1 + scale]`` and shifted by an amount from ``[-shift, shift]``.
- `random_dihedral` / `apply_dihedral`: the eight flips and 90° rotations.
- `PairAugment`: one random dihedral transform applied identically to every image of an
  item (source and target stay registered), stain jitter only on the keys named in
  `stain_keys` (by default the source alone: the target of a paired item is what the
  model must reproduce, so its colour is left alone unless asked).

Images are float tensors in [0, 1], shaped (C, H, W) or (B, C, H, W), RGB for the stain
jitter. Every random draw comes from the `torch.Generator` passed in, so the same
generator state gives the same augmentation.

Why not call `rgb2hed`/`hed2rgb` directly: `rgb2hed` clamps negative stain amounts to 0,
so `hed2rgb(rgb2hed(x))` is not `x` (up to 0.12 off on a real H&E tile) and a jitter of
scale 1, shift 0 would already change the image. The same matrices
(`skimage.color.hed_from_rgb` / `rgb_from_hed`) and the same log scaling are used here
without the clamp, so the identity jitter is the identity, and where the stain amounts
are non-negative the stain channels equal `rgb2hed`'s exactly (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..slide.stains import hed_to_rgb, rgb_to_hed, source_view  # noqa: F401  (re-exported: the jitter works in HED space)


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = (float(value),) * 3 if np.isscalar(value) else tuple(float(v) for v in value)
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a non-negative number or three of them (H, E, DAB), got {value!r}")
    return values  # type: ignore[return-value]


def _check_rgb(image: torch.Tensor) -> None:
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"stain jitter needs RGB images shaped (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")


@dataclass(frozen=True)
class HEDJitter:
    """Random per-stain scale and shift in HED space.

    `scale`, `shift`: half-widths of the uniform ranges, one number for all three
    channels or one per channel (H, E, DAB). The shift is in `rgb2hed`'s units, where
    haematoxylin in a real H&E tile reaches about 0.25 and averages about 0.02, so
    shifts of 0.005-0.02 are already visible; the shift also tints the background."""

    scale: float | tuple[float, float, float] = 0.05
    shift: float | tuple[float, float, float] = 0.01

    def __post_init__(self):
        object.__setattr__(self, "scale", _triple(self.scale, "scale"))
        object.__setattr__(self, "shift", _triple(self.shift, "shift"))

    def sample(self, generator: torch.Generator | None = None, batch: int | None = None):
        """(alpha, beta): factors and offsets, (3,) or (batch, 3)."""
        shape = (3,) if batch is None else (batch, 3)
        scale = torch.tensor(self.scale)
        shift = torch.tensor(self.shift)
        alpha = 1 + (torch.rand(shape, generator=generator) * 2 - 1) * scale
        beta = (torch.rand(shape, generator=generator) * 2 - 1) * shift
        return alpha, beta

    def apply(self, image: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Jitter with given factors: (3,) for one image or (B, 3) for a batch."""
        stains = rgb_to_hed(image)
        alpha = alpha.to(stains.device, stains.dtype)[..., :, None, None]
        beta = beta.to(stains.device, stains.dtype)[..., :, None, None]
        return hed_to_rgb(stains * alpha + beta).to(image.dtype)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw per image (a batch gets independent draws)."""
        _check_rgb(image)
        alpha, beta = self.sample(generator, None if image.dim() == 3 else image.shape[0])
        return self.apply(image, alpha, beta)


def hed_jitter(
    image: torch.Tensor,
    scale: float | Sequence[float] = 0.05,
    shift: float | Sequence[float] = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Functional form of `HEDJitter`."""
    return HEDJitter(scale, shift)(image, generator)  # type: ignore[arg-type]


def random_dihedral(generator: torch.Generator | None = None, *, flips: bool = True, rot90: bool = True) -> int:
    """A dihedral transform index 0..7 (bit 2: horizontal flip, bits 0-1: quarter turns);
    0 is the identity. Flips only or rotations only restrict the choice."""
    k = int(torch.randint(0, 4, (1,), generator=generator)) if rot90 else 0
    flip = int(torch.randint(0, 2, (1,), generator=generator)) if flips else 0
    return flip * 4 + k


def apply_dihedral(image: torch.Tensor, transform: int) -> torch.Tensor:
    """Apply transform `random_dihedral` returned to the last two axes (H, W)."""
    if not 0 <= transform < 8:
        raise ValueError(f"dihedral transform must be 0..7, got {transform}")
    if transform & 4:
        image = torch.flip(image, dims=(-1,))
    k = transform & 3
    return torch.rot90(image, k, dims=(-2, -1)) if k else image


@dataclass(frozen=True)
class PairAugment:
    """Augment a dataset item (a dict) in place of the images named in `keys`.

    The same flip/rotation goes to every image key present (None values are skipped), so
    a registered pair stays registered; `stain` (e.g. `HEDJitter()`) goes only to the
    keys in `stain_keys`, by default the source alone. Non-square images only get the
    transforms that keep their shape (flips and half turns)."""

    flips: bool = True
    rot90: bool = True
    stain: HEDJitter | None = None
    keys: tuple[str, ...] = ("source", "target")
    stain_keys: tuple[str, ...] = ("source",)

    def __call__(self, item: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = dict(item)
        images = {k: out[k] for k in self.keys if isinstance(out.get(k), torch.Tensor)}
        if not images:
            return out
        square = all(v.shape[-1] == v.shape[-2] for v in images.values())
        transform = random_dihedral(generator, flips=self.flips, rot90=self.rot90)
        if not square and transform & 1:  # a quarter turn would swap H and W
            transform ^= 1
        for key, image in images.items():
            out[key] = apply_dihedral(image, transform)
        if self.stain is not None:
            for key in self.stain_keys:
                if isinstance(out.get(key), torch.Tensor):
                    out[key] = self.stain(out[key], generator)
        return out

    def fingerprint(self) -> str:
        """A stable description (for caches built from augmented datasets)."""
        return repr(self)


@dataclass(frozen=True)
class SourceView:
    """Give the model its view of the source (`slide.stains.SOURCE_VIEWS`) after `augment`
    (stain jitter acts on the stained image, the view is what the model then sees)."""

    view: str
    augment: Any = None

    def __post_init__(self):
        source_view(self.view, "data.source_view")  # refuse an unknown name when built

    def __call__(self, item: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = self.augment(item, generator) if self.augment is not None else dict(item)
        view = source_view(self.view)
        if view is not None and isinstance(out.get("source"), torch.Tensor):
            out["source"] = view(out["source"])
        return out

    def fingerprint(self) -> str:
        inner = self.augment.fingerprint() if hasattr(self.augment, "fingerprint") else repr(self.augment)
        return f"SourceView({self.view!r}, {inner})"
