"""A single-process training loop for MUPAD denoisers.

Small on purpose: AdamW with warm-up, gradient clipping, EMA, the MUPAD loss and a
history of loss terms. The `mupad train` entry point (configs, data sets, DDP,
checkpoint/resume) builds on this.

Batches come from a callable `make_batch(step, generator) -> Batch` that runs inside
the step, so trainable condition encoders used there receive gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..models.conditions import Conditions
from ..transport.loss import LossConfig, training_loss
from .ema import make_ema


@dataclass
class Batch:
    latents: torch.Tensor
    conditions: Conditions | None = None
    cls_target: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None
    concat: torch.Tensor | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at `steps`
    grad_clip: float = 1.0
    ema_decay: float | None = 0.9999
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)


class Trainer:
    """Owns the optimiser, EMA and RNG of one training run.

    `model` may be wrapped in DistributedDataParallel; `share=(rank, world)` then says
    which part of the global batch this process holds (see `training_loss`). `autocast`
    is a dtype (bf16 on GPU) or None.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, extra_modules: Iterable[nn.Module] = (),
                 share: tuple[int, int] = (0, 1), autocast: torch.dtype | None = None,
                 sync_grads: Callable[[], None] | None = None,
                 loss_fn: Callable[[nn.Module, Batch, torch.Generator], object] | None = None):
        self.model = model
        self.module = getattr(model, "module", model)  # the bare network under a DDP wrapper
        self.config = config
        self.extra_modules = list(extra_modules)
        self.share = share
        self.autocast = autocast
        self.sync_grads = sync_grads  # called after backward (e.g. all-reduce of modules outside DDP)
        self.loss_fn = loss_fn  # another objective (a VAE's); default: the MUPAD flow loss
        params = [p for m in [self.module, *self.extra_modules] for p in m.parameters() if p.requires_grad]
        # One kernel over all parameters (fused on GPU, foreach on CPU) rather than a Python loop
        # per tensor: the per-tensor loop was 12 % of a small model's step on CPU.
        on_gpu = bool(params) and all(p.is_cuda for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                           **({"fused": True} if on_gpu else {"foreach": True}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = make_ema(self.module, config.ema_decay) if config.ema_decay else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.history: list[dict[str, float]] = []

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            done = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        if cfg.lr_schedule != "constant":
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
        return 1.0

    def train_step(self, make_batch: Callable[[int, torch.Generator], Batch]) -> dict[str, float]:
        self.model.train()
        for m in self.extra_modules:
            m.train()
        batch = make_batch(self.step, self.generator)
        device_type = batch.latents.device.type
        with torch.autocast(device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            terms = self.loss_fn(self.model, batch, self.generator) if self.loss_fn is not None else training_loss(
                self.model,
                batch.latents,
                batch.conditions,
                cls_target=batch.cls_target,
                teacher_features=batch.teacher_features,
                concat=batch.concat,
                config=self.config.loss,
                generator=self.generator,
                share=self.share,
            )
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if self.sync_grads is not None:
            self.sync_grads()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip) if self.config.grad_clip else None
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        self.step += 1
        record = {"step": self.step, **{f"loss_{k}": v for k, v in terms.as_floats().items()}}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.history.append(record)
        return record

    def fit(
        self,
        make_batch: Callable[[int, torch.Generator], Batch],
        steps: int | None = None,
        progress: Callable[[int, int, dict], None] | None = None,
        time_budget_s: float | None = None,
    ) -> list[dict[str, float]]:
        """Run `steps` steps (default: config.steps), or fewer if the time budget ends."""
        total = steps if steps is not None else self.config.steps
        start = time.perf_counter()
        for _ in range(total):
            record = self.train_step(make_batch)
            if progress is not None:
                progress(self.step, total, record)
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
        return self.history

    def averaged_model(self) -> nn.Module:
        """The EMA weights when kept (what sampling should use), else the live model."""
        return self.ema.module if self.ema is not None else self.module

    def state_dict(self) -> dict:
        """Everything besides the weights that an exact resume needs."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "extra_modules": [m.state_dict() for m in self.extra_modules],
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for module, module_state in zip(self.extra_modules, state["extra_modules"]):
            module.load_state_dict(module_state)
