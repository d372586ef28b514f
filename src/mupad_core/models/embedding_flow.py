"""The paper's embedding-space H&E->IHC translation (its eq. 6).

A 6-layer MLP learns a flow in the image encoder's embedding space from an H&E patch
embedding to the embedding of the same patch stained by IHC: z_t = t z_ihc + (1 - t) z_he,
target velocity z_ihc - z_he. At inference each H&E token is carried from t = 0 to 1 by
Euler steps, and the translated tokens condition a generator trained on IHC images with
their own embeddings (an image-stream model): layout from the tokens' positions, stain
from the translation. PixCell's public virtual-staining code does the same with UNI
embeddings; here the encoder is whatever the generator was trained with.

`mupad train` trains it with `model: {kind: embedding-flow, generator: <IHC generator>}` on
paired (source, target) rows; the model folder records the generator, so
`mupad stain --task he2ihc --model <flow folder>` runs the pair through the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def _time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * 1000 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class EmbeddingFlow(ModelMixin, ConfigMixin):
    """Velocity field v(z_t, t) on token embeddings: `depth` linear layers (the paper: 6)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, embed_dim: int = 64, hidden_size: int = 512, depth: int = 6, time_dim: int = 64):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        self.time = nn.Sequential(nn.Linear(time_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.inp = nn.Linear(embed_dim, hidden_size)
        self.hidden = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(depth - 2))
        self.out = nn.Linear(hidden_size, embed_dim)
        nn.init.zeros_(self.out.weight)  # starts as the identity map: no translation
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z: (..., D) tokens at time t ((...) or scalar); returns their velocity."""
        shape = z.shape
        z = z.reshape(-1, shape[-1])
        t = t.float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(z.shape[0])
        elif t.numel() != z.shape[0]:
            t = t.repeat_interleave(z.shape[0] // t.numel())
        h = F.silu(self.inp(z.to(self.inp.weight.dtype)) + self.time(_time_features(t, self.config.time_dim)))
        for layer in self.hidden:
            h = F.silu(layer(h))
        return self.out(h).reshape(shape)

    @torch.no_grad()
    def translate(self, tokens: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """H&E tokens to IHC tokens: Euler steps from t = 0 to 1."""
        z = tokens.float()
        for i in range(steps):
            t = torch.full((1,), i / steps, device=z.device)
            z = z + self.forward(z, t) / steps
        return z.to(tokens.dtype)


@dataclass
class EmbeddingFlowLoss:
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {"total": float(self.total.detach())}


def embedding_flow_loss(model: nn.Module, source_tokens: torch.Tensor, target_tokens: torch.Tensor,
                        generator: torch.Generator | None = None) -> EmbeddingFlowLoss:
    """Flow matching between paired token sets: one time per sample, shared by its tokens."""
    t = torch.rand(source_tokens.shape[0], generator=generator).to(source_tokens.device)
    tt = t.view(-1, *([1] * (source_tokens.dim() - 1)))
    z_t = tt * target_tokens + (1 - tt) * source_tokens
    velocity = model(z_t, t)
    return EmbeddingFlowLoss(F.mse_loss(velocity.float(), (target_tokens - source_tokens).float()))
