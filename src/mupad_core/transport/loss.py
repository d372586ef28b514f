"""MUPAD training objective: velocity MSE + lambda * CLS velocity MSE + beta * alignment.

Condition dropout (per modality, per sample) is applied here so that every training
step also teaches the unconditional and partially conditional models that
classifier-free guidance needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.conditions import Conditions
from . import path


@dataclass
class LossConfig:
    time_sampling: str = "logit_normal"
    cls_weight: float = 0.03  # lambda; REG's default
    align_weight: float = 0.5  # beta; REPA's default
    condition_dropout: float = 0.1
    start: str = "noise"  # "source": the path starts at the template latent plus start_noise x noise (path.py)
    start_noise: float = 0.5


@dataclass
class LossTerms:
    total: torch.Tensor
    velocity: torch.Tensor
    cls: torch.Tensor | None = None
    align: torch.Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items() if v is not None}


def drop_conditions(conditions: Conditions | None, p: float, generator: torch.Generator | None = None,
                    share: tuple[int, int] = (0, 1)):
    """Switch each modality off for each sample with probability p (presence -> 0)."""
    if conditions is None or p <= 0:
        return conditions
    presence = {}
    for name, flag in conditions.presence.items():
        keep = _draw(torch.rand, flag.shape, generator, flag.device if generator is None else "cpu", share)
        presence[name] = flag.float() * (keep.to(flag.device) >= p).float()
    return Conditions(dict(conditions.tokens), dict(conditions.masks), presence)


def _draw(fn, shape, generator, device, share: tuple[int, int]) -> torch.Tensor:
    """`fn(shape)` drawn for the whole global batch, this part kept (see `training_loss`)."""
    rank, world = share
    if world == 1:
        return fn(tuple(shape), generator=generator, device=device)
    b = shape[0]
    return fn((b * world, *shape[1:]), generator=generator, device=device)[rank * b : (rank + 1) * b]


def alignment_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per spatial position, averaged.

    projected: (B, D, h, w) from the SiT projector. teacher: (B, D, H, W) patch
    features, or (B, N, D) tokens on a square grid. The projection is resized to the
    teacher's grid so encoders with any patch size can teach.
    """
    if teacher.dim() == 3:
        b, n, d = teacher.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"teacher has {n} tokens: not a square grid; pass (B, D, H, W)")
        teacher = teacher.transpose(1, 2).reshape(b, d, side, side)
    if projected.shape[1] != teacher.shape[1]:
        raise ValueError(f"projector gives {projected.shape[1]} features, teacher {teacher.shape[1]}")
    if projected.shape[-2:] != teacher.shape[-2:]:
        projected = F.interpolate(projected, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    cos = F.cosine_similarity(projected.float(), teacher.float(), dim=1)
    return -cos.mean()


def training_loss(
    model,
    x_data: torch.Tensor,
    conditions: Conditions | None = None,
    *,
    cls_target: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    concat: torch.Tensor | None = None,
    config: LossConfig = LossConfig(),
    generator: torch.Generator | None = None,
    share: tuple[int, int] = (0, 1),
) -> LossTerms:
    """One stochastic estimate of the MUPAD loss on a batch of clean latents.

    `share=(rank, world)`: this batch is part `rank` of `world` equal parts of a global
    batch (data-parallel training). Times, noise and dropout are drawn for the global batch
    from the shared generator and this part is kept, so a run gives the same numbers on
    one process or on many.
    """
    dev = x_data.device
    gen_dev = "cpu" if generator is not None else dev
    t = _draw(lambda n, generator, device: path.sample_time(n[0], config.time_sampling, generator=generator,
                                                            device=device), (x_data.shape[0],), generator, gen_dev,
              share).to(dev)
    noise = _draw(torch.randn, x_data.shape, generator, gen_dev, share).to(dev, x_data.dtype)
    if config.start == "source":
        if concat is None:
            raise ValueError("loss.start 'source' starts the path at the spatial template: pass concat")
        noise = path.source_start(concat, noise, config.start_noise)
    x_t = path.interpolate(x_data, noise, t)
    cls_t = None
    if cls_target is not None:
        cls_noise = _draw(torch.randn, cls_target.shape, generator, gen_dev, share).to(dev, cls_target.dtype)
        cls_t = path.interpolate(cls_target, cls_noise, t)
    conditions = drop_conditions(conditions, config.condition_dropout, generator, share)
    want_projection = teacher_features is not None and config.align_weight > 0
    out = model(x_t, t, conditions, cls=cls_t, concat=concat, return_projection=want_projection)
    velocity = F.mse_loss(out.velocity.float(), path.velocity_target(x_data, noise).float())
    total = velocity
    terms = LossTerms(total=total, velocity=velocity)
    if cls_target is not None and out.cls_velocity is not None:
        terms.cls = F.mse_loss(out.cls_velocity.float(), path.velocity_target(cls_target, cls_noise).float())
        total = total + config.cls_weight * terms.cls
    if want_projection:
        if out.projected is None:
            raise ValueError("teacher features given but the model has no alignment projector (align_dim=0)")
        terms.align = alignment_loss(out.projected, teacher_features)
        total = total + config.align_weight * terms.align
    terms.total = total
    return terms
