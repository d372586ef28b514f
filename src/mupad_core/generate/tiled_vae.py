"""VAE encode/decode of a whole block in overlapping tiles, blended.

A diffusers VAE decoding a 1.5k-px block in one call needs several GB of activations;
tiles bound that. Independent tiles would disagree at their borders (the decoder's
receptive field sees different context), so tiles overlap and are blended with the
same raised-cosine weights the sampler uses for windows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .fusion import ramp_weights, window_grid


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale: float) -> torch.Tensor:
    """Apply `fn` ((1, C, h, w) -> (1, C', h*scale, w*scale)) to x (C, H, W) tile by tile."""
    _, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x[None])[0]
    out = None
    weight_sum = None
    for w in window_grid(height, width, tile, overlap):
        y_out = fn(x[None, :, w.y : w.y + w.h, w.x : w.x + w.w])[0]
        oy, ox, oh, ow = int(w.y * scale), int(w.x * scale), y_out.shape[-2], y_out.shape[-1]
        if out is None:
            out = torch.zeros(y_out.shape[0], int(height * scale), int(width * scale), dtype=y_out.dtype,
                              device=y_out.device)
            weight_sum = torch.zeros(out.shape[-2:], dtype=y_out.dtype, device=y_out.device)
        wt = ramp_weights(oh, ow, int(overlap * scale)).to(y_out.device, y_out.dtype)
        out[:, oy : oy + oh, ox : ox + ow] += y_out * wt
        weight_sum[oy : oy + oh, ox : ox + ow] += wt
    return out / weight_sum


def tiled_encode(codec, images: torch.Tensor, tile_px: int = 512, overlap_px: int = 64) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> latent (C, H/d, W/d)."""
    if not getattr(codec, "needs_tiling", True):
        return codec.encode(images[None])[0]
    return tiled_apply(codec.encode, images, tile_px, overlap_px, 1 / codec.downscale)


def tiled_decode(codec, latent: torch.Tensor, tile_latent: int = 64, overlap_latent: int = 8) -> torch.Tensor:
    """latent (C, h, w) -> pixels (3, h*d, w*d) in [0, 1]."""
    if not getattr(codec, "needs_tiling", True):
        return codec.decode(latent[None])[0]
    return tiled_apply(codec.decode, latent, tile_latent, overlap_latent, codec.downscale)
