"""The velocity of one block of a slide, fused over its windows: what every sampler integrates.

A block is larger than the model's window, so at each evaluation every window's velocity is
taken (guided or not, with its own CLS token when the model makes one), blended by
raised-cosine ramps, and windows without tissue are steered to plain background without a
network pass. `FusedBlockVelocity` is called like a model, so `transport.samplers.sample`
integrates a block exactly as it integrates a single tile: Euler, Heun and the SDE all work
on whole slides, and a few-step student plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..models.sit import SiTOutput
from .fusion import Window, ramp_weights, window_grid


def window_cls_noise(seed: int, y: int, x: int, dim: int, step: int = 0) -> torch.Tensor:
    """A CLS token's noise for the window at global latent (y, x): a function of seed, position
    and step (0: the starting token; k > 0: the SDE's k-th increment), so a window sampled
    from two blocks follows one trajectory."""
    key = [int(seed), 0xC15, y & 0xFFFFFFFF, x & 0xFFFFFFFF] + ([int(step)] if step else [])
    mixed = np.random.SeedSequence(key).generate_state(1, np.uint64)[0]
    return torch.randn(dim, generator=torch.Generator().manual_seed(int(mixed) & 0x7FFFFFFFFFFFFFFF))


class FusedBlockVelocity:
    """Model-like callable over one block's latent (1, C, h, w); CLS state (windows, dim).

    `weight`: one window's fusion ramp; `weight_sum`: the ramps of all windows of the block,
    skipped glass windows included (their share, `glass_weight`, pulls towards `glass_latent`).
    `guidance_at(t)`: the guidance weight at time t (0: one pass per window)."""

    def __init__(self, handle, prepared, windows: Sequence[Window], weight: torch.Tensor, weight_sum: torch.Tensor,
                 batch_size: int, guidance_at: Callable[[float], float], device: torch.device,
                 glass_weight: torch.Tensor | None = None, glass_latent: torch.Tensor | None = None):
        self.handle, self.prepared, self.windows = handle, prepared, list(windows)
        self.weight, self.weight_sum = weight.to(device), weight_sum.to(device)
        self.batch_size, self.guidance_at = batch_size, guidance_at
        self.glass_weight = None if glass_weight is None else glass_weight.to(device)
        self.glass_latent = None if glass_latent is None else glass_latent.to(device)[None, :, None, None]
        self._glass_velocity: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, conditions=None, cls: torch.Tensor | None = None,
                 concat=None) -> SiTOutput:
        """x (B, C, h, w): B is 1 for a block, 2 when the transport's guidance batches the
        conditional and unconditional halves of a region (`conditions` then go to every window)."""
        b, t0 = x.shape[0], float(t[0])
        guidance = self.guidance_at(t0)
        extra = {"guidance": guidance} if guidance else {}
        velocity = torch.zeros_like(x)
        cls_velocity = None if cls is None else torch.zeros_like(cls)
        n_windows = len(self.windows)
        for start in range(0, n_windows, self.batch_size):
            group = self.windows[start : start + self.batch_size]
            n = len(group)
            # window-major: window k's B states are rows k*B .. k*B + B - 1
            batch = torch.cat([x[..., w.y : w.y + w.h, w.x : w.x + w.w] for w in group])
            if conditions is not None:
                extra["conditions"] = conditions.repeat(n)
            if cls is None:
                v = self.handle.window_velocity(batch, t0, self.prepared, group, **extra)
            else:
                per_window = cls.reshape(b, n_windows, -1)[:, start : start + n]
                v, cv = self.handle.window_velocity(batch, t0, self.prepared, group,
                                                    cls=per_window.transpose(0, 1).reshape(n * b, -1), **extra)
                cls_velocity.view(b, n_windows, -1)[:, start : start + n] = \
                    cv.to(cls.device).reshape(n, b, -1).transpose(0, 1)
            v = v.to(x.device)
            for k, w in enumerate(group):
                velocity[..., w.y : w.y + w.h, w.x : w.x + w.w] += v[k * b : (k + 1) * b] * self.weight
        if self.glass_weight is not None:
            # The straight path to glass has a constant velocity, (glass - x_t) / (1 - t); at
            # t = 1 (Heun's last corrector) that is 0/0, so the last value is used again.
            if t0 < 1.0 - 1e-9 or self._glass_velocity is None:
                self._glass_velocity = (self.glass_latent - x) / max(1.0 - t0, 1e-9)
            velocity += self.glass_weight * self._glass_velocity
        velocity /= self.weight_sum
        return SiTOutput(velocity=velocity, cls_velocity=cls_velocity)


class RegionHandle:
    """A token-conditioned model as the handle of a region with no source (text, RNA or a
    reference image): every window gets the conditions the sampler passes, and guidance stays
    the transport's (`GuidedVelocity` batches the two halves; see `FusedBlockVelocity`)."""

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)
        self.passes = 0

    @property
    def cls_dim(self) -> int:
        return int(self.model.config.get("cls_dim") or 0)

    def window_velocity(self, x, t: float, prepared, windows, cls=None, conditions=None):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        out = self.model(x, tt, conditions, cls=cls)
        self.passes += 1
        return out.velocity if cls is None else (out.velocity, out.cls_velocity)


def region_velocity(model, height: int, width: int, window: int, overlap: int, *, batch_size: int = 8,
                    device: torch.device | str = "cpu") -> FusedBlockVelocity:
    """The fused velocity of a whole (height, width) latent region, windows of `window` with
    `overlap` (a region that fits one window is that window): a one-block run of the engine's path."""
    windows = window_grid(height, width, window, overlap)
    weight = ramp_weights(windows[0].h, windows[0].w, overlap)
    weight_sum = torch.zeros(height, width)
    for w in windows:
        weight_sum[w.y : w.y + w.h, w.x : w.x + w.w] += weight
    return FusedBlockVelocity(RegionHandle(model, device), None, windows, weight, weight_sum, batch_size,
                              guidance_at=lambda t: 0.0, device=torch.device(device))
