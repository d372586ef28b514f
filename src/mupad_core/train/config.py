"""`mupad train` configuration: one YAML file, typed sections, every mistake named.

A run is described completely by its config (plus the data it points to), so the
config is copied into the run folder and a resume refuses a changed one. Sections:

    name: he-variations            # run folder name under `out_dir`
    out_dir: runs
    seed: 0
    task: he2he                    # what the model learns (recorded for `mupad models`)
    vae: pixel-unshuffle:4         # latent codec: a diffusers VAE folder / hub id, or pixel-unshuffle:F
    model: {hidden_size: 64, depth: 2, num_heads: 4}   # MupadSiT arguments (or preset: B)
    template: null                 # "source": source latent concatenated with the noisy target
    conditions:                    # one stream per modality the model attends to
      image: {encoder: builtin, from: source, trainable: true, token_dim: 64}
      text: {encoder: minilm}
      rna: {table: expression.csv}
    data: {kind: slides, slides: [a.svs], patch_px: 64, mpp: 1.0}   # or kind: manifest
    train: {steps: 1000, batch_size: 32, lr: 1e-4, ...}              # TrainConfig + run options
    loss: {time_sampling: logit_normal, condition_dropout: 0.1, cls_weight: 0.03, align_weight: 0.5}
    teacher: {encoder: inception, input_size: 150, align: true, cls: true}   # frozen teacher of the
                                   # alignment + CLS losses: inception (offline) or uni / a hub id / a folder

Paths are relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..transport.loss import LossConfig

TASKS = ("he2he", "text2he", "rna2he", "he2ihc", "he2mif", "ff2ffpe", "image2image", "vae")
MODALITIES = ("image", "text", "rna")


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key."""


@dataclass
class DataConfig:
    kind: str = "slides"  # slides | manifest
    # kind: slides (patches drawn on the fly inside the tissue mask)
    slides: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # registered target slides (paired) or a pool (unpaired)
    paired: bool = True
    patch_px: int = 256
    mpp: float = 0.5  # µm/px of the training images (slides: patches are read at it); stains run at it
    length: int = 100_000  # items per epoch
    min_tissue: float = 0.5
    captions: list[str] = field(default_factory=list)  # one per slide
    rna_ids: list[str] = field(default_factory=list)  # one per slide
    # kind: manifest (CSV/Parquet of image paths, see train/datasets.py)
    manifest: str | None = None
    split: str = "train"
    crop_px: int | None = None
    target_channels: str | None = None  # "native" for multi-channel targets (mIF)
    # augmentation (both kinds)
    hed_scale: float = 0.0  # H&E stain jitter on the source (HED scale half-width, e.g. 0.05); 0 = off
    hed_shift: float = 0.0  # HED shift half-width (e.g. 0.01)
    dihedral: bool = True  # flips and 90-degree turns, the same for source and target
    # What the model sees of the source (slide/stains.py), in training and at inference:
    # "rgb" (as read) or "haematoxylin" (the haematoxylin alone: H&E and IHC look alike).
    source_view: str = "rgb"
    # A zarr cache of the items' latents and teacher features (train/latent_cache.py), built on
    # the first run and reused: long runs skip the frozen VAE and teacher. Each item is cached
    # as epoch 0 draws it (its crop and augmentation are frozen); size the data set with `length`.
    cache: str | None = None


@dataclass
class TeacherConfig:
    """The frozen encoder whose view of the clean target teaches the denoiser (models/teachers.py)."""

    encoder: str | None = None  # inception | an image-encoder registry key (uni, uni2-h, ...) | hub id | folder
    source: str | None = None  # a local folder for a registry model
    input_size: int | None = None  # the teacher's input side (inception default 299)
    layer: str | None = None  # inception block giving the patch features (default mixed_7)
    align: bool = True  # alignment loss: projected block `model.align_depth` -> patch features
    cls: bool = True  # CLS loss: the denoiser also generates the teacher's global embedding


@dataclass
class DistillConfig:
    """Reflow distillation (train/distill.py): a few-step student of a trained denoiser."""

    teacher: str | None = None  # a model folder (relative to the config) or id; the student starts from it
    teacher_steps: int = 16  # Euler passes of the teacher's ODE per training pair
    # The step count the student is made for: recorded as the model's own (`steps` in its
    # pipeline), where `mupad stain` and the widget start. None: the engine's default.
    student_steps: int | None = None
    # A generation model's teacher is sampled with this classifier-free guidance; the student
    # learns the guided trajectory and records guidance 0 as its own (one pass a step).
    teacher_guidance: float = 0.0


