"""Few-step sampling by reflow distillation (rectified flow's "2-rectified flow").

The flow a denoiser learns from independent (noise, image) pairs has curved trajectories,
so one Euler step lands on a blur of the possible images. Reflow straightens them: the
teacher's own ODE (`teacher_steps` Euler passes) carries each noise z to an image x̂, and
the student — initialised with the teacher's weights — learns the straight path between
that coupled pair, x_t = t x̂ + (1 - t) z with velocity x̂ - z. Along a straight path one
Euler step is exact, so the student samples well in 1-2 passes.

Configured by a `distill:` section of `mupad train` (teacher: a model folder or id); the
student keeps the teacher's architecture, latent codec and template. A generation model
(text, RNA or image streams) is distilled under its conditions: each pair is drawn under the
batch's own caption, and with `teacher_guidance` w the teacher's ODE is the guided one
(v_c + w (v_c - v_u), two passes a step), so the student learns the guided trajectory itself
and samples it with one pass a step, no guidance (guidance distillation, Meng et al. 2023). Chosen over shortcut
or MeanFlow training because it reuses the training loop, loss and data unchanged and its
effect is measured directly against the teacher (benchmarks/quality_vs_steps.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..transport import path
from ..transport.samplers import time_grid


@dataclass
class ReflowTerms:
    total: torch.Tensor
    velocity: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


@torch.no_grad()
def teacher_sample(teacher, noise: torch.Tensor, concat: torch.Tensor | None, steps: int,
                   conditions=None, guidance: float = 0.0) -> torch.Tensor:
    """The teacher's Euler ODE from noise (t = 0) to data (t = 1), guided when `guidance` > 0."""
    from ..transport.samplers import GuidedVelocity

    velocity = GuidedVelocity(teacher, conditions, concat)
    x = noise
    ts = time_grid(steps)
    for i in range(steps):
        v, _ = velocity(x, None, float(ts[i]), guidance)
        x = x + float(ts[i + 1] - ts[i]) * v.float()
    return x


def reflow_loss(student, teacher, latents: torch.Tensor, concat: torch.Tensor | None, steps: int,
                generator: torch.Generator, time_sampling: str = "uniform", conditions=None,
                guidance: float = 0.0) -> ReflowTerms:
    """Velocity loss on the straight path between a noise and the teacher's image from it
    (under the same conditions; `guidance`: the teacher's guided ODE, the student unguided)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    target = teacher_sample(teacher, noise, concat, steps, conditions, guidance)
    t = path.sample_time(latents.shape[0], time_sampling, generator=generator).to(latents.device)
    x_t = path.interpolate(target, noise, t)
    velocity = student(x_t, t, conditions, concat=concat).velocity
    loss = F.mse_loss(velocity.float(), path.velocity_target(target, noise).float())
    return ReflowTerms(total=loss, velocity=loss)
