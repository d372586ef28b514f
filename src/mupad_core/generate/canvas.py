"""One noise field for the whole slide, drawn lazily by position.

Seams start where neighbouring windows see different noise for the same place. Here the
noise at latent position (c, y, x) for sampler step s is a pure function of
(seed, s, y // B, x // B): blocks of B x B are drawn from their own counter-seeded
generator, so any window, any tile order, any worker and a resumed run all see the same
numbers, and the canvas is never materialised.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch


class GlobalNoise:
    def __init__(self, seed: int, channels: int, block: int = 64, cache_blocks: int = 256):
        self.seed = int(seed)
        self.channels = channels
        self.block = block
        self._cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._lock = threading.Lock()  # the engine draws the next block's noise in a reader thread

    def _block(self, step: int, by: int, bx: int) -> torch.Tensor:
        with self._lock:
            return self._cached_block(step, by, bx)

    def _cached_block(self, step: int, by: int, bx: int) -> torch.Tensor:
        key = (step, by, bx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        # SeedSequence mixes the coordinates into an independent 64-bit seed per block.
        seed = int(np.random.SeedSequence([self.seed, step, by & 0xFFFFFFFF, bx & 0xFFFFFFFF]).generate_state(1, np.uint64)[0])
        g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
        noise = torch.randn(self.channels, self.block, self.block, generator=g)
        self._cache[key] = noise
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return noise

    def window(self, y: int, x: int, h: int, w: int, step: int = 0) -> torch.Tensor:
        """Noise (C, h, w) for the latent window at (y, x); coordinates may be negative."""
        b = self.block
        out = torch.empty(self.channels, h, w)
        for by in range(y // b, (y + h - 1) // b + 1):
            for bx in range(x // b, (x + w - 1) // b + 1):
                y0, y1 = max(y, by * b), min(y + h, (by + 1) * b)
                x0, x1 = max(x, bx * b), min(x + w, (bx + 1) * b)
                block = self._block(step, by, bx)
                out[:, y0 - y : y1 - y, x0 - x : x1 - x] = block[:, y0 - by * b : y1 - by * b, x0 - bx * b : x1 - bx * b]
        return out