@dataclass
class RunOptions:
    steps: int = 1000
    batch_size: int = 32  # global: split over the processes of a torchrun
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float | None = 0.9999
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: no sample grids during training
    time_budget_s: float | None = None


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    task: str = "he2he"
    vae: str = "pixel-unshuffle:4"
    model: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "depth": 2, "num_heads": 4})
    template: str | None = None  # "source"
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    channels: list[str] | None = None  # names of the output channels (mIF markers): a fluorescence output
    channel_colors: list[str] | None = None  # RRGGBB per channel, for viewers
    data: DataConfig = field(default_factory=DataConfig)
    train: RunOptions = field(default_factory=RunOptions)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    source_file: str | None = None  # where it was read from (not part of the identity)

    @property
    def base_dir(self) -> Path:
        return Path(self.source_file).parent if self.source_file else Path.cwd()

    def resolve(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.out_dir) / self.name

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source_file")
        return out

    def fingerprint(self) -> str:
        """Identity of what the run computes; options that do not change results are left out."""
        identity = self.as_dict()
        for key in ("checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "time_budget_s", "device"):
            identity["train"].pop(key)
        identity.pop("out_dir")
        if identity["teacher"]["encoder"] is None:
            identity.pop("teacher")  # runs from before teachers existed keep their fingerprint
        if identity["distill"]["teacher"] is None:
            identity.pop("distill")
        elif not identity["distill"].get("teacher_guidance"):
            identity["distill"].pop("teacher_guidance", None)  # students from before guidance distillation
        if identity["data"]["cache"] is None:
            identity["data"].pop("cache")  # likewise for runs from before latent caches were wired
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**values)


def parse_config(values: dict[str, Any], source: str = "<config>") -> RunConfig:
    values = dict(values or {})
    sections = {
        "data": DataConfig,
        "train": RunOptions,
        "loss": LossConfig,
        "teacher": TeacherConfig,
        "distill": DistillConfig,
    }
    built = {k: _build(c, values.pop(k, {}) or {}, f"{source}: {k}") for k, c in sections.items()}
    config = _build(RunConfig, values, source)
    for key, value in built.items():
        setattr(config, key, value)
    config.source_file = source if source != "<config>" else None
    check_config(config, source)
    return config


def load_config(path: str | Path) -> RunConfig:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    return parse_config(values or {}, str(path))


