"""Several samples of one input: their mean, and how much they disagree.

A generative model gives a different image for every noise seed. Where the samples agree
the model is confident; where they differ it is guessing. The paper names that spread as
the safeguard virtual staining lacks, so every task can return it beside the mean.
"""

from __future__ import annotations

import torch

# Sample k of a region with seed s uses seed s + k * SAMPLE_SEED_STRIDE: far from s + 1, s + 2
# (the seeds of neighbouring regions in one run), so no two images share a noise field.
SAMPLE_SEED_STRIDE = 1_000_003


def sample_seeds(seed: int, samples: int) -> list[int]:
    return [int(seed) + k * SAMPLE_SEED_STRIDE for k in range(samples)]


def mean_and_spread(samples: torch.Tensor, one_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (C, H, W), spread (1 or C, H, W)) of samples (K, C, H, W) in [0, 1].

    The spread is the per-pixel standard deviation over the samples, times 2, so the largest
    possible disagreement (half the samples 0, half 1) is 1. `one_channel` averages it over
    the channels (R, G, B of a brightfield image: one map); marker images keep one per marker.
    """
    if samples.dim() != 4 or samples.shape[0] < 1:
        raise ValueError(f"samples must be (K, C, H, W) with K >= 1, got {tuple(samples.shape)}")
    if samples.shape[0] == 1:  # one sample agrees with itself: no pass over the pixels
        _, c, h, w = samples.shape
        return samples[0], samples.new_zeros((1 if one_channel else c, h, w))
    spread = samples.std(0, unbiased=False) * 2
    return samples.mean(0), spread.mean(0, keepdim=True) if one_channel else spread
