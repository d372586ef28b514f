"""Colour deconvolution of brightfield pixels, and the *view* of its source a model is given.

A model trained on IHC can be run on H&E when both reach it as the same picture: the
haematoxylin that every brightfield stain shares. `haematoxylin_view` keeps the
haematoxylin amount of Ruifrok & Johnston's H-E-DAB deconvolution (scikit-image's matrices
and log scaling) and renders it alone, so an H&E tile and a Ki67 IHC tile of the same
tissue look alike to the model: nuclei in blue-grey on white. Training and inference call
the same function (the view is recorded in the model's `mupad_pipeline.json`).

`rgb_to_hed` / `hed_to_rgb` are `rgb2hed` / `hed2rgb` on torch tensors without the clamp
(so `hed_to_rgb(rgb_to_hed(x))` is `x`; `rgb2hed`'s stain channels where they are >= 0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from skimage.color import hed_from_rgb, rgb_from_hed

# scikit-image's scaling of optical density (it divides log(rgb) by log(1e-6)).
_LOG_ADJUST = math.log(1e-6)
_EPS = 1e-6


def _check_rgb(image: torch.Tensor) -> None:
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"colour deconvolution needs RGB images shaped (3, H, W) or (B, 3, H, W), "
                         f"got {tuple(image.shape)}")


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) RGB in [0, 1] to stain amounts in `rgb2hed`'s units, not clamped."""
    _check_rgb(image)
    matrix = torch.as_tensor(hed_from_rgb, dtype=torch.float32, device=image.device)
    od = torch.log(image.float().clamp_min(_EPS)) / _LOG_ADJUST
    return torch.einsum("...chw,cd->...dhw", od, matrix)


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed` (`hed2rgb`'s formula), clipped to [0, 1]."""
    _check_rgb(stains)
    matrix = torch.as_tensor(rgb_from_hed, dtype=torch.float32, device=stains.device)
    log_rgb = torch.einsum("...chw,cd->...dhw", stains.float(), matrix) * _LOG_ADJUST
    return torch.exp(log_rgb).clamp(0, 1)


def haematoxylin_view(image: torch.Tensor) -> torch.Tensor:
    """The haematoxylin of an RGB brightfield image rendered alone (eosin and DAB removed)."""
    stains = rgb_to_hed(image)
    only = torch.zeros_like(stains)
    only[..., 0, :, :] = stains[..., 0, :, :].clamp_min(0)
    return hed_to_rgb(only).to(image.dtype)


# Stain amounts that fill the view's range: rgb2hed's haematoxylin and DAB reach about 0.15-0.2
# at their darkest on 40x Ki67 IHC (DeepLIIF) and H&E.
_AMOUNT_FULL_SCALE = 0.2


def h_dab_view(image: torch.Tensor) -> torch.Tensor:
    """Haematoxylin in the first two channels and DAB in the third, bright where stained.

    The colour-deconvolution reading of a brightfield slide laid out like a nuclear /
    nuclear-envelope / proliferation fluorescence panel (DAPI, Lap2β, Ki67): an mIF model then
    starts from the arithmetic floor and learns what it gets wrong, instead of re-deriving
    stain separation from one panel.
    """
    stains = rgb_to_hed(image)
    h = (stains[..., 0, :, :] / _AMOUNT_FULL_SCALE).clamp(0, 1)
    dab = (stains[..., 2, :, :] / _AMOUNT_FULL_SCALE).clamp(0, 1)
    return torch.stack([h, h, dab], dim=-3).to(image.dtype)


SOURCE_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "rgb": None,  # the pixels as read
    "haematoxylin": haematoxylin_view,
    "h_dab": h_dab_view,
}


def source_view(name: str | None, where: str = "source_view") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The view function by name (None for the pixels as read); `where` names the setting in errors."""
    if name in (None, "rgb"):
        return None
    if name not in SOURCE_VIEWS:
        raise ValueError(f"{where}: unknown source view {name!r}; choose one of {', '.join(SOURCE_VIEWS)}")
    return SOURCE_VIEWS[name]
