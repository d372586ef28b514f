"""`mupad train CONFIG.yaml`: one entry point for a CPU, a GPU, or many GPUs under torchrun.

What a run guarantees:
- **Same numbers on 1 or N processes.** The global batch of step s is a fixed list of
  data indices; each process takes its share, and times, noise and condition dropout are
  drawn for the whole global batch and sliced (`training_loss(share=...)`). DDP averages
  the gradients, so N processes compute what one process with the same global batch
  computes, up to the order of float sums.
- **Exact resume.** Items depend only on (seed, epoch, index), the batch indices only on
  the step, and every other source of randomness lives in the trainer's generator,
  which is checkpointed with the weights, optimiser, scheduler and EMA. Checkpoints are
  written under a temporary name and renamed, so a crash leaves the previous one whole.
- **Nothing that looks finished before it is.** `model/` (the loadable, EMA weights with
  their pipeline description and card) is written at the end, and on every checkpoint
  as `model.partial` → `model` only when the run completes.

Logs: `metrics.csv` (one row per `log_every` steps), `loss.png`, TensorBoard when it is
installed; a progress bar with images/s (and achieved TFLOP/s on GPU).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..models.checkpoint import save_model
from ..models.conditions import Conditions
from ..models.sit import MupadSiT
from ..models.vae import codec_for
from .config import ConfigError, RunConfig
from .datasets import collate_items
from .loop import Batch, TrainConfig, Trainer
from ..models.baselines import build_cyclegan, build_pix2pix, cyclegan_loss, pix2pix_loss
from ..models.embedding_flow import embedding_flow_loss
from .distill import reflow_loss
from .vae import build_vae, calibrate_scaling, kl_weight, vae_loss

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.csv"


@dataclass
class Process:
    """Where this process sits in a (possibly distributed) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_process(device: str = "auto") -> Process:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Process(rank, world, dev)


def batch_indices(step: int, global_batch: int, length: int, seed: int) -> tuple[list[int], list[int]]:
    """(indices, epochs) of the global batch of `step`: epoch-wise permutations, seeded."""
    indices, epochs = [], []
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(position, length)
        order = np.random.default_rng([seed, epoch]).permutation(length)
        indices.append(int(order[offset]))
        epochs.append(epoch)
    return indices, epochs


class BatchMaker:
    """Turns the data set's items into the latents and conditions of one training step."""

    def __init__(self, config: RunConfig, dataset, codec, encoders: dict[str, Any], rna_scores, process: Process,
                 teacher=None):
        self.config, self.dataset, self.codec = config, dataset, codec
        self.encoders, self.rna_scores, self.process = encoders, rna_scores, process
        self.teacher = teacher
        self.cached = getattr(dataset, "latent_names", None) is not None  # a LatentCacheDataset
        if config.train.batch_size % process.world:
            raise ConfigError(
                f"{config.source_file}: train.batch_size {config.train.batch_size} is not divisible by the "
                f"{process.world} processes of this run"
            )
        self.local = config.train.batch_size // process.world

    def __call__(self, step: int, generator: torch.Generator) -> Batch:
        indices, epochs = batch_indices(step, self.config.train.batch_size, len(self.dataset), self.config.seed)
        lo = self.process.rank * self.local
        items = []
        for index, epoch in zip(indices[lo : lo + self.local], epochs[lo : lo + self.local]):
            if not self.cached:
                self.dataset.set_epoch(epoch)
            items.append(self.dataset[index])
        batch = collate_items(items)
        if self.cached:
            return self._from_cache(batch)
        device = self.process.device
        source = batch["source"].to(device)
        target = source if batch.get("target") is None else batch["target"].to(device)
        if batch.get("has_target") is not None and not bool(batch["has_target"].all()):
            target = torch.where(batch["has_target"].to(device)[:, None, None, None], target, source)
        with torch.no_grad():
            latents = self.codec.encode(target)
            concat = self.codec.encode(source) if self.config.template == "source" else None
        conditions = self._tokens(batch, source, target)
        cls, features = self._teach(target)
        return Batch(latents=latents, conditions=conditions, concat=concat, cls_target=cls, teacher_features=features)

    def _tokens(self, batch: dict[str, Any], source, target) -> Conditions | None:
        device = self.process.device
        tokens, masks = {}, {}
        for modality, encoder in self.encoders.items():
            spec = self.config.conditions[modality]
            if modality == "image":
                images = target if spec.get("from", "source") == "target" else source
                encoded = encoder.encode(images, device=device)
            elif modality == "text":
                encoded = encoder.encode(list(batch["caption"]), device=device)
            else:
                encoded = encoder.encode(self._rna(batch["rna_id"]), device=device)
            tokens[modality] = encoded.tokens
            if encoded.mask is not None:
                masks[modality] = encoded.mask
        return Conditions(tokens=tokens, masks=masks) if tokens else None

    def _from_cache(self, batch: dict[str, Any]) -> Batch:
        from ..models.teachers import cls_target

        device = self.process.device
        concat = batch["source_latent"].to(device) if self.config.template == "source" else None
        cls = features = None
        if self.teacher is not None:
            spec = self.config.teacher
            cls = cls_target(batch["features_pooled"].to(device)) if spec.cls else None
            features = batch["features"].to(device) if spec.align else None
        return Batch(latents=batch["latent"].to(device), conditions=self._tokens(batch, None, None), concat=concat,
                     cls_target=cls, teacher_features=features)

    def _teach(self, target: torch.Tensor):
        """The teacher's view of the clean target: (CLS target, patch features) as configured."""
        if self.teacher is None:
            return None, None
        from ..models.teachers import cls_target

        spec = self.config.teacher
        seen = self.teacher(target, pooled=spec.cls)
        return (cls_target(seen.pooled) if spec.cls else None), (seen.features if spec.align else None)

    def _rna(self, ids: list[str]) -> np.ndarray:
        missing = [i for i in ids if i not in self.rna_scores.index]
        if missing:
            raise ConfigError(
                f"{self.config.conditions['rna']['table']}: RNA id(s) {missing[:3]} of the data are not in the "
                f"expression table (it has {', '.join(map(str, self.rna_scores.index[:3]))}, ...)"
            )
        return self.rna_scores.loc[ids].to_numpy(np.float32)


