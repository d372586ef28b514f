"""Build what a run trains from its config: the data set, condition encoders, latent cache,
teacher and distillation, and the model itself (SiT, pix2pix, CycleGAN, embedding flow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..models.sit import MupadSiT
from .config import ConfigError, RunConfig
from .distributed import Process, barrier


def build_dataset(config: RunConfig):
    from .augment import HEDJitter, PairAugment, SourceView
    from .datasets import ManifestDataset, SlidePatchDataset

    d = config.data
    stain = HEDJitter(d.hed_scale, d.hed_shift) if (d.hed_scale or d.hed_shift) else None
    transform = PairAugment(flips=d.dihedral, rot90=d.dihedral, stain=stain) if (stain or d.dihedral) else None
    if d.source_view != "rgb":
        transform = SourceView(d.source_view, transform)
    if d.kind == "manifest":
        return ManifestDataset(config.resolve(d.manifest), split=d.split, crop_size=d.crop_px,
                               target_channels=d.target_channels, transform=transform, seed=config.seed)
    return SlidePatchDataset(
        [config.resolve(s) for s in d.slides], d.patch_px, d.mpp, d.length,
        targets=[config.resolve(s) for s in d.targets] or None, paired=d.paired, seed=config.seed,
        min_tissue=d.min_tissue, captions=d.captions or None, rna_ids=d.rna_ids or None, transform=transform,
    )


def build_encoders(config: RunConfig, device: torch.device) -> tuple[dict[str, Any], Any]:
    """Condition encoders by modality, and the RNA table's pathway scores (or None)."""
    from ..models.conditioning import build_encoder

    encoders, rna_scores = {}, None
    for modality, spec in config.conditions.items():
        options = {k: v for k, v in spec.items() if k not in ("encoder", "from", "trainable", "table", "sample_column")}
        if modality == "rna":
            from ..rna import load_gene_sets, pathway_scores, read_expression

            sets = load_gene_sets(config.resolve(spec["gene_sets"]) if "gene_sets" in spec else None)
            options.pop("gene_sets", None)
            scores = pathway_scores(read_expression(config.resolve(spec["table"])), sets)
            rna_scores = scores.scores if hasattr(scores, "scores") else scores
            encoder = build_encoder("rna", spec.get("encoder"), pathway_names=list(rna_scores.columns), **options)
        else:
            encoder = build_encoder(modality, spec.get("encoder"), **options)
        encoder = encoder.to(device)
        if not spec.get("trainable", modality == "image" and spec.get("encoder", "builtin") == "builtin"):
            encoder.requires_grad_(False)
        encoders[modality] = encoder
    return encoders, rna_scores


def build_cache(config: RunConfig, dataset, codec, teacher, process: Process, log: Callable[[str], None]):
    """The data set's latent cache (built, or resumed, on the first process; checked by all)."""
    from .latent_cache import LatentCacheDataset, build_latent_cache

    path = config.resolve(config.data.cache)
    latents = {"latent": ("target", "source")}
    if config.template == "source":
        latents["source_latent"] = "source"
    if process.main:
        log(f"latent cache {path}: encoding {len(dataset)} items (reused when complete)")
        build_latent_cache(dataset, path, codec, latents=latents, feature_encoder=teacher,
                           feature_from=("target", "source"), device=process.device, seed=config.seed,
                           progress=lambda done, total: log(f"  cache chunk {done}/{total}") if done == total else None)
    barrier(process)
    return LatentCacheDataset(path, expect_vae=codec, expect_dataset=dataset,
                              expect_feature_encoder=teacher if teacher is not None else None)


def distill_teacher_folder(config: RunConfig) -> Path:
    from ..models.checkpoint import CHECKPOINT_FILES
    from ..zoo import resolve_model

    spec = str(config.distill.teacher)
    path = config.resolve(spec)
    return resolve_model(str(path) if path.exists() else spec, CHECKPOINT_FILES)