def check_config(config: RunConfig, source: str) -> None:
    def bad(key: str, problem: str):
        raise ConfigError(f"{source}: {key}: {problem}")

    if config.task not in TASKS:
        bad("task", f"{config.task!r} is not one of {', '.join(TASKS)}")
    if config.template not in (None, "source"):
        bad("template", f"must be null or 'source', got {config.template!r}")
    from ..slide.stains import SOURCE_VIEWS

    if config.data.source_view not in SOURCE_VIEWS:
        bad("data.source_view", f"unknown view {config.data.source_view!r}; choose one of {', '.join(SOURCE_VIEWS)}")
    for modality, spec in config.conditions.items():
        if modality not in MODALITIES:
            bad("conditions", f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
        if not isinstance(spec, dict):
            bad(f"conditions.{modality}", "expected a mapping such as {encoder: builtin}")
    kind = config.model.get("kind") if isinstance(config.model, dict) else None
    if kind not in (None, "pix2pix", "cyclegan", "embedding-flow"):
        bad("model.kind", f"{kind!r} is not a model kind; choose pix2pix, cyclegan or embedding-flow "
                          "(or leave it out: MUPAD SiT)")
    if kind == "embedding-flow" and not config.model.get("generator"):
        bad("model.generator", "an embedding flow translates tokens for a generator: name its model "
                               "(a folder or id of an image-stream model trained on target images)")
    if kind == "cyclegan" and config.train.batch_size < 2:
        bad("train.batch_size", "cyclegan pairs each source with another item's target: it needs at least 2")
    if kind and (config.template != "source" or config.conditions):
        bad("model.kind", f"{kind} maps the source to the target: it needs `template: source` and no conditions")
    if config.loss.start not in ("noise", "source"):
        bad("loss.start", f"must be 'noise' or 'source', got {config.loss.start!r}")
    if config.loss.start == "source":
        if config.template != "source" or kind:
            bad("loss.start", "'source' starts the path at the spatial template: it needs `template: source` and a "
                              "MUPAD SiT (no model.kind)")
        if not config.loss.start_noise > 0:
            bad("loss.start_noise", f"must be > 0 (the path needs some noise to sample), got {config.loss.start_noise}")
        if config.distill.teacher is not None:
            bad("loss.start", "reflow distillation starts from noise; distil a model that does (loss.start: noise)")
    if config.task == "vae" and (config.conditions or config.template):
        bad("conditions", "task vae trains a latent codec: it takes no conditions and no template")
    if "rna" in config.conditions and "table" not in config.conditions["rna"]:
        bad("conditions.rna", "needs `table:` (an expression CSV/TSV or .h5ad whose sample ids the data rows name)")
    teacher = config.teacher
    if teacher.encoder is not None:
        if config.task == "vae" or (isinstance(config.model, dict) and config.model.get("kind")):
            bad("teacher", "the representation losses train a MUPAD denoiser; remove `teacher:` for this model")
        if not (teacher.align or teacher.cls):
            bad("teacher", "align and cls are both false: the teacher would teach nothing")
        if teacher.align and config.loss.align_weight <= 0:
            bad("loss.align_weight", "must be > 0 when the teacher aligns (or set teacher.align: false)")
        if config.channels and len(config.channels) != 3:
            bad("teacher", f"the teacher sees RGB images; a {len(config.channels)}-marker target cannot be shown to it")
        if teacher.cls and config.loss.cls_weight <= 0:
            bad("loss.cls_weight", "must be > 0 when the teacher gives a CLS target (or set teacher.cls: false)")
    elif any(k in (config.model or {}) for k in ("align_depth", "align_dim", "cls_dim")):
        bad("model", "align_depth/align_dim/cls_dim come from a `teacher:` section; add one (e.g. encoder: inception)")
    if config.distill.teacher is not None:
        restaining = config.template == "source" and not config.conditions
        generating = config.template is None and bool(config.conditions)
        if not (restaining or generating) or kind or config.teacher.encoder:
            bad("distill", "reflow distillation takes a restaining model (template: source, no condition streams) "
                           "or a generation model (no template, condition streams), with no model.kind and no "
                           "teacher: section")
        if config.distill.teacher_guidance < 0:
            bad("distill.teacher_guidance", f"must be at least 0, got {config.distill.teacher_guidance}")
        if config.distill.teacher_guidance and not config.conditions:
            bad("distill.teacher_guidance", "guidance needs condition streams to switch off; this model has none")
        if {k for k in config.model if k != "kind"} - {"hidden_size", "depth", "num_heads"} or kind:
            bad("model", "a distilled student keeps its teacher's architecture; leave model: out")
        if config.distill.teacher_steps < 1:
            bad("distill.teacher_steps", f"must be at least 1, got {config.distill.teacher_steps}")
        if config.distill.student_steps is not None and config.distill.student_steps < 1:
            bad("distill.student_steps", f"must be at least 1, got {config.distill.student_steps}")
    t = config.train
    if t.steps < 1:
        bad("train.steps", f"must be at least 1, got {t.steps}")
    if t.batch_size < 1:
        bad("train.batch_size", f"must be at least 1, got {t.batch_size}")
    if t.precision not in ("auto", "bf16", "fp32"):
        bad("train.precision", f"must be auto, bf16 or fp32, got {t.precision!r}")
    if t.checkpoint_every < 1:
        bad("train.checkpoint_every", f"must be at least 1, got {t.checkpoint_every}")
    d = config.data
    if d.kind not in ("slides", "manifest"):
        bad("data.kind", f"must be 'slides' or 'manifest', got {d.kind!r}")
    if d.kind == "slides" and not d.slides:
        bad("data.slides", "kind 'slides' needs at least one slide")
    image = config.conditions.get("image") or {}
    if image.get("encoder") == "latent" and str(image.get("codec", "taef2")) != str(config.vae):
        bad("conditions.image.codec", f"the latent encoder reads {image.get('codec', 'taef2')!r} latents but the model's "
                                      f"vae is {config.vae!r}; set codec: {config.vae}")
    if d.cache and image and image.get("encoder") != "latent":
        bad("data.cache", "the image condition encodes pixels at every step, which a latent cache does not keep; "
                          "train without a cache, use the latent encoder (encoder: latent), or condition on text/RNA only")
    if d.kind == "manifest" and not d.manifest:
        bad("data.manifest", "kind 'manifest' needs the manifest path")
