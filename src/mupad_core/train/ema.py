"""Exponential moving average of weights, via torch's own AveragedModel.

The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates. A fixed
0.999 keeps e^(-steps/1000) of the random initial weights: after 1,500 steps a fifth of
the EMA model is still the initialisation (our first demo models sampled noise for
exactly this reason), and short runs and fine-tunes are the common case here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used for the update after `updates` previous ones."""
    return min(decay, (1 + updates) / (10 + updates))


def make_ema(model: nn.Module, decay: float = 0.9999) -> AveragedModel:
    """EMA copy of `model`; call `.update_parameters(model)` after each optimiser step.

    Buffers are averaged too so an EMA model is a complete, loadable denoiser
    (`ema.module`).
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1.0 - ema_decay_at(decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, weight)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
