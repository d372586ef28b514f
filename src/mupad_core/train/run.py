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

This file is the loop; beside it: `builders.py` (data, encoders, cache, teacher, model),
`checkpoints.py` (resume and the finished `model/`), `metrics.py` (logs), `distributed.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..models.conditions import Conditions
from ..models.sit import MupadSiT
from ..models.vae import codec_for
from .config import ConfigError, RunConfig
from .datasets import collate_items
from .loop import Batch, TrainConfig, Trainer
from ..models.baselines import build_cyclegan, build_pix2pix, cyclegan_loss, pix2pix_loss
from ..models.embedding_flow import embedding_flow_loss
from .distill import reflow_loss
from .vae import build_vae, kl_weight, vae_loss
from .builders import (build_cache, build_dataset, build_distillation, build_embedding_flow, build_encoders,
                       build_model, build_teacher, source_channels)
from .checkpoints import (CHECKPOINTS, TokenCodec, UnitRange, export_model, export_vae, generator_spec,
                          latest_checkpoint, load_checkpoint, save_checkpoint)
from .distributed import Process, average_grads, barrier, init_process, mean_over_processes
from .metrics import append_metrics, plot_loss, read_metrics, write_metrics


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
        conditions = self._tokens(batch, source, target, latents, concat)
        cls, features = self._teach(target)
        return Batch(latents=latents, conditions=conditions, concat=concat, cls_target=cls, teacher_features=features)

    def _tokens(self, batch: dict[str, Any], source, target, latents=None, source_latents=None) -> Conditions | None:
        """Condition tokens; an image encoder that takes latents gets the batch's (a row
        without a target has the source's latent as its `latents`)."""
        device = self.process.device
        tokens, masks = {}, {}
        for modality, encoder in self.encoders.items():
            spec = self.config.conditions[modality]
            if modality == "image" and getattr(encoder, "takes_latents", False):
                from_target = spec.get("from", "source") == "target"
                chosen = latents if from_target or source_latents is None else source_latents
                if not from_target and source_latents is None and batch.get("has_target") is not None \
                        and bool(batch["has_target"].any()):
                    raise ConfigError(f"{self.config.source_file}: conditions.image: from: source with a latent "
                                      "encoder needs the source latents of paired rows (template: source)")
                encoded = encoder.encode_latents(chosen, device=device)
            elif modality == "image":
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
        latents = batch["latent"].to(device)
        return Batch(latents=latents, conditions=self._tokens(batch, None, None, latents, concat), concat=concat,
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
    barrier(process)

    training_vae = config.task == "vae"
    kind = config.model.get("kind")
    if kind == "embedding-flow":
        codec = TokenCodec.of_generator(generator_spec(config), process.device)
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
        model = build_pix2pix(config.model, source_channels(codec), codec.latent_channels, config.seed)
    elif kind == "cyclegan":
        model = build_cyclegan(config.model, source_channels(codec), codec.latent_channels, config.seed)
    elif kind == "embedding-flow":
        model = build_embedding_flow(config.model, codec.latent_channels, config.seed)
    elif config.distill.teacher:
        model, reflow_teacher = build_distillation(config, codec, process.device)
    else:
        teacher = build_teacher(config, process.device)
        model = build_model(config, codec, encoders, teacher)
    model = model.to(process.device)
    trainable_encoders = [e for e in encoders.values() if any(p.requires_grad for p in e.parameters())]
    if reflow_teacher is not None and trainable_encoders:
        raise ConfigError(f"{config.source_file}: distilling a model whose condition encoder was trained with it is "
                          "not supported (the pairs need the teacher's trained encoder); frozen encoders only")
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
        sync_grads=(lambda: average_grads(trainable_encoders, process)) if process.world > 1 else None,
        loss_fn=(lambda net_, batch, gen: vae_loss(net_, batch.latents, kl_weight(config), gen)) if training_vae
        else (lambda net_, batch, gen: pix2pix_loss(net_, batch.concat, batch.latents)) if regression
        else (lambda net_, batch, gen: cyclegan_loss(net_, batch.concat, batch.latents,
                                                     config.model.get("cycle_weight", 10.0),
                                                     config.model.get("identity_weight", 0.5)))
        if kind == "cyclegan"
        else (lambda net_, batch, gen: embedding_flow_loss(net_, batch.concat, batch.latents, gen))
        if kind == "embedding-flow"
        else (lambda net_, batch, gen: reflow_loss(net_, reflow_teacher, batch.latents, batch.concat,
                                                   config.distill.teacher_steps, gen, config.loss.time_sampling,
                                                   batch.conditions, config.distill.teacher_guidance))
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
        record = mean_over_processes(record, process)
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
    barrier(process)
    return RunResult(run_dir, last, model_dir, history, resumed_from)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _training_tflops(model: MupadSiT, make_batch: BatchMaker, images_per_s: float) -> float:
    """Achieved TFLOP/s: ~6 FLOPs per parameter per token for forward + backward."""
    cfg = model.config
    side = make_batch.config.data.patch_px if make_batch.config.data.kind == "slides" else (
        make_batch.config.data.crop_px or 256)
    tokens = (side // make_batch.codec.downscale // cfg.patch_size) ** 2
    params = sum(p.numel() for p in model.parameters())
    return 6 * params * tokens * images_per_s / 1e12


# ---------------------------------------------------------------- checkpoints and logs


