"""Baselines MUPAD is measured against, trained by the same `mupad train` on the same data.

pix2pix-style: a conditional U-Net (diffusers `UNet2DModel`, timestep fixed at 0) that maps
the source image to the target in one deterministic pass, trained with the L1 loss of
pix2pix (its adversarial PatchGAN term is left out: this is the regression baseline every
virtual-staining paper reports). Selected by `model: {kind: pix2pix, ...}` with
`template: source` and the lossless `vae: pixel-unshuffle:1`; everything else (data, resume,
export, `mupad stain`, `mupad eval`) is shared with the diffusion models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PIX2PIX_DEFAULTS = {"block_out_channels": [32, 64, 128], "layers_per_block": 1, "norm_num_groups": 8}


def build_pix2pix(options: dict, in_channels: int, out_channels: int, seed: int) -> nn.Module:
    from diffusers import UNet2DModel

    options = {**PIX2PIX_DEFAULTS, **{k: v for k, v in options.items() if k != "kind"}}
    levels = len(options["block_out_channels"])
    options.setdefault("down_block_types", ["DownBlock2D"] * levels)
    options.setdefault("up_block_types", ["UpBlock2D"] * levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(in_channels=in_channels, out_channels=out_channels, **options)


def predict(model: nn.Module, source: torch.Tensor) -> torch.Tensor:
    """The target (codec space) from the source (codec space), one pass."""
    return model(source, 0).sample


@dataclass
class RegressionLossTerms:
    total: torch.Tensor
    l1: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def pix2pix_loss(model: nn.Module, source: torch.Tensor, target: torch.Tensor) -> RegressionLossTerms:
    l1 = F.l1_loss(predict(model, source), target)
    return RegressionLossTerms(total=l1, l1=l1)
