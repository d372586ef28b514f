"""Embeddings of time, position and condition tokens for the SiT backbone."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled by 1000) followed by an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


@lru_cache(maxsize=32)
def _sincos_2d_numpy(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos):
        out = np.einsum("n,d->nd", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([encode(ys), encode(xs)], axis=1).astype(np.float32)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions on absolute patch indices, (1, H*W, dim).

    Absolute indices (not coordinates normalised to the grid) mean a 512-px tile sees
    the same local geometry as a 256-px one, only more of it: the model is
    translation-consistent across tile sizes and slide windows.

    The tensor is cached per (size, device, dtype), so a forward pass on an accelerator
    does not copy it host-to-device every call. Treat it as read-only.
    """
    return _sincos_2d_tensor(dim, grid_h, grid_w, torch.device(device or "cpu"), dtype or torch.float32)


@lru_cache(maxsize=32)
def _sincos_2d_tensor(dim: int, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # A normal (not inference-mode) constant, so it is usable with autograd too.
    with torch.inference_mode(False), torch.no_grad():
        emb = torch.from_numpy(_sincos_2d_numpy(dim, grid_h, grid_w))
        return emb.to(device=device, dtype=dtype).unsqueeze(0)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a latent map to tokens."""

    def __init__(self, in_channels: int, hidden: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of patch size {p}")
        # contiguous(): the transposed view would otherwise set the memory layout of the
        # whole residual stream (elementwise ops keep their first input's strides), so
        # every LayerNorm would copy and every add/mul would run on strided data.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class ContextEmbedder(nn.Module):
    """Projects an encoder's tokens into the transformer width.

    `n_tokens` > 0 adds a learned embedding per token slot (pathway identity for RNA).
    `scalar_tokens` treats each token as one number with its own weight, which suits
    pathway scores: each pathway gets its own direction in the hidden space.
    """

    def __init__(self, in_dim: int, hidden: int, n_tokens: int = 0, scalar_tokens: bool = False):
        super().__init__()
        self.scalar_tokens = scalar_tokens
        if scalar_tokens:
            if n_tokens <= 0 or in_dim != 1:
                raise ValueError("scalar tokens need in_dim=1 and a fixed token count")
            self.weight = nn.Parameter(torch.randn(n_tokens, hidden) * 0.02)
            self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
        else:
            self.norm = nn.LayerNorm(in_dim)
            self.proj = nn.Linear(in_dim, hidden)
        self.slot = nn.Parameter(torch.zeros(1, n_tokens, hidden)) if n_tokens > 0 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.scalar_tokens:
            if tokens.dim() == 2:
                tokens = tokens[..., None]
            if tokens.shape[1] != self.weight.shape[0]:
                raise ValueError(f"expected {self.weight.shape[0]} scalar tokens, got {tokens.shape[1]}")
            h = tokens * self.weight[None] + self.slot
            return h + self.mlp(h)
        h = self.proj(self.norm(tokens))
        if self.slot is not None:
            if tokens.shape[1] > self.slot.shape[1]:
                raise ValueError(f"at most {self.slot.shape[1]} tokens, got {tokens.shape[1]}")
            h = h + self.slot[:, : tokens.shape[1]]
        return h
