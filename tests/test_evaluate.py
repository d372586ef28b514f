"""Pixel metrics on cases with known answers."""

import numpy as np
import pytest

from mupad_core.evaluate.metrics import patch_pearson, pearson, psnr


def test_psnr_known_values():
    ref = np.zeros((16, 16, 2))
    gen = ref.copy()
    gen[..., 1] += 255 / 10  # error of peak/10 everywhere -> 20 dB
    values = psnr(gen, ref)
    assert values[1] == pytest.approx(20.0)
    assert values[0] > 100  # identical channel


def test_pearson_is_affine_invariant_and_signed():
    rng = np.random.default_rng(0)
    ref = rng.random((32, 32, 3))
    gen = np.stack([2 * ref[..., 0] + 1, -ref[..., 1], rng.random((32, 32))], axis=-1)
    r = pearson(gen, ref)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and abs(r[2]) < 0.2


def test_patch_pcc_forgives_small_shifts_that_pixel_pcc_punishes():
    rng = np.random.default_rng(1)
    cells = np.kron(rng.random((16, 16)), np.ones((8, 8)))  # 8-px "cells" of random brightness
    texture = rng.random((128, 128)) * 0.5
    ref = cells + texture
    shifted = np.roll(cells, 1, axis=1) + rng.random((128, 128)) * 0.5
    assert patch_pearson(shifted, ref) > 0.8 > pearson(shifted, ref)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        pearson(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
