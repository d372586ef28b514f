"""Baselines MUPAD is measured against, trained by the same `mupad train` on the same data.

- pix2pix-style (`model: {kind: pix2pix}`): a conditional U-Net (diffusers `UNet2DModel`,
  timestep fixed at 0) that maps the source image to the target in one deterministic pass,
  trained with pix2pix's L1 loss (the paired regression baseline virtual-staining papers report).
- CycleGAN-style (`model: {kind: cyclegan}`): two such U-Nets (source->target, target->source)
  and two PatchGAN discriminators, trained *unpaired* (each batch's targets are rotated by one,
  so no source is ever seen beside its own target) with least-squares adversarial, cycle (L1)
  and identity losses. Only the source->target U-Net is exported: it runs like pix2pix.

Both need `template: source` and the lossless `vae: pixel-unshuffle:1`; everything else
(data, resume, export, `mupad stain`, `mupad eval`) is shared with the diffusion models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

PIX2PIX_DEFAULTS = {"block_out_channels": [32, 64, 128], "layers_per_block": 1, "norm_num_groups": 8}
ONE_PASS_KINDS = ("pix2pix", "cyclegan")  # baselines the engine runs through OnePassHandle


def _unet(options: dict, in_channels: int, out_channels: int) -> nn.Module:
    from diffusers import UNet2DModel

    options = {**PIX2PIX_DEFAULTS, **{k: v for k, v in options.items() if k != "kind"}}
    levels = len(options["block_out_channels"])
    options.setdefault("down_block_types", ["DownBlock2D"] * levels)
    options.setdefault("up_block_types", ["UpBlock2D"] * levels)
    return UNet2DModel(in_channels=in_channels, out_channels=out_channels, **options)


def build_pix2pix(options: dict, in_channels: int, out_channels: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _unet(options, in_channels, out_channels)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: 4x4 stride-2 convolutions, one real/fake logit per receptive-field patch."""

    def __init__(self, channels: int, width: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        dim = width
        for i in range(1, layers):
            out = min(width * 2**i, width * 8)
            blocks += [nn.Conv2d(dim, out, 4, 2 if i < layers - 1 else 1, 1), nn.InstanceNorm2d(out, affine=True),
                       nn.LeakyReLU(0.2)]
            dim = out
        blocks.append(nn.Conv2d(dim, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGAN(ModelMixin, ConfigMixin):
    """Two translators and two discriminators in one module, so one optimiser, EMA and checkpoint hold them."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, channels_a: int = 3, channels_b: int = 3, block_out_channels: tuple = (16, 32, 64),
                 layers_per_block: int = 1, norm_num_groups: int = 8, disc_width: int = 32, disc_layers: int = 3):
        super().__init__()
        unet = {"block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block,
                "norm_num_groups": norm_num_groups}
        self.g_ab = _unet(unet, channels_a, channels_b)
        self.g_ba = _unet(unet, channels_b, channels_a)
        self.d_a = PatchDiscriminator(channels_a, disc_width, disc_layers)
        self.d_b = PatchDiscriminator(channels_b, disc_width, disc_layers)


def build_cyclegan(options: dict, channels_a: int, channels_b: int, seed: int) -> CycleGAN:
    options = {k: v for k, v in options.items() if k not in ("kind", "cycle_weight", "identity_weight")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CycleGAN(channels_a=channels_a, channels_b=channels_b, **options)


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


@dataclass
class CycleGANLossTerms:
    total: torch.Tensor
    adversarial: torch.Tensor
    cycle: torch.Tensor
    identity: torch.Tensor
    discriminator: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def _frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` with its parameters held constant: the generators' adversarial loss moves
    the generators only, so generator and discriminator losses can share one backward pass."""
    from torch.func import functional_call

    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, {**params, **dict(module.named_buffers())}, (x,))


def cyclegan_loss(model: nn.Module, a: torch.Tensor, b: torch.Tensor, cycle_weight: float = 10.0,
                  identity_weight: float = 0.5) -> CycleGANLossTerms:
    """LSGAN + cycle + identity losses (CycleGAN's), generator and discriminator terms summed.

    `b` is rotated by one within the batch: the translator never sees a source beside its own
    target, so paired data trains it as unpaired data would."""
    net = getattr(model, "module", model)
    b = b.roll(1, dims=0)
    fake_b, fake_a = predict(net.g_ab, a), predict(net.g_ba, b)
    adversarial = sum(F.mse_loss(p, torch.ones_like(p)) for p in (_frozen(net.d_b, fake_b), _frozen(net.d_a, fake_a)))
    cycle = F.l1_loss(predict(net.g_ba, fake_b), a) + F.l1_loss(predict(net.g_ab, fake_a), b)
    identity = torch.zeros((), device=a.device)
    if identity_weight and a.shape[1] == b.shape[1]:
        identity = F.l1_loss(predict(net.g_ab, b), b) + F.l1_loss(predict(net.g_ba, a), a)
    discriminator = torch.zeros((), device=a.device)
    for d, real, fake in ((net.d_b, b, fake_b), (net.d_a, a, fake_a)):
        real_logits, fake_logits = d(real), d(fake.detach())
        discriminator = discriminator + 0.5 * (F.mse_loss(real_logits, torch.ones_like(real_logits))
                                               + F.mse_loss(fake_logits, torch.zeros_like(fake_logits)))
    total = adversarial + cycle_weight * cycle + cycle_weight * identity_weight * identity + discriminator
    return CycleGANLossTerms(total, adversarial, cycle, identity, discriminator)
