"""Record and inject self-attention maps (for fresh-frozen -> FFPE translation).

The paper keeps a frozen section's cell layout by running a source-conditioned
reconstruction pass beside the target-prompt pass and injecting the former's
self-attention maps into the latter. Fused SDPA never materialises the maps, so
while a controller is installed the chosen blocks compute softmax(QK^T) explicitly.

Usage:
    ctrl = AttentionMapController(mode="parallel", blocks=range(4, 12))
    model.set_attention_processor(ctrl)   # batch = [source half; target half]
    ...
    model.set_attention_processor(None)
"""

from __future__ import annotations

from typing import Iterable

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1).to(q.dtype)


class AttentionMapController:
    """A self-attention processor with three modes.

    - "record": keep each call's maps, keyed by (step, block).
    - "inject": use the recorded maps of the same (step, block) instead of computing them.
    - "parallel": the batch holds [source; target] halves; the target half attends
      with the source half's maps (values stay its own). No storage needed.

    `step` is advanced by the caller (e.g. from the sampler's progress callback);
    `enabled` switches injection off for late steps (the "strength" knob).
    """

    def __init__(self, mode: str = "parallel", blocks: Iterable[int] | None = None):
        if mode not in ("record", "inject", "parallel"):
            raise ValueError(f"mode must be 'record', 'inject' or 'parallel', got {mode!r}")
        self.mode = mode
        self.blocks = None if blocks is None else set(blocks)
        self.step = 0
        self.enabled = True
        self.maps: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, block: int, q, k, v):
        if not self.enabled or (self.blocks is not None and block not in self.blocks):
            return None
        if self.mode == "record":
            probs = attention_probs(q, k)
            self.maps[(self.step, block)] = probs.detach()
            return probs @ v
        if self.mode == "inject":
            probs = self.maps.get((self.step, block))
            if probs is None:
                raise KeyError(f"no recorded attention map for step {self.step}, block {block}")
            if probs.shape[-2:] != (q.shape[-2], k.shape[-2]):
                raise ValueError(f"recorded map {tuple(probs.shape)} does not fit {q.shape[-2]} tokens")
            return probs.to(v.dtype) @ v
        if q.shape[0] % 2:
            raise ValueError("parallel attention injection needs an even batch: [source; target]")
        half = q.shape[0] // 2
        src_probs = attention_probs(q[:half], k[:half])
        return torch.cat([src_probs @ v[:half], src_probs @ v[half:]])
