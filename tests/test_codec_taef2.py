"""The bundled TAEF2 codec: strict loading, the pool branch, and reconstruction of real tissue.

Real weights (the bundled pretrained TAEF2) on a real H&E crop of the bundled CC0 slide, so
these run on any clone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mupad_core.models.tiny_autoencoder import (
    DECODER_FILE,
    ENCODER_FILE,
    STATS_FILE,
    TinyAutoencoderCodec,
    bundled_folder,
    upstream_to_diffusers,
)
from mupad_core.models.vae import MarkerGroupCodec, VAEError, load_vae

SLIDE = Path(__file__).resolve().parents[1] / "src" / "mupad_core" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def codec():
    return load_vae("taef2")


@pytest.fixture(scope="module")
def tissue() -> torch.Tensor:
    """A 256-px H&E crop of the bundled slide, (1, 3, 256, 256) in [0, 1]."""
    from mupad_core.slide.readers import open_slide

    with open_slide(SLIDE) as reader:
        pixels = np.asarray(reader.read_region(0, 1000, 1700, 256, 256))[..., :3]
    assert pixels.std() > 20, "the crop should hold tissue, not glass"
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_bundled_codec_reconstructs_real_tissue(codec, tissue):
    z = codec.encode(tissue)
    assert z.shape == (1, 32, 32, 32)
    assert 0.4 < float(z.std()) < 2.0, "latents are normalised to about unit spread"
    out = codec.decode(z)
    assert out.shape == tissue.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    # CMU-1 is JPEG at quality 30, so absolute figures are lower than on clean tiles (docs:
    # 30 dB on MoNuSeg); the floor is what an 8x smaller image holds without a learned decoder.
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(tissue, 8), scale_factor=8,
                                              mode="bilinear", align_corners=False)
    assert psnr(out, tissue) > 22.0
    assert psnr(out, tissue) > psnr(blurred, tissue) + 3.0
    from skimage.metrics import structural_similarity

    ssim = structural_similarity(tissue[0].permute(1, 2, 0).numpy(), out[0].permute(1, 2, 0).numpy(),
                                 channel_axis=2, data_range=1.0)
    assert ssim > 0.8


def test_pool_branch_is_wired(codec, tissue):
    """The same weights without the pool branch (what a lenient AutoencoderTiny load builds)
    reconstruct far worse: the branch is part of the model, not decoration."""
    from diffusers import AutoencoderTiny

    folder = bundled_folder()
    state = upstream_to_diffusers(load_file(folder / ENCODER_FILE), load_file(folder / DECODER_FILE))
    plain = AutoencoderTiny(latent_channels=32)
    result = plain.load_state_dict(state, strict=False)
    assert result.unexpected_keys and all(".pool." in k for k in result.unexpected_keys)
    lenient = TinyAutoencoderCodec(plain.eval(), codec.mean.flatten().tolist(), codec.std.flatten().tolist())
    ours = psnr(codec.decode(codec.encode(tissue)), tissue)
    theirs = psnr(lenient.decode(lenient.encode(tissue)), tissue)
    assert ours > theirs + 3.0, (ours, theirs)


def _copy_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "taef2"
    folder.mkdir()
    for name in (ENCODER_FILE, DECODER_FILE):
        shutil.copy(bundled_folder() / name, folder / name)
    return folder


def test_unexpected_key_is_refused(tmp_path):
    folder = _copy_weights(tmp_path)
    weights = load_file(folder / DECODER_FILE)
    weights["7.extra.weight"] = torch.zeros(3)
    save_file(weights, folder / DECODER_FILE)
    with pytest.raises(VAEError, match=r"unexpected tensor.*decoder\.layers\.6\.extra\.weight") as info:
        load_vae(folder)
    assert str(folder) in str(info.value)


def test_missing_pool_weights_are_refused(tmp_path):
    folder = _copy_weights(tmp_path)
    weights = {k: v for k, v in load_file(folder / ENCODER_FILE).items() if not k.startswith("12.pool")}
    save_file(weights, folder / ENCODER_FILE)
    with pytest.raises(VAEError, match=r"missing tensor.*encoder\.layers\.12\.pool"):
        load_vae(folder)


def test_damaged_weights_name_the_file(tmp_path):
    folder = _copy_weights(tmp_path)
    (folder / DECODER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(VAEError, match=DECODER_FILE):
        load_vae(folder)


def test_bad_latent_stats_name_the_file(tmp_path):
    folder = _copy_weights(tmp_path)
    (folder / STATS_FILE).write_text(json.dumps({"mean": [0.0] * 4, "std": [1.0] * 4}))
    with pytest.raises(VAEError, match=f"{STATS_FILE}.*32 means"):
        load_vae(folder)


def test_folder_codec_uses_its_own_stats_and_identity(tmp_path, codec, tissue):
    folder = _copy_weights(tmp_path)
    (folder / STATS_FILE).write_text(json.dumps({"mean": [0.5] * 32, "std": [2.0] * 32}))
    other = load_vae(folder)
    assert other.identity != codec.identity  # a latent cache built with one refuses the other
    raw = other.encode(tissue) * 2.0 + 0.5
    bundled_raw = codec.encode(tissue) * codec.std + codec.mean
    assert torch.allclose(raw, bundled_raw, atol=1e-4)


def test_marker_groups_through_taef2(codec):
    """Two fluorescence markers: one padded group of three through the pretrained codec."""
    markers = torch.zeros(1, 2, 64, 64)
    markers[:, 0, 16:40, 16:40] = 0.8  # a bright square in one marker
    grouped = MarkerGroupCodec(codec, 2)
    z = grouped.encode(markers)
    assert z.shape == (1, 32, 8, 8)
    back = grouped.decode(z)
    assert back.shape == markers.shape
    assert float(back[0, 0, 20:36, 20:36].mean()) > 0.5 and float(back[0, 1].mean()) < 0.1