def build_distillation(config: RunConfig, codec, device: torch.device):
    """(student, frozen teacher): both the teacher's network; the student trains from its weights."""
    from ..models.checkpoint import load_model, read_pipeline

    folder = distill_teacher_folder(config)
    pipeline = read_pipeline(folder)
    if str(pipeline["vae"]) != repr(getattr(codec, "inner", codec)) and str(pipeline["vae"]) != str(config.vae):
        raise ConfigError(f"{config.source_file}: vae {config.vae!r} differs from the teacher's {pipeline['vae']!r} "
                          f"({folder}); the student samples in the teacher's latent space")
    tasks = pipeline.get("tasks") or []
    if tasks and config.task not in tasks:
        raise ConfigError(f"{config.source_file}: task {config.task!r}, but the teacher {folder} is for {', '.join(tasks)}")
    if (pipeline.get("channels") or None) != (config.channels or None):
        raise ConfigError(f"{config.source_file}: channels {config.channels} differ from the teacher's "
                          f"{pipeline.get('channels')}")
    view = pipeline.get("source_view") or "rgb"
    if view != config.data.source_view:
        raise ConfigError(f"{config.source_file}: data.source_view is {config.data.source_view!r} but the teacher "
                          f"{folder} sees its source as {view!r}; set data.source_view: {view}")
    if pipeline.get("start") == "source":
        raise ConfigError(f"{folder}: this teacher starts its paths at its source (loss.start: source); reflow "
                          "distillation draws them from noise")
    student = load_model(folder)
    if student.config.in_channels != codec.latent_channels:
        raise ConfigError(f"{config.source_file}: the codec gives {codec.latent_channels} latent channels, the teacher "
                          f"takes {student.config.in_channels}")
    streams = sorted(student.config.condition_dims or {})
    if student.config.cls_dim or bool(student.config.concat_channels) == bool(streams):
        raise ConfigError(f"{folder}: reflow distillation takes a restaining model (spatial template, no condition "
                          "streams) or a generation model (condition streams, no template), without a CLS token")
    if streams != sorted(config.conditions):
        raise ConfigError(f"{config.source_file}: conditions {sorted(config.conditions)} differ from the teacher's "
                          f"streams {streams} ({folder}); name the teacher's conditions and encoders")
    if streams and (pipeline.get("encoders") or {}) != recorded_encoders(config):
        raise ConfigError(f"{config.source_file}: condition encoders {recorded_encoders(config)} differ from the "
                          f"teacher's {pipeline.get('encoders')} ({folder}): the pairs must be drawn from its tokens")
    teacher = load_model(folder, device=device).requires_grad_(False)
    return student, teacher


def recorded_encoders(config: RunConfig) -> dict:
    """Each stream's encoder as a checkpoint records it, to rebuild at inference (generate/roi.py
    reads it) and to check a distillation's teacher against."""
    return {m: {"name": s.get("encoder"), **{k: v for k, v in s.items() if k not in ("encoder", "from", "trainable",
                                                                                   "table")}}
            for m, s in config.conditions.items() if m != "rna"}


def build_teacher(config: RunConfig, device: torch.device):
    """The frozen teacher of the alignment and CLS losses, or None."""
    spec = config.teacher
    if spec.encoder is None:
        return None
    from ..models.teachers import load_teacher

    local = lambda p: str(config.resolve(p)) if p and config.resolve(p).exists() else p  # noqa: E731
    try:
        teacher = load_teacher(local(spec.encoder), layer=spec.layer, input_size=spec.input_size,
                               source=local(spec.source))
    except ValueError as exc:
        raise ConfigError(f"{config.source_file}: teacher: {exc}") from exc
    return teacher.to(device)


def build_model(config: RunConfig, codec, encoders: dict[str, Any], teacher=None) -> MupadSiT:
    options = dict(config.model)
    preset = options.pop("preset", None)
    if teacher is not None:
        taken = sorted({"align_dim", "cls_dim"} & set(options))
        if taken:
            raise ConfigError(f"{config.source_file}: model: {', '.join(taken)} come from the teacher; remove them")
        if config.teacher.align:
            depth = options.get("depth") or _preset_depth(preset)
            options.setdefault("align_depth", max(1, round(depth / 3)))  # REPA: block 8 of SiT-XL's 28
            options["align_dim"] = teacher.feature_dim
        else:
            options.pop("align_depth", None)
        if config.teacher.cls:
            options["cls_dim"] = teacher.pooled_dim
    channels = codec.latent_channels
    template_channels = source_channels(codec)
    condition_dims = {m: e.token_dim for m, e in encoders.items()}
    condition_tokens = {m: e.num_tokens for m, e in encoders.items() if getattr(e, "num_tokens", None)}
    kwargs = dict(in_channels=channels, concat_channels=template_channels if config.template == "source" else 0,
                  condition_dims=condition_dims, condition_tokens=condition_tokens, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            return MupadSiT.from_preset(preset, **kwargs) if preset else MupadSiT(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{config.source_file}: model: {exc}") from exc


def source_channels(codec) -> int:
    """Latent channels of an RGB source (one marker group when the target has N != 3 markers)."""
    return codec.latent_channels_for(3) if hasattr(codec, "latent_channels_for") else codec.latent_channels


def _preset_depth(preset: str | None) -> int:
    from ..models.sit import PRESETS

    return PRESETS[(preset or "B").upper().split("/")[0]][1]


def build_embedding_flow(options: dict, embed_dim: int, seed: int):
    from ..models.embedding_flow import EmbeddingFlow

    kwargs = {k: v for k, v in options.items() if k not in ("kind", "generator", "flow_steps")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EmbeddingFlow(embed_dim=embed_dim, **kwargs)


def rna_method() -> str:
    from ..rna import PATHWAY_METHOD

    return PATHWAY_METHOD
