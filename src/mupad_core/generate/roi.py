"""Generate tissue for one region from noise, conditioned on text, RNA pathway scores or an image.

Unlike `engine.run_stain` (a source slide in, its restained version out), this samples a
region that has no source: a MupadSiT without a spatial template, queried with `Conditions`
from the encoders its checkpoint names. A region larger than the model's window is sampled
as overlapping windows whose velocities are fused with raised-cosine weights at every step
(the same `fusion.window_grid` / `ramp_weights` the whole-slide engine uses), so the samplers
of `transport.samplers` run unchanged on the whole region.

Checkpoint conventions (in ``mupad_pipeline.json``, beside ``vae``):
``"encoders": {"text": {"name": "minilm"}, "image": {"name": "builtin", "token_dim": 32, ...}}``
names each condition stream's encoder (registry key, hub id or folder, plus its keyword
arguments; default: `build_encoder`'s default for the modality); trained weights of an
encoder, where it has its own (the builtin CNN), sit beside the model as
``<modality>_encoder.safetensors``. ``"window_px"`` is the tile size the model was trained on
(default 256) and ``"image_px"`` the size reference images are resized to for the builtin
image encoder (default 224).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..models.conditions import Conditions
from ..transport.samplers import sample
from .canvas import GlobalNoise
from .fused import region_velocity, window_cls_noise
from .handles import load_encoders
from .tiled_vae import tiled_decode

ProgressCallback = Callable[[int, int], None]  # (steps done, total); may raise to cancel


@dataclass
class RegionGenerator:
    """A token-conditioned MupadSiT with its latent codec and condition encoders."""

    model: Any
    codec: Any
    encoders: dict[str, Any] = field(default_factory=dict)
    model_id: str = "unnamed"
    weights_hash: str = "none"
    window_px: int = 256
    image_px: int = 224
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.model.config.condition_dims or {})

    @torch.no_grad()
    def conditions(self, text: str | None = None, rna: Any = None, image: np.ndarray | torch.Tensor | None = None
                   ) -> Conditions:
        """Conditions for one sample from what is given; a modality not given is simply absent.

        text: a prompt. rna: (P,) / (1, P) pathway scores or a one-row DataFrame (see
        `mupad_core.rna.pathways.pathway_scores`). image: a reference RGB region, (H, W, 3)
        uint8 or float in [0, 1].
        """
        given = {"text": text, "rna": rna, "image": image}
        tokens, masks = {}, {}
        for name, value in given.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if name not in self.encoders:
                have = ", ".join(self.modalities) or "none"
                raise ValueError(f"{self.model_id}: model has no '{name}' condition stream (it has: {have})")
            encoder = self.encoders[name]
            if name == "image":
                value = self._image_input(value)
            encoded = encoder.encode(value, device=self.device)
            tokens[name] = encoded.tokens
            if encoded.mask is not None:
                masks[name] = encoded.mask
        return Conditions(tokens=tokens, masks=masks)

    def _image_input(self, image) -> torch.Tensor:
        from ..models.conditioning import images_to_tensor

        x = images_to_tensor(image if isinstance(image, torch.Tensor) else np.asarray(image))
        encoder = self.encoders["image"]
        # The builtin CNN and the latent encoder take references at the size they learnt at.
        unit = encoder.patch_size if getattr(encoder, "patch_size", None) else 8 if getattr(encoder, "takes_latents",
                                                                                           False) else None
        if unit and not hasattr(encoder, "input_size"):
            size = max(unit, self.image_px // unit * unit)
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return x

    def generate(self, height: int, width: int, conditions: Conditions | None = None, *, steps: int = 20,
                 method: str = "euler", guidance: float = 0.0, seed: int = 0, overlap_px: int | None = None,
                 batch_size: int = 8, progress: ProgressCallback | None = None) -> torch.Tensor:
        """Pixels (C, height, width) in [0, 1] sampled from noise (seeded) under `conditions`."""
        return generate_region(self, height, width, conditions, steps=steps, method=method, guidance=guidance,
                               seed=seed, overlap_px=overlap_px, batch_size=batch_size, progress=progress)


def generate_region(gen: RegionGenerator, height: int, width: int, conditions: Conditions | None = None, *,
                    steps: int = 20, method: str = "euler", guidance: float = 0.0, seed: int = 0,
                    overlap_px: int | None = None, batch_size: int = 8,
                    progress: ProgressCallback | None = None) -> torch.Tensor:
    """Sample a (height, width) region; windows of `gen.window_px` fused where it is larger."""
    if height < 1 or width < 1:
        raise ValueError(f"region size must be positive, got {height} x {width}")
    d, p = gen.codec.downscale, gen.model.config.patch_size
    unit = d * p
    hl, wl = math.ceil(height / unit) * p, math.ceil(width / unit) * p  # latent size, whole patches
    window = max(p, gen.window_px // d // p * p)
    overlap = (overlap_px if overlap_px is not None else gen.window_px // 4) // d // p * p
    overlap = min(overlap, window - p)
    fused = region_velocity(gen.model, hl, wl, window, overlap, batch_size=batch_size, device=gen.device)
    # The engine's noise: a function of seed and latent position (CLS: of the window's position).
    field = GlobalNoise(seed, gen.model.config.in_channels)
    noise = field.window(0, 0, hl, wl, step=0)[None].to(gen.device)
    cls_dim = fused.handle.cls_dim
    cls = (torch.stack([window_cls_noise(seed, w.y, w.x, cls_dim) for w in fused.windows]).to(gen.device)
           if cls_dim else None)

    def sde_noise(step: int, shape: tuple) -> torch.Tensor:
        if cls is not None and tuple(shape) == tuple(cls.shape):
            return torch.stack([window_cls_noise(seed, w.y, w.x, cls_dim, step + 1) for w in fused.windows])
        return field.window(0, 0, hl, wl, step=step + 1)[None]

    cond = None if conditions is None or not conditions.tokens else conditions.to(gen.device)
    result = sample(fused, noise, cond, method=method, steps=steps, guidance=guidance, cls_noise=cls,
                    sde_noise=sde_noise, progress=progress)
    pixels = tiled_decode(gen.codec, result.x[0].float()).clamp(0, 1).cpu()
    return pixels[:, :height, :width]


def load_generator(spec: str | Path, device: str = "cpu", allow_template: bool = False) -> RegionGenerator:
    """A checkpoint folder or hub id with condition streams and no spatial template
    (`allow_template`: also a restaining model, for measurements that pass the template)."""
    from ..models.checkpoint import CHECKPOINT_FILES, load_model, read_pipeline, weights_sha256
    from ..models.vae import codec_for

    from ..zoo import resolve_model

    folder = resolve_model(spec, CHECKPOINT_FILES)  # a bundled id, a folder or a hub id
    pipeline = read_pipeline(folder)
    model = load_model(folder, device=device)
    if model.config.concat_channels and not allow_template:
        raise ValueError(f"{folder}: this model restains a source image (spatial template); "
                         "use it with the virtual-stain widget or `mupad stain`, not for generation from noise")
    encoders = load_encoders(folder, pipeline, model, device)
    codec = codec_for(pipeline["vae"], pipeline.get("channels"), device=device)
    return RegionGenerator(model=model, codec=codec, encoders=encoders, model_id=str(spec), weights_hash=weights_sha256(folder),
                           window_px=int(pipeline.get("window_px", 256)), image_px=int(pipeline.get("image_px", 224)),
                           device=torch.device(device))


def condition_from(gen: RegionGenerator, kind: str, value: Any) -> tuple[Conditions, dict]:
    """Conditions and their provenance record for one kind of input, as the CLI and the plugin take it.

    kind "text": a prompt. "rna": (expression table path, sample/spot id or None for a
    one-sample table), scored on the bundled pathways. "image": a reference RGB region
    (H, W, 3). "none": unconditional.
    """
    if kind == "none":
        return Conditions(tokens={}, masks={}), {"kind": "none"}
    if kind == "text":
        if not str(value or "").strip():
            raise ValueError("empty text prompt")
        return gen.conditions(text=str(value)), {"kind": "text", "text": str(value)}
    if kind == "rna":
        from ..rna.pathways import pathway_scores

        table, sample_id = value
        scored = pathway_scores(table, sample=sample_id or None)
        if len(scored.scores) != 1:
            raise ValueError(f"{table}: {len(scored.scores)} samples; give the one sample/spot id to use")
        record = {"kind": "rna", "table": str(table), "sample": str(scored.scores.index[0]),
                  "pathway_method": scored.method, "genes_matched": scored.report.n_matched}
        return gen.conditions(rna=scored.scores), record
    if kind == "image":
        return gen.conditions(image=np.asarray(value)), {"kind": "image"}
    raise ValueError(f"condition kind must be text, rna, image or none, got {kind!r}")


def generate_samples(gen: RegionGenerator, height: int, width: int, conditions: Conditions | None, *, samples: int = 1,
                     seed: int = 0, progress: ProgressCallback | None = None, **sampling) -> torch.Tensor:
    """(K, C, height, width) samples under one condition, seeds `uncertainty.sample_seeds(seed, K)`;
    progress counts steps over all samples."""
    from .uncertainty import sample_seeds

    drawn = []
    for k, sample_seed in enumerate(sample_seeds(seed, samples)):
        def step(done, total, k=k):
            if progress is not None:
                progress(k * total + done, total * samples)

        drawn.append(gen.generate(height, width, conditions, seed=sample_seed, progress=step, **sampling))
    return torch.stack(drawn)


def generate_to_omezarr(gen: RegionGenerator, out_path: str | Path, height: int, width: int,
                        conditions: Conditions | None, condition_record: dict, *, mpp: float | None,
                        origin: tuple[float, float] | None = None, samples: int = 1, seed: int = 0, steps: int = 20,
                        guidance: float = 0.0, overwrite: bool = False, progress: ProgressCallback | None = None,
                        source: dict | None = None) -> list[Path]:
    """Generate one region into an OME-Zarr (the mean of `samples`; with more than one, their
    spread beside it as NAME.spread.ome.zarr). Returns the stores written."""
    from ..store import PyramidWriter, spread_path
    from .uncertainty import mean_and_spread

    out_path = Path(out_path)
    for path in (out_path, spread_path(out_path)) if samples > 1 else (out_path,):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite to replace it")
    drawn = generate_samples(gen, height, width, conditions, samples=samples, seed=seed, steps=steps,
                             guidance=guidance, progress=progress)
    mean, spread = mean_and_spread(drawn, one_channel=True)
    provenance = generation_provenance(gen, "generate", condition_record, seed=seed, steps=steps, guidance=guidance,
                                       samples=samples, **({"source": source} if source else {}))
    common = dict(mpp=None if mpp is None else (mpp, mpp), overwrite=overwrite, origin=origin)
    written = []
    if samples > 1:  # the spread first: a finished mean always has its spread
        writer = PyramidWriter(spread_path(out_path), (height, width), 1, kind="fluorescence",
                               channel_names=["spread"], channel_colors=["FF00FF"],
                               provenance={**provenance, "spread_of": out_path.name,
                                           "statistic": f"per-pixel standard deviation over {samples} samples, x2"},
                               **common)
        writer.write_tile(0, 0, _to_uint8(spread))
        written.append(writer.finalize())
    writer = PyramidWriter(out_path, (height, width), 3, provenance=provenance, **common)
    writer.write_tile(0, 0, _to_uint8(mean))
    written.insert(0, writer.finalize())
    return written


def generation_provenance(gen: RegionGenerator, task: str, condition: dict, *, seed: int | None = None, steps: int,
                          guidance: float, samples: int = 1, **extra) -> dict:
    """What a generated region records about its making; one definition for the CLI, the
    stores and the napari layers (which keep it in their metadata until exported)."""
    from .. import __version__
    from ..store.omezarr import NOTICE
    from .uncertainty import sample_seeds

    record = {"model_id": gen.model_id, "weights_hash": gen.weights_hash, "task": task, "condition": condition}
    if seed is not None:
        record.update(seed=seed, sample_seeds=sample_seeds(seed, samples))
    record.update(steps=steps, guidance=guidance, samples=samples, **extra,
                  software=f"napari-mupad {__version__}", generated=True, not_for_diagnosis=True, notice=NOTICE)
    return record


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
