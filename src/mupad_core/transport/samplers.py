"""Samplers for the linear interpolant (see `path`): t goes 0 (noise) -> 1 (data).

- ODE: Euler and Heun on dx/dt = v(x, t); deterministic given the start noise.
- SDE: Euler-Maruyama on dx = [v + w(t)/2 * score] dt + sqrt(w(t)) dW with
  w(t) = scale * (1 - t), the paper's default sampler (250 steps); the last step is
  taken without noise, as SiT does, so the result is a clean sample.
- Classifier-free guidance: v = v_c + w(t) * (v_c - v_u), so w = 0 is the plain
  conditional model and its unconditional pass is skipped entirely. (This w is the
  usual "scale - 1".) `annealed(2.5, 0.0)` is the paper's schedule.
- Inversion: runs the Euler ODE backwards with fixed-point refinement, so that Euler
  sampling from the inverted noise returns the input (needed by FF->FFPE).

The model is any callable `model(x, t, conditions, cls=, concat=) -> SiTOutput`-like
object with `.velocity` (and `.cls_velocity` when the model carries a CLS token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..models.conditions import Conditions
from . import path

GuidanceSchedule = Callable[[float], float]  # progress in [0, 1] -> guidance weight
ProgressCallback = Callable[[int, int], None]  # (steps done, total); may raise to cancel


def constant(weight: float) -> GuidanceSchedule:
    return lambda progress: weight


def annealed(start: float = 2.5, end: float = 0.0) -> GuidanceSchedule:
    """Linear from `start` at the noise end to `end` at the data end (paper default)."""
    return lambda progress: start + (end - start) * progress


def interval(weight: float, lo: float = 0.0, hi: float = 1.0) -> GuidanceSchedule:
    """Guidance only while progress is in [lo, hi] (guidance-interval trick)."""
    return lambda progress: weight if lo <= progress <= hi else 0.0


def as_schedule(guidance: float | GuidanceSchedule) -> GuidanceSchedule:
    return guidance if callable(guidance) else constant(float(guidance))


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0, device=None) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=torch.float64)


@dataclass
class SampleResult:
    x: torch.Tensor
    cls: torch.Tensor | None = None
    network_passes: int = 0


class GuidedVelocity:
    """Velocity of the (possibly guided) model; counts network passes.

    The conditional and unconditional halves run as one batch. `drop` names the
    modalities switched off in the unconditional half (default: all of them).
    """

    def __init__(self, model, conditions: Conditions | None, concat=None, drop: Sequence[str] | None = None):
        self.model = model
        self.conditions = conditions
        self.concat = concat
        self.drop = tuple(drop) if drop is not None else tuple(conditions.tokens) if conditions else ()
        self.passes = 0

    def __call__(self, x, cls, t: float, weight: float):
        b = x.shape[0]
        tt = torch.full((b,), float(t), device=x.device, dtype=torch.float32)
        if weight == 0.0 or self.conditions is None or not self.drop:
            out = self.model(x, tt, self.conditions, cls=cls, concat=self.concat)
            self.passes += 1
            return out.velocity, out.cls_velocity
        both = Conditions.concat([self.conditions, self.conditions.without(*self.drop)])
        cat = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
        out = self.model(cat(x), torch.cat([tt, tt]), both, cls=cat(cls), concat=cat(self.concat))
        self.passes += 2
        v_c, v_u = out.velocity.chunk(2)
        v = v_c + weight * (v_c - v_u)
        cv = None
        if out.cls_velocity is not None:
            c_c, c_u = out.cls_velocity.chunk(2)
            cv = c_c + weight * (c_c - c_u)
        return v, cv


def _axpy(a, x, y):
    """y + a * x, passing None through (the optional CLS state)."""
    return None if y is None else y + a * x


@torch.no_grad()
def sample(
    model,
    noise: torch.Tensor,
    conditions: Conditions | None = None,
    *,
    method: str = "euler",
    steps: int = 50,
    guidance: float | GuidanceSchedule = 0.0,
    guidance_drop: Sequence[str] | None = None,
    cls_noise: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
    t_start: float = 0.0,
    t_end: float = 1.0,
    diffusion_scale: float = 1.0,
    generator: torch.Generator | None = None,
    sde_noise: Callable[[int, tuple], torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
) -> SampleResult:
    """Integrate from `noise` (at t_start) to data (at t_end).

    `sde_noise(step, shape)` supplies the Brownian increments' standard normals, for a caller
    that must draw them itself (e.g. from a global canvas, so tiles agree). The whole-slide
    engine integrates each block through this function, with `generate.fused.FusedBlockVelocity`
    as the model.
    """
    schedule = as_schedule(guidance)
    velocity = GuidedVelocity(model, conditions, concat, guidance_drop)
    ts = time_grid(steps, t_start, t_end)
    x, cls = noise, cls_noise
    span = max(t_end - t_start, 1e-12)
    for i in range(steps):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        dt = t1 - t0
        w = schedule((t0 - t_start) / span)
        v, cv = velocity(x, cls, t0, w)
        if method == "euler":
            x, cls = x + dt * v, _axpy(dt, cv, cls)
        elif method == "heun":
            x1, c1 = x + dt * v, _axpy(dt, cv, cls)
            v1, cv1 = velocity(x1, c1, t1, schedule((t1 - t_start) / span))
            x = x + dt * 0.5 * (v + v1)
            cls = None if cls is None else cls + dt * 0.5 * (cv + cv1)
        elif method == "sde":
            x, cls = _sde_step(x, cls, v, cv, t0, dt, diffusion_scale, last=i == steps - 1,
                               draw=lambda shape, k=i: _normal(shape, x, generator, sde_noise, k))
        else:
            raise ValueError(f"sampler method must be 'euler', 'heun' or 'sde', got {method!r}")
        if progress is not None:
            progress(i + 1, steps)
    return SampleResult(x=x, cls=cls, network_passes=velocity.passes)


def _normal(shape, like: torch.Tensor, generator, sde_noise, step: int) -> torch.Tensor:
    if sde_noise is not None:
        return sde_noise(step, tuple(shape)).to(like.device, like.dtype)
    z = torch.randn(shape, generator=generator, device="cpu" if generator is not None else like.device)
    return z.to(like.device, like.dtype)


def sde_step(x: torch.Tensor, v: torch.Tensor, t: float, dt: float, normal: torch.Tensor | None,
             scale: float = 1.0) -> torch.Tensor:
    """One Euler-Maruyama step from x at t with velocity v; `normal=None` takes the mean
    update only (the last step, as in SiT)."""
    w = scale * (1.0 - t)
    drift = v + 0.5 * w * path.score(x, v, torch.full((x.shape[0],), t, device=x.device))
    if normal is None:
        return x + dt * drift
    return x + dt * drift + (w * dt) ** 0.5 * normal


def _sde_step(x, cls, v, cv, t, dt, scale, last, draw):
    def step(state, vel):
        return sde_step(state, vel, t, dt, None if last else draw(state.shape), scale)

    return step(x, v), (None if cls is None else step(cls, cv))


@torch.no_grad()
def invert(
    model,
    x_data: torch.Tensor,
    conditions: Conditions | None = None,
    *,
    steps: int = 50,
    guidance: float | GuidanceSchedule = 0.0,
    guidance_drop: Sequence[str] | None = None,
    cls_data: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
    t_start: float = 0.0,
    t_end: float = 1.0,
    fixed_point_iters: int = 4,
    progress: ProgressCallback | None = None,
) -> SampleResult:
    """Deterministic inversion: the noise whose Euler trajectory ends at `x_data`.

    Each backward step solves x_i = x_{i+1} - dt * v(x_i, t_i) by fixed-point
    iteration (started from the naive DDIM-style guess), so the Euler sampler with the
    same steps, conditions and guidance reproduces `x_data` up to the fixed-point
    residual instead of accumulating the naive inversion's first-order error.
    """
    schedule = as_schedule(guidance)
    velocity = GuidedVelocity(model, conditions, concat, guidance_drop)
    ts = time_grid(steps, t_start, t_end)
    span = max(t_end - t_start, 1e-12)
    x, cls = x_data, cls_data
    for n, i in enumerate(reversed(range(steps))):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        dt = t1 - t0
        w = schedule((t0 - t_start) / span)
        v, cv = velocity(x, cls, t1, schedule((t1 - t_start) / span))
        xi, ci = x - dt * v, _axpy(-dt, cv, cls)
        for _ in range(fixed_point_iters):
            v, cv = velocity(xi, ci, t0, w)
            xi, ci = x - dt * v, _axpy(-dt, cv, cls)
        x, cls = xi, ci
        if progress is not None:
            progress(n + 1, steps)
    return SampleResult(x=x, cls=cls, network_passes=velocity.passes)


def make_noise(shape: Sequence[int], seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Start noise from a seed, drawn on CPU so the same seed gives the same noise on any device."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
