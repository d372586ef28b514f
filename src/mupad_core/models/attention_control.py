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

    With `per_call=True` maps are keyed by (step, block, n), n counting the calls of that
    block since `begin()`: a denoiser that calls the model several times per step (fused
    windows, guidance halves) records and injects each call's own maps, as long as the
    recorded and the injected pass make the same calls in the same order.
    """

    def __init__(self, mode: str = "parallel", blocks: Iterable[int] | None = None, per_call: bool = False,
                 features: bool = False):
        if mode not in ("record", "inject", "parallel"):
            raise ValueError(f"mode must be 'record', 'inject' or 'parallel', got {mode!r}")
        self.mode = mode
        self.blocks = None if blocks is None else set(blocks)
        self.step = 0
        self.enabled = True
        self.per_call = per_call
        self.features = features  # record/inject the attention output (maps and values), not the maps alone
        self.maps: dict[tuple[int, ...], torch.Tensor] = {}
        self._calls: dict[int, int] = {}

    def begin(self, step: int, mode: str, keep_maps: bool = True) -> None:
        """Start a pass: set the step and mode, restart the call counts (and drop old maps)."""
        if mode not in ("record", "inject", "parallel"):
            raise ValueError(f"mode must be 'record', 'inject' or 'parallel', got {mode!r}")
        self.step, self.mode, self.enabled = step, mode, True
        self._calls = {}
        if not keep_maps:
            self.maps = {}

    def _key(self, block: int) -> tuple[int, ...]:
        if not self.per_call:
            return (self.step, block)
        n = self._calls.get(block, 0)
        self._calls[block] = n + 1
        return (self.step, block, n)

    def __call__(self, block: int, q, k, v):
        if not self.enabled or (self.blocks is not None and block not in self.blocks):
            return None
        if self.mode == "record":
            probs = attention_probs(q, k)
            out = probs @ v
            self.maps[self._key(block)] = (out if self.features else probs).detach()
            return out
        if self.mode == "inject":
            key = self._key(block)
            probs = self.maps.get(key)
            if probs is None:
                raise KeyError(f"no recorded attention map for step {self.step}, block {block} (key {key})")
            if self.features:
                if probs.shape != v.shape:
                    raise ValueError(f"recorded attention output {tuple(probs.shape)} does not fit {tuple(v.shape)}")
                return probs.to(v.dtype)
            if probs.shape[-2:] != (q.shape[-2], k.shape[-2]):
                raise ValueError(f"recorded map {tuple(probs.shape)} does not fit {q.shape[-2]} tokens")
            return probs.to(v.dtype) @ v
        if q.shape[0] % 2:
            raise ValueError("parallel attention injection needs an even batch: [source; target]")
        half = q.shape[0] // 2
        src_probs = attention_probs(q[:half], k[:half])
        return torch.cat([src_probs @ v[:half], src_probs @ v[half:]])
