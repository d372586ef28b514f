"""Latent codecs: the image <-> latent maps the denoiser works in.

`TinyAutoencoderCodec` (models/tiny_autoencoder.py) is the default of new models: the
pretrained TAEF2, bundled. `DiffusersVAE` wraps any diffusers `AutoencoderKL` (local folder or hub id) and applies
its `scaling_factor` / `shift_factor`, so latents have roughly unit variance whatever
VAE a user brings (SD, SD3, FLUX-style). `PixelUnshuffleCodec` is a lossless,
weight-free space-to-depth map: it lets tiny models train and run on CPU (tests, the
offline demo) when no pretrained VAE is reachable. Both take images as float RGB in
[0, 1], shaped (B, 3, H, W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F


class VAEError(RuntimeError):
    pass


class LatentCodec(Protocol):
    latent_channels: int
    downscale: int

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelUnshuffleCodec:
    """Space-to-depth by `factor`: (B, 3, H, W) -> (B, 3 f^2, H/f, W/f), exactly invertible."""

    needs_tiling = False  # purely local: any region encodes to the same numbers in one call

    def __init__(self, factor: int = 2, channels: int = 3):
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.downscale = factor
        self.image_channels = channels
        self.latent_channels = channels * factor * factor

    def encode(self, images, generator=None):
        f = self.downscale
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {f}")
        return F.pixel_unshuffle(images * 2 - 1, f)

    def decode(self, latents):
        return (F.pixel_shuffle(latents, self.downscale) + 1) / 2

    def __repr__(self):
        return f"pixel-unshuffle:{self.downscale}"


class DiffusersVAE:
    """An `AutoencoderKL` with its latent normalisation applied."""

    needs_tiling = True

    def __init__(self, vae, *, sample_posterior: bool = False):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)
        self.sample_posterior = sample_posterior

    @torch.no_grad()
    def encode(self, images, generator=None):
        dist = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
        z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents):
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def to(self, device=None, dtype=None):
        self.vae.to(device=device, dtype=dtype)
        return self


class MarkerGroupCodec:
    """N marker channels as ceil(N/3) three-channel images, each through one RGB codec (the
    paper's H&E->mIF design: markers grouped into 3-channel sets, each encoded by the VAE).

    The group latents are stacked along channels, so a 6-marker target is 2 x 4 = 8 latent
    channels under an SD-style VAE. Any channel count encodes (an RGB source is one group);
    the last group is padded with empty channels, which decoding drops again.
    """

    def __init__(self, inner: LatentCodec, image_channels: int):
        if image_channels < 1:
            raise ValueError(f"need at least one marker channel, got {image_channels}")
        self.inner = inner
        self.image_channels = image_channels
        self.downscale = inner.downscale
        self.needs_tiling = getattr(inner, "needs_tiling", True)
        self.groups = -(-image_channels // 3)
        self.latent_channels = self.latent_channels_for(image_channels)

    @property
    def identity(self) -> str:
        """For latent caches: the inner codec's identity and the grouping."""
        from .identity import codec_identity

        return f"{codec_identity(self.inner)} x{self.groups} marker groups ({self.image_channels} channels)"

    def latent_channels_for(self, channels: int) -> int:
        return -(-channels // 3) * self.inner.latent_channels

    def encode(self, images, generator=None):
        c = images.shape[1]
        pad = -c % 3
        if pad:
            images = torch.cat([images, images.new_zeros(images.shape[0], pad, *images.shape[2:])], dim=1)
        return torch.cat([self.inner.encode(group, generator=generator) for group in images.split(3, dim=1)], dim=1)

    def decode(self, latents):
        groups = latents.split(self.inner.latent_channels, dim=1)
        images = torch.cat([self.inner.decode(group) for group in groups], dim=1)
        return images[:, : self.image_channels] if len(groups) == self.groups else images

    def to(self, device=None, dtype=None):
        if hasattr(self.inner, "to"):
            self.inner.to(device=device, dtype=dtype)
        return self

    def __repr__(self):
        return f"{self.inner!r} x {self.groups} marker groups"


def codec_for(spec: str | Path, channels: list[str] | None = None, *, device=None) -> LatentCodec:
    """The codec of a model: `load_vae(spec)`, grouped by three when the output has other than 3 channels."""
    codec = load_vae(spec, device=device)
    if channels and len(channels) != 3:
        return MarkerGroupCodec(codec, len(channels))
    return codec


def load_vae(spec: str | Path, *, subfolder: str | None = None, device=None, dtype=None) -> LatentCodec:
    """`taef2` (the bundled pretrained codec), a TAEF2 folder, `pixel-unshuffle:F`, a local
    AutoencoderKL folder, or a hub id (e.g. a model's `vae`)."""
    from .tiny_autoencoder import ENCODER_FILE, TinyAutoencoderCodec

    spec_str = str(spec)
    if spec_str.startswith("pixel-unshuffle"):
        _, _, factor = spec_str.partition(":")
        return PixelUnshuffleCodec(int(factor or 2))
    if spec_str == "taef2":
        return TinyAutoencoderCodec.from_folder(None, device=device, dtype=dtype)
    if (Path(spec_str).expanduser() / ENCODER_FILE).is_file():
        return TinyAutoencoderCodec.from_folder(Path(spec_str).expanduser(), device=device, dtype=dtype)
    from diffusers import AutoencoderKL

    from ..hub import resolve_pretrained

    # A whole pipeline repo can be many GB: fetch only the VAE's config and safetensors.
    folder = resolve_pretrained(spec_str, ["config.json", "*.safetensors", "vae/config.json", "vae/*.safetensors"])
    if subfolder is None and not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        subfolder = "vae"
    where = folder / subfolder if subfolder else folder
    if not (where / "config.json").exists():
        raise VAEError(f"{where}: no config.json — not a diffusers AutoencoderKL folder")
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)
    except Exception as exc:  # diffusers raises many types; the user needs the file and the reason
        raise VAEError(f"{where}: cannot load AutoencoderKL: {exc}") from exc
    return DiffusersVAE(vae).to(device=device, dtype=dtype)
