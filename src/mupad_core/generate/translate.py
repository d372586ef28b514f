"""Domain translation by inversion and self-attention injection (fresh frozen -> FFPE).

The paper translates a frozen section into FFPE appearance with a text-conditioned model
and domain prompts ("fresh frozen" / "ffpe image"):

1. encode the section and invert it deterministically under the *source* prompt
   (`transport.samplers.invert`): the noise whose Euler trajectory ends at the section;
2. from that noise run two trajectories in lockstep: a reconstruction under the source
   prompt, and the translation under the *target* prompt;
3. while injection is on (the first `inject_steps` fraction of the steps: the strength
   knob), the target pass attends with the reconstruction's self-attention maps
   (`models.attention_control`): where things are stays the section's, how they look
   follows the target prompt.

With the same prompt both ways and guidance 0 the translation returns the input (up to the
inversion's fixed-point residual): the check that the inversion is exact enough. Any
text-conditioned model works; a region larger than the model's window is handled by the
fused windows of `generate.roi`, each window's maps injected into the same window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..models.attention_control import AttentionMapController
from ..transport.samplers import GuidedVelocity, as_schedule, invert, time_grid
from .fused import region_velocity
from .roi import RegionGenerator
from .tiled_vae import tiled_decode, tiled_encode

ProgressCallback = Callable[[int, int], None]  # (network steps done, total); may raise to cancel


@dataclass(frozen=True)
class TranslateSettings:
    source_prompt: str = "fresh frozen"
    target_prompt: str = "ffpe image"
    steps: int = 50
    guidance: float = 0.0
    inject_steps: float = 0.6  # fraction of the steps (from the noise end) with self-attention injection
    inject_blocks: tuple[int, ...] | None = None  # None: every block
    inject: str = "maps"  # "maps": the reconstruction's attention maps; "features": its attention outputs
    fixed_point_iters: int = 4

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.inject not in ("maps", "features"):
            raise ValueError(f"inject must be 'maps' or 'features', got {self.inject!r}")
        if not 0.0 <= self.inject_steps <= 1.0:
            raise ValueError(f"inject_steps must be in [0, 1], got {self.inject_steps}")
        if not self.source_prompt.strip() or not self.target_prompt.strip():
            raise ValueError("source and target prompts must not be empty")


@dataclass
class Translation:
    pixels: torch.Tensor  # (3, H, W) in [0, 1]: the section in the target domain
    reconstruction: torch.Tensor | None  # (3, H, W): the source pass's end (None when no step injected)
    network_passes: int


@torch.no_grad()
def translate_region(gen: RegionGenerator, image: np.ndarray | torch.Tensor, settings: TranslateSettings = TranslateSettings(),
                     *, progress: ProgressCallback | None = None) -> Translation:
    """Translate one RGB region (H, W, 3) uint8 or (3, H, W) float in [0, 1] to the target prompt's domain."""
    settings.check()
    if "text" not in gen.modalities:
        raise ValueError(f"{gen.model_id}: domain translation needs a text condition stream "
                         f"(the model has: {', '.join(gen.modalities) or 'none'})")
    if gen.model.config.cls_dim:
        raise ValueError(f"{gen.model_id}: inversion of a model with a CLS token is not supported yet")
    source = _as_chw(image).to(gen.device)
    height, width = source.shape[-2:]
    unit = gen.codec.downscale * gen.model.config.patch_size
    pad_h, pad_w = (-height) % unit, (-width) % unit
    padded = torch.nn.functional.pad(source[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
    latent = tiled_encode(gen.codec, padded)[None]

    d, p = gen.codec.downscale, gen.model.config.patch_size
    window = max(p, gen.window_px // d // p * p)
    overlap = min((gen.window_px // 4) // d // p * p, window - p)
    denoiser = region_velocity(gen.model, latent.shape[-2], latent.shape[-1], window, overlap, batch_size=4,
                               device=gen.device)
    source_cond = gen.conditions(text=settings.source_prompt)
    target_cond = gen.conditions(text=settings.target_prompt)
    total = 2 * settings.steps
    inverted = invert(denoiser, latent, source_cond, steps=settings.steps, guidance=settings.guidance,
                      guidance_drop=("text",), fixed_point_iters=settings.fixed_point_iters,
                      progress=None if progress is None else lambda done, _: progress(done, total))

    schedule = as_schedule(settings.guidance)
    source_velocity = GuidedVelocity(denoiser, source_cond, drop=("text",))
    target_velocity = GuidedVelocity(denoiser, target_cond, drop=("text",))
    injected = round(settings.inject_steps * settings.steps)
    controller = AttentionMapController("record", blocks=settings.inject_blocks, per_call=True,
                                        features=settings.inject == "features")
    ts = time_grid(settings.steps)
    x_source, x_target = inverted.x.clone(), inverted.x.clone()
    gen.model.set_attention_processor(controller)
    try:
        for i in range(settings.steps):
            t0, dt = float(ts[i]), float(ts[i + 1] - ts[i])
            weight = schedule(t0)
            if i < injected:
                controller.begin(i, "record", keep_maps=False)
                v_source, _ = source_velocity(x_source, None, t0, weight)
                x_source = x_source + dt * v_source
                controller.begin(i, "inject")
            else:
                controller.enabled = False
            v_target, _ = target_velocity(x_target, None, t0, weight)
            x_target = x_target + dt * v_target
            if progress is not None:
                progress(settings.steps + i + 1, total)
    finally:
        gen.model.set_attention_processor(None)
        controller.maps = {}

    def decode(x):
        return tiled_decode(gen.codec, x[0].float()).clamp(0, 1)[:, :height, :width].cpu()

    return Translation(pixels=decode(x_target),
                       reconstruction=decode(x_source) if injected == settings.steps else None,
                       network_passes=denoiser.handle.passes)


def _as_chw(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got {tuple(x.shape)}")
        return x.clamp(0, 1)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    array = array[..., :3]
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / scale
