"""What a run leaves on disk: atomic checkpoints for exact resume, and the finished, loadable
`model/` folder (weights, pipeline description, model card), written as `model.partial` first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..models.checkpoint import save_model
from ..models.sit import MupadSiT
from .config import ConfigError, RunConfig
from .loop import Trainer
from .vae import calibrate_scaling
from .builders import recorded_encoders, rna_method
from .distributed import Process, barrier


CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")) if folder.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, trainer: Trainer, model: MupadSiT, encoders, config: RunConfig,
                    process: Process) -> None:
    if process.main:
        final = run_dir / CHECKPOINTS / f"step_{trainer.step:08d}"
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_model(model, partial / "model")
        torch.save(trainer.state_dict(), partial / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        kept = sorted(p for p in (run_dir / CHECKPOINTS).glob("step_*") if not p.name.endswith(".partial"))
        for old in kept[: -max(config.train.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(process)


def load_checkpoint(folder: Path, trainer: Trainer, model: MupadSiT) -> int:
    from safetensors.torch import load_file

    from ..models.checkpoint import CheckpointError, check_state_dict, weights_file

    weights = weights_file(folder / "model")
    state = load_file(str(weights))
    check_state_dict(model, state, weights)
    model.load_state_dict(state)
    try:
        trainer_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(f"{folder / STATE_FILE}: cannot read the trainer state ({exc})") from exc
    trainer.load_state_dict(trainer_state)
    return trainer.step


def export_model(folder: Path, trainer: Trainer, encoders, config: RunConfig, codec) -> Path:
    """The run's result as a loadable MUPAD model folder (EMA weights when kept)."""
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    window_px = config.data.patch_px if config.data.kind == "slides" else (config.data.crop_px or 256)
    vae = config.vae if not str(config.vae).startswith("pixel-unshuffle") else repr(getattr(codec, "inner", codec))
    pipeline = {
        "vae": codec.vae if isinstance(codec, TokenCodec) else vae,  # a flow: its generator's codec
        "tasks": [config.task],
        "template": config.template,
        **({"source_view": config.data.source_view} if config.data.source_view != "rgb" else {}),
        # The sampler starts where training's paths started (transport/path.py: source_start).
        **({"start": "source", "start_noise": config.loss.start_noise} if config.loss.start == "source" else {}),
        **({"kind": config.model["kind"]} if config.model.get("kind") else {}),  # e.g. a pix2pix baseline
        **({"generator": _portable_generator(config, folder), "flow_steps": int(config.model.get("flow_steps", 8))}
           if config.model.get("kind") == "embedding-flow" else {}),
        # The teacher as the config names it (a model id, or a folder relative to the config).
        **({"distilled_from": str(config.distill.teacher), "teacher_steps": config.distill.teacher_steps}
           if config.distill.teacher else {}),
        **({"steps": config.distill.student_steps} if config.distill.teacher and config.distill.student_steps else {}),
        # A guidance-distilled student samples unguided: one pass a step (train/distill.py).
        **({"guidance": 0.0, "distilled_guidance": config.distill.teacher_guidance}
           if config.distill.teacher and config.distill.teacher_guidance else {}),
        "conditions": sorted(config.conditions),
        "encoders": recorded_encoders(config),
        **({"rna_scoring": {"method": rna_method(), "gene_sets": config.conditions["rna"].get("gene_sets", "bundled")}}
           if "rna" in config.conditions else {}),
        "window_px": window_px,
        # The builtin image encoder learnt from whole training crops: references are resized to that size.
        **({"image_px": window_px} if "image" in config.conditions else {}),
        "mpp": config.data.mpp,
        # A CLS model generates the teacher's embedding alongside the image (its dimension is in config.json).
        **({"teacher": {k: v for k, v in vars(config.teacher).items() if v is not None}}
           if config.teacher.encoder else {}),
        "trained_steps": trainer.step,
        **({"channels": config.channels, "colors": config.channel_colors} if config.channels else {}),
        "config_fingerprint": config.fingerprint(),
    }
    network = trainer.averaged_model()
    if config.model.get("kind") == "cyclegan":
        network = network.g_ab  # the source->target translator; the rest only served training
    save_model(network, partial, pipeline=pipeline, card=MODEL_CARD.format(
        name=config.name, task=config.task, steps=trainer.step, software=__version__))
    for modality, encoder in encoders.items():
        if modality == "image" and any(True for _ in encoder.parameters()):
            save_file({k: v.contiguous() for k, v in encoder.state_dict().items()},
                      str(partial / f"{modality}_encoder.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def _portable_generator(config: RunConfig, folder: Path) -> str:
    """The generator as the flow folder records it: a model id, or a path relative to that folder
    (moving or sharing the two folders together keeps the pair working)."""
    spec = generator_spec(config)
    path = Path(spec)
    return os.path.relpath(path, folder) if path.is_absolute() and path.exists() else spec


def generator_spec(config: RunConfig) -> str:
    """The generator an embedding flow feeds: a folder (relative to the config) or a model id."""
    spec = str(config.model["generator"])
    path = config.resolve(spec)
    return str(path) if path.exists() else spec


class TokenCodec:
    """The 'codec' of an embedding-flow run: images to the generator's image tokens (frozen).

    Images are resized to the size the generator's encoder learnt at, as at inference."""

    downscale = 1

    def __init__(self, encoder, image_px: int | None, vae: str | None = None):
        self.encoder, self.image_px = encoder.eval().requires_grad_(False), image_px
        self.latent_channels = int(encoder.token_dim)
        self.vae = vae  # the generator's latent codec, recorded with the flow

    @property
    def identity(self) -> str:
        from .latent_cache import encoder_identity

        return f"tokens:{encoder_identity(self.encoder)}:{self.image_px}"

    @classmethod
    def of_generator(cls, spec: str, device) -> TokenCodec:
        from ..generate.roi import load_generator

        from ..models.checkpoint import CHECKPOINT_FILES, read_pipeline
        from ..zoo import resolve_model

        gen = load_generator(spec, device=device, allow_template=True)
        if "image" not in gen.encoders:
            raise ConfigError(f"{spec}: the generator has no image stream; an embedding flow needs one")
        return cls(gen.encoders["image"], gen.image_px, read_pipeline(resolve_model(spec, CHECKPOINT_FILES))["vae"])

    @torch.no_grad()
    def encode(self, images, generator=None):
        patch = getattr(self.encoder, "patch_size", 1)
        if self.image_px and not hasattr(self.encoder, "input_size"):
            size = max(patch, self.image_px // patch * patch)
            if images.shape[-1] != size or images.shape[-2] != size:
                images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                                         align_corners=False).clamp(0, 1)
        return self.encoder.encode(images).tokens


class UnitRange:
    """The 'codec' of a VAE run: images in [0, 1] to the [-1, 1] the autoencoder learns on."""

    latent_channels = 3
    downscale = 1
    identity = "unit-range"

    def encode(self, images, generator=None):
        return images * 2 - 1


def export_vae(folder: Path, trainer: Trainer, config: RunConfig, make_batch) -> Path:
    """The averaged AutoencoderKL as a diffusers folder, its scaling factor calibrated on a batch."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = trainer.averaged_model().eval()
    batch = make_batch(0, torch.Generator().manual_seed(config.seed))
    scale = calibrate_scaling(model, batch.latents)
    pipeline = {"vae": "self", "kind": "vae", "tasks": ["vae"], "scaling_factor": scale,
                "window_px": config.data.patch_px if config.data.kind == "slides" else (config.data.crop_px or 256),
                "mpp": config.data.mpp, "trained_steps": trainer.step, "config_fingerprint": config.fingerprint()}
    save_model(model, partial, pipeline=pipeline, card=VAE_CARD.format(name=config.name, steps=trainer.step,
                                                                      software=__version__))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


VAE_CARD = """# {name}

A diffusers AutoencoderKL trained by napari-mupad's `mupad train` (task vae) for {steps} steps
({software}). Use it as the latent codec of a denoiser config: `vae: <this folder>`.
"""


MODEL_CARD = """# {name}

A MUPAD denoiser (SiT with Decoupled Cross-Attention) trained by `mupad train` for
{steps} steps on the task `{task}` (napari-mupad {software}). Its training config is in
the run folder's `config.json`; its metrics are in `metrics.csv`.

Generated images are not for diagnosis.
"""
