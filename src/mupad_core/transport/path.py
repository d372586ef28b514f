"""The one time convention of the project: the linear interpolant.

    x_t = t * x_data + (1 - t) * x_noise,   t in [0, 1]
    t = 0 is pure Gaussian noise, t = 1 is data (SiT's convention).
    velocity target u_t = dx_t/dt = x_data - x_noise

Samplers integrate dx/dt = v(x, t) from t = 0 to t = 1; inversion runs it backwards.
The same convention is used for the CLS token and for embedding-space flows.

A restaining model may start its path at its source instead of pure noise
(`loss.start: source`): x_noise = source latent + sigma * noise (`source_start`). The model
then learns only where the target differs from its source, and what it does not learn
stays as the source has it (an arithmetic floor such as colour deconvolution, shown as the
panel, is kept rather than redrawn from noise).
"""

from __future__ import annotations

import torch


def expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample times (B,) against x (B, ...)."""
    return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x_data: torch.Tensor, x_noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = expand_t(t, x_data)
    return tt * x_data + (1 - tt) * x_noise


def source_start(source: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The noise end of a path that starts at the source latent (see the module's note)."""
    if source.shape != noise.shape:
        raise ValueError(f"a path that starts at its source needs the source latent shaped like the target's, "
                         f"got {tuple(source.shape)} and {tuple(noise.shape)}")
    return source.to(noise.dtype) + sigma * noise


def velocity_target(x_data: torch.Tensor, x_noise: torch.Tensor) -> torch.Tensor:
    return x_data - x_noise


def noise_prediction(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x_noise | x_t] from a velocity: x_t - t * v."""
    return x_t - expand_t(t, x_t) * velocity


def data_prediction(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x_data | x_t] from a velocity: x_t + (1 - t) * v."""
    return x_t + (1 - expand_t(t, x_t)) * velocity


def score(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """grad log p_t(x) = -E[x_noise | x_t] / (1 - t) for the linear path."""
    return -noise_prediction(x_t, velocity, t) / (1 - expand_t(t, x_t)).clamp_min(eps)


def sample_time(
    batch: int,
    kind: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Training times: `uniform` on [eps, 1-eps] or `logit_normal` (SD3-style, mid-t heavy)."""
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"time sampling must be 'uniform' or 'logit_normal', got {kind!r}")
    return t.clamp(eps, 1 - eps)