def build_dataset(config: RunConfig):
    from .augment import HEDJitter, PairAugment
    from .datasets import ManifestDataset, SlidePatchDataset

    d = config.data
    stain = HEDJitter(d.hed_scale, d.hed_shift) if (d.hed_scale or d.hed_shift) else None
    transform = PairAugment(flips=d.dihedral, rot90=d.dihedral, stain=stain) if (stain or d.dihedral) else None
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
    _barrier(process)
    return LatentCacheDataset(path, expect_vae=codec, expect_dataset=dataset,
                              expect_feature_encoder=teacher if teacher is not None else None)


def _distill_teacher_folder(config: RunConfig) -> Path:
    from ..models.checkpoint import CHECKPOINT_FILES
    from ..zoo import resolve_model

    spec = str(config.distill.teacher)
    path = config.resolve(spec)
    return resolve_model(str(path) if path.exists() else spec, CHECKPOINT_FILES)


def build_distillation(config: RunConfig, codec, device: torch.device):
    """(student, frozen teacher): both the teacher's network; the student trains from its weights."""
    from ..models.checkpoint import load_model, read_pipeline

    folder = _distill_teacher_folder(config)
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
    student = load_model(folder)
    if student.config.in_channels != codec.latent_channels:
        raise ConfigError(f"{config.source_file}: the codec gives {codec.latent_channels} latent channels, the teacher "
                          f"takes {student.config.in_channels}")
    if not student.config.concat_channels or student.config.condition_dims or student.config.cls_dim:
        raise ConfigError(f"{folder}: reflow distillation takes a restaining model (spatial template, no condition "
                          "streams or CLS token)")
    teacher = load_model(folder, device=device).requires_grad_(False)
    return student, teacher


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
    source_channels = _source_channels(codec)
    condition_dims = {m: e.token_dim for m, e in encoders.items()}
    condition_tokens = {m: e.num_tokens for m, e in encoders.items() if getattr(e, "num_tokens", None)}
    kwargs = dict(in_channels=channels, concat_channels=source_channels if config.template == "source" else 0,
                  condition_dims=condition_dims, condition_tokens=condition_tokens, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            return MupadSiT.from_preset(preset, **kwargs) if preset else MupadSiT(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{config.source_file}: model: {exc}") from exc


def _source_channels(codec) -> int:
    """Latent channels of an RGB source (one marker group when the target has N != 3 markers)."""
    return codec.latent_channels_for(3) if hasattr(codec, "latent_channels_for") else codec.latent_channels


def _preset_depth(preset: str | None) -> int:
    from ..models.sit import PRESETS

    return PRESETS[(preset or "B").upper().split("/")[0]][1]


def _precision(config: RunConfig, device: torch.device) -> torch.dtype | None:
    wanted = config.train.precision
    if wanted == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if wanted == "bf16" else None


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    model_dir: Path | None
    history: list[dict[str, float]]
    resumed_from: int


def train(config: RunConfig, *, resume: bool = False, log: Callable[[str], None] = print,
          stop_after: int | None = None, progress_bar: bool = True) -> RunResult:
    """Run (or resume) the training `config` describes; returns where it wrote.

    `stop_after` ends the process's work after that many steps in total, as a crash
    would, but cleanly (tests, time-sliced jobs): the last checkpoint stays the resume
    point and `model/` is not written.
    """
    process = init_process(config.train.device)
    run_dir = config.run_dir
    checkpoints = run_dir / CHECKPOINTS
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ConfigError(f"{run_dir}: a run with checkpoints is already here; pass --resume to continue it "
                          "or choose another name/out_dir")
    if process.main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        stored = run_dir / "config.json"
        if stored.exists():
            previous = json.loads(stored.read_text()).get("fingerprint")
            if existing is not None and previous != config.fingerprint():
                raise ConfigError(f"{run_dir}: cannot resume: the config changed since this run started "
                                  "(only logging/checkpoint/time options may change)")
        stored.write_text(json.dumps({"fingerprint": config.fingerprint(), "config": config.as_dict(),
                                      "software": f"napari-mupad {__version__}"}, indent=2, default=str))
    _barrier(process)

    training_vae = config.task == "vae"
    kind = config.model.get("kind")
    if kind == "embedding-flow":
        codec = TokenCodec.of_generator(_generator_spec(config), process.device)
    else:
        codec = UnitRange() if training_vae else codec_for(config.vae, config.channels, device=process.device)
    dataset = build_dataset(config)
    encoders, rna_scores = build_encoders(config, process.device)
    teacher = reflow_teacher = None
    regression = kind == "pix2pix"
    if process.world > 1 and (kind in ("cyclegan", "embedding-flow") or config.distill.teacher):
        what = f"model.kind {kind}" if kind else "distillation"
        raise ConfigError(f"{config.source_file}: {what} trains in one process (no DDP)")
    if training_vae:
        model = build_vae(config)
    elif regression:  # the source is one RGB group even when the target has N marker channels
        model = build_pix2pix(config.model, _source_channels(codec), codec.latent_channels, config.seed)
    elif kind == "cyclegan":
        model = build_cyclegan(config.model, _source_channels(codec), codec.latent_channels, config.seed)
    elif kind == "embedding-flow":
        model = build_embedding_flow(config.model, codec.latent_channels, config.seed)
    elif config.distill.teacher:
        model, reflow_teacher = build_distillation(config, codec, process.device)
    else:
        teacher = build_teacher(config, process.device)
        model = build_model(config, codec, encoders, teacher)
    model = model.to(process.device)
    trainable_encoders = [e for e in encoders.values() if any(p.requires_grad for p in e.parameters())]
    net = model
    if process.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [process.device.index] if process.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    t = config.train
    trainer = Trainer(
        net,
        TrainConfig(steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                    lr_schedule=t.lr_schedule, grad_clip=t.grad_clip, ema_decay=t.ema_decay, seed=config.seed,
                    loss=config.loss),
        extra_modules=trainable_encoders,
        share=(process.rank, process.world),
        autocast=_precision(config, process.device),
        sync_grads=(lambda: _average_grads(trainable_encoders, process)) if process.world > 1 else None,
        loss_fn=(lambda net_, batch, gen: vae_loss(net_, batch.latents, kl_weight(config), gen)) if training_vae
        else (lambda net_, batch, gen: pix2pix_loss(net_, batch.concat, batch.latents)) if regression
        else (lambda net_, batch, gen: cyclegan_loss(net_, batch.concat, batch.latents,
                                                     config.model.get("cycle_weight", 10.0),
                                                     config.model.get("identity_weight", 0.5)))
        if kind == "cyclegan"
        else (lambda net_, batch, gen: embedding_flow_loss(net_, batch.concat, batch.latents, gen))
        if kind == "embedding-flow"
        else (lambda net_, batch, gen: reflow_loss(net_, reflow_teacher, batch.latents, batch.concat,
                                                   config.distill.teacher_steps, gen, config.loss.time_sampling))
        if reflow_teacher is not None else None,
    )
    resumed_from = 0
    history: list[dict[str, float]] = []
    if existing is not None:
        resumed_from = load_checkpoint(existing, trainer, model)
        history = read_metrics(run_dir, upto=resumed_from)
        log(f"resuming {run_dir.name} from step {resumed_from}")
    if process.main:
        write_metrics(run_dir, history)
    if config.data.cache:
        dataset = build_cache(config, dataset, codec, teacher, process, log if process.main else (lambda m: None))
    make_batch = BatchMaker(config, dataset, codec, encoders, rna_scores, process, teacher)
    params = sum(p.numel() for p in model.parameters())
    if process.main:
        log(f"training {config.name}: {params / 1e6:.2f} M parameters, task {config.task}, "
            f"{process.world} process(es) on {process.device}, global batch {t.batch_size}, steps {t.steps}")

    previous_seconds = history[-1].get("elapsed_s", 0.0) if history else 0.0  # training time before a resume
    bar = _progress(progress_bar and process.main, resumed_from, t.steps)
    start = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    shown_rate = None  # images/s on the progress bar
    last = resumed_from
    while trainer.step < t.steps:
        if stop_after is not None and trainer.step >= stop_after:
            break
        record = trainer.train_step(make_batch)
        record = _mean_over_processes(record, process)
        record["lr"] = trainer.scheduler.get_last_lr()[0]
        window_images += t.batch_size
        last = trainer.step
        if trainer.step % t.log_every == 0 or trainer.step == t.steps:
            elapsed = time.perf_counter() - window_start
            record["images_per_s"] = window_images / max(elapsed, 1e-9)
            record["elapsed_s"] = previous_seconds + time.perf_counter() - start
            if process.device.type == "cuda" and isinstance(model, MupadSiT):
                record["tflops"] = _training_tflops(model, make_batch, record["images_per_s"])
            window_start, window_images = time.perf_counter(), 0
            history.append(record)
            if process.main:
                append_metrics(run_dir, record)
        if bar is not None:
            bar.update(1)
            if "images_per_s" in record:  # measured over each logging window; kept between them
                shown_rate = record["images_per_s"]
            bar.set_postfix(loss=f"{record['loss_total']:.4f}", img_s=f"{shown_rate:.1f}" if shown_rate else "…")
        if trainer.step % t.checkpoint_every == 0 or trainer.step == t.steps:
            save_checkpoint(run_dir, trainer, model, encoders, config, process)
        if t.time_budget_s is not None and time.perf_counter() - start > t.time_budget_s:
            log(f"time budget of {t.time_budget_s:.0f} s reached at step {trainer.step}")
            if trainer.step % t.checkpoint_every:
                save_checkpoint(run_dir, trainer, model, encoders, config, process)
            break
    if bar is not None:
        bar.close()
    model_dir = None
    finished = trainer.step >= t.steps or (t.time_budget_s is not None and stop_after is None)
    if process.main:
        plot_loss(run_dir)
        if finished:
            model_dir = (export_vae(run_dir / "model", trainer, config, make_batch) if training_vae
                         else export_model(run_dir / "model", trainer, encoders, config, codec))
            log(f"wrote {model_dir}")
    _barrier(process)
    return RunResult(run_dir, last, model_dir, history, resumed_from)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _mean_over_processes(record: dict[str, float], process: Process) -> dict[str, float]:
    if process.world == 1:
        return record
    keys = sorted(k for k in record if k.startswith("loss_"))
    values = torch.tensor([record[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**record, **{k: float(v) / process.world for k, v in zip(keys, values)}}


def _training_tflops(model: MupadSiT, make_batch: BatchMaker, images_per_s: float) -> float:
    """Achieved TFLOP/s: ~6 FLOPs per parameter per token for forward + backward."""
    cfg = model.config
    side = make_batch.config.data.patch_px if make_batch.config.data.kind == "slides" else (
        make_batch.config.data.crop_px or 256)
    tokens = (side // make_batch.codec.downscale // cfg.patch_size) ** 2
    params = sum(p.numel() for p in model.parameters())
    return 6 * params * tokens * images_per_s / 1e12


def _average_grads(modules, process: Process) -> None:
    """Trainable condition encoders run outside the DDP wrapper (the batch maker calls
    them); their gradients are averaged here, as DDP does for the denoiser's."""
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= process.world


def _barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()


# ---------------------------------------------------------------- checkpoints and logs


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
    _barrier(process)


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
        **({"kind": config.model["kind"]} if config.model.get("kind") else {}),  # e.g. a pix2pix baseline
        **({"generator": _portable_generator(config, folder), "flow_steps": int(config.model.get("flow_steps", 8))}
           if config.model.get("kind") == "embedding-flow" else {}),
        **({"distilled_from": str(_distill_teacher_folder(config)), "teacher_steps": config.distill.teacher_steps}
           if config.distill.teacher else {}),
        "conditions": sorted(config.conditions),
        # How to rebuild each stream's encoder at inference (generate/roi.py reads this).
        "encoders": {m: {"name": s.get("encoder"), **{k: v for k, v in s.items()
                                                       if k not in ("encoder", "from", "trainable", "table")}}
                     for m, s in config.conditions.items() if m != "rna"},
        **({"rna_scoring": {"method": _rna_method(), "gene_sets": config.conditions["rna"].get("gene_sets", "bundled")}}
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
    spec = _generator_spec(config)
    path = Path(spec)
    return os.path.relpath(path, folder) if path.is_absolute() and path.exists() else spec


def _generator_spec(config: RunConfig) -> str:
    """The generator an embedding flow feeds: a folder (relative to the config) or a model id."""
    spec = str(config.model["generator"])
    path = config.resolve(spec)
    return str(path) if path.exists() else spec


def build_embedding_flow(options: dict, embed_dim: int, seed: int):
    from ..models.embedding_flow import EmbeddingFlow

    kwargs = {k: v for k, v in options.items() if k not in ("kind", "generator", "flow_steps")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EmbeddingFlow(embed_dim=embed_dim, **kwargs)


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


def _rna_method() -> str:
    from ..rna import PATHWAY_METHOD

    return PATHWAY_METHOD


def read_metrics(run_dir: Path, upto: int) -> list[dict[str, float]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    with path.open() as fh:
        rows = [{k: int(float(v)) if k == "step" else float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)]
    return [r for r in rows if r["step"] <= upto]


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Rewrite metrics.csv with `history`: rows logged after the resume point are dropped."""
    path = run_dir / METRICS_FILE
    path.unlink(missing_ok=True)
    for record in history:
        append_metrics(run_dir, record)


METRIC_COLUMNS = ("step", "loss_total", "loss_velocity", "loss_cls", "loss_align", "grad_norm", "lr",
                  "images_per_s", "tflops", "elapsed_s")


def append_metrics(run_dir: Path, record: dict[str, float]) -> None:
    """One row; columns are the usual ones plus any other loss term the objective reports (a VAE's)."""
    path = run_dir / METRICS_FILE
    extra = sorted(k for k in record if k.startswith("loss_") and k not in METRIC_COLUMNS)
    columns = list(METRIC_COLUMNS[:5]) + extra + list(METRIC_COLUMNS[5:])
    if path.exists():
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        missing = [c for c in columns if c not in header]
        if missing:
            rows = read_metrics(run_dir, upto=10**12)  # a new term: rewrite with the wider header
            columns = header + missing
            path.unlink()
            for row in rows:
                _write_row(path, columns, row)
        else:
            columns = header
    _write_row(path, columns, record)
    _log_tensorboard(run_dir, record)


def _write_row(path: Path, columns: list[str], record: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: record.get(k, "") for k in columns})


def _log_tensorboard(run_dir: Path, record: dict[str, float]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional
    except ImportError:
        return
    with SummaryWriter(str(run_dir / "tensorboard")) as tb:
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                tb.add_scalar(key, value, int(record["step"]))


def plot_loss(run_dir: Path) -> Path | None:
    rows = read_metrics(run_dir, upto=10**12)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in rows]
    terms = [k for k in rows[-1] if k.startswith("loss_")]
    for key in terms:
        values = [r.get(key) for r in rows]
        if key == "loss_align":  # a negative cosine: plotted as 1 + it, on the log axis with the others
            values = [None if v is None else 1 + v for v in values]
            key = "1+loss_align"
        if any(v is not None for v in values) and not (key == "loss_velocity" and len(terms) == 2):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=key.removeprefix("loss_"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run_dir.name)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


MODEL_CARD = """# {name}

A MUPAD denoiser (SiT with Decoupled Cross-Attention) trained by `mupad train` for
{steps} steps on the task `{task}` (napari-mupad {software}). Its training config is in
the run folder's `config.json`; its metrics are in `metrics.csv`.

Generated images are not for diagnosis.
"""
