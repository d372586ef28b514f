"""Exponential moving average of weights, via torch's own AveragedModel."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: nn.Module, decay: float = 0.9999) -> AveragedModel:
    """EMA copy of `model`; call `.update_parameters(model)` after each optimiser step.

    Buffers are averaged too so an EMA model is a complete, loadable denoiser
    (`ema.module`).
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
