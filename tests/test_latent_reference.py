"""The latent reference encoder (`encoder: latent`): reference tokens from the codec latent,
so an image-conditioned model trains from a latent cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mupad_core.demo import sample_slide_path
from mupad_core.models.conditioning import LatentImageEncoder, build_encoder
from mupad_core.slide.readers import open_slide
from mupad_core.train.config import ConfigError, load_config
from mupad_core.train.run import train

from test_train_run import write_config


def he_tiles(n: int = 2, size: int = 64) -> torch.Tensor:
    with open_slide(sample_slide_path()) as reader:
        tiles = [np.asarray(reader.read_region(0, 500 + 300 * k, 900, size, size))[..., :3] for k in range(n)]
    return torch.from_numpy(np.stack(tiles).copy()).permute(0, 3, 1, 2).float() / 255


def test_tokens_come_from_the_codec_latent_and_train():
    encoder = build_encoder("image", "latent", token_dim=32, width=32, depth=1, grid=2)
    assert isinstance(encoder, LatentImageEncoder) and encoder.token_dim == 32
    images = he_tiles()
    encoded = encoder.encode(images)
    assert encoded.tokens.shape == (2, 4, 32) and encoded.grid == (2, 2)
    latents = encoder.codec().encode(images)
    assert latents.shape == (2, 32, 8, 8)
    assert torch.allclose(encoder.encode_latents(latents).tokens, encoded.tokens, atol=1e-5)
    assert not torch.allclose(encoded.tokens[0], encoded.tokens[1])  # different tissue, different tokens
    assert not any(k.startswith("_codec") or "decoder" in k for k in encoder.state_dict())  # the codec is not saved
    encoder.encode_latents(latents).tokens.square().mean().backward()
    assert encoder.stem.weight.grad is not None and encoder.stem.weight.grad.abs().sum() > 0


def latent_reference_config(tmp_path: Path, **image) -> Path:
    spec = {"encoder": "latent", "from": "source", "trainable": True, "token_dim": 32, "width": 32, "depth": 1,
            "grid": 2, **image}
    return write_config(tmp_path, "latref", vae="taef2", model={"hidden_size": 128, "depth": 2, "num_heads": 4},
                        conditions={"image": spec},
                        data={"cache": str(tmp_path / "cache.zarr"), "length": 8, "patch_px": 64,
                              "hed_scale": 0.0, "hed_shift": 0.0},
                        train={"steps": 4, "batch_size": 4, "checkpoint_every": 4})


def test_a_cached_run_trains_the_encoder_and_reference_generation_uses_it(tmp_path):
    from mupad_core.generate.roi import condition_from, generate_region, load_generator

    result = train(load_config(latent_reference_config(tmp_path)), progress_bar=False, log=lambda m: None)
    saved = load_file(str(result.model_dir / "image_encoder.safetensors"))
    assert "stem.weight" in saved and not any("decoder" in k or "encoder.layers" in k for k in saved)
    fresh = LatentImageEncoder(token_dim=32, width=32, depth=1, grid=2)
    assert not torch.equal(saved["stem.weight"].float(), fresh.stem.weight)  # it trained

    gen = load_generator(str(result.model_dir))
    reference = (he_tiles(1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    conditions, record = condition_from(gen, "image", reference)
    assert conditions.tokens["image"].shape == (1, 4, 32)
    pixels = generate_region(gen, 64, 64, conditions, steps=2, seed=0)
    assert pixels.shape[-2:] == (64, 64) and torch.isfinite(torch.as_tensor(pixels)).all()


def test_the_latent_encoder_must_read_the_models_codec(tmp_path):
    with pytest.raises(ConfigError, match="conditions.image.codec: the latent encoder reads 'pixel-unshuffle:2'"):
        load_config(latent_reference_config(tmp_path, codec="pixel-unshuffle:2"))
