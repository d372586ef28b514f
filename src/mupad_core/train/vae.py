"""Training a latent codec (diffusers `AutoencoderKL`) with the same `mupad train` tooling.

Where no pretrained diffusers VAE can be reached (offline sites, a new stain or marker
panel), `task: vae` trains one on the config's data: same data sets, augmentation,
checkpoints, exact resume, DDP and logs as the denoisers. The loss is the usual first-stage
objective without a discriminator: L1 reconstruction plus a small KL term (`model.kl_weight`),
in pixels scaled to [-1, 1]. The exported folder is a plain diffusers AutoencoderKL whose
`scaling_factor` is set from the trained latents (1 / their std), so `vae: <that folder>` in a
denoiser config (or `load_vae`) uses it directly.

    task: vae
    model: {block_out_channels: [64, 128, 256], latent_channels: 4, layers_per_block: 1, kl_weight: 1.0e-6}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, RunConfig

VAE_DEFAULTS = {"block_out_channels": [64, 128, 256], "latent_channels": 4, "layers_per_block": 1,
                "norm_num_groups": 32}
KL_WEIGHT = 1e-6


def build_vae(config: RunConfig) -> nn.Module:
    """An untrained AutoencoderKL of the config's shape (seeded)."""
    from diffusers import AutoencoderKL

    options = {**VAE_DEFAULTS, **config.model}
    options.pop("kl_weight", None)
    levels = len(options["block_out_channels"])
    options.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    options.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            return AutoencoderKL(in_channels=len(config.channels) if config.channels else 3,
                                 out_channels=len(config.channels) if config.channels else 3, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{config.source_file}: model: {exc}") from exc


def kl_weight(config: RunConfig) -> float:
    return float(config.model.get("kl_weight", KL_WEIGHT))


@dataclass
class VAELossTerms:
    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def vae_loss(model: nn.Module, images: torch.Tensor, weight: float, generator: torch.Generator) -> VAELossTerms:
    """L1 reconstruction of images in [-1, 1] from a posterior sample, plus weight x KL to N(0, I)."""
    module = getattr(model, "module", model)
    posterior = module.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
    latents = posterior.mean + posterior.std * noise  # the generator keeps the run reproducible and resumable
    reconstruction = module.decode(latents).sample
    l1 = F.l1_loss(reconstruction, images)
    kl = posterior.kl().mean() / images[0].numel()  # per pixel, so the weight does not depend on the tile size
    return VAELossTerms(total=l1 + weight * kl, reconstruction=l1, kl=kl)


@torch.no_grad()
def calibrate_scaling(model: nn.Module, images: torch.Tensor) -> float:
    """1 / std of the latent means over `images` ([-1, 1]): the diffusion model then sees unit-scale latents."""
    latents = model.encode(images).latent_dist.mean
    scale = 1.0 / max(float(latents.std()), 1e-6)
    model.register_to_config(scaling_factor=scale)
    return scale
