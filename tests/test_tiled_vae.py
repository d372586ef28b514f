"""Tiled VAE encode/decode: blended tiles match the one-shot result and show no seams."""

import torch
from diffusers import AutoencoderKL

from mupad_core.generate.tiled_vae import tiled_apply, tiled_decode, tiled_encode
from mupad_core.models.vae import DiffusersVAE, PixelUnshuffleCodec


def test_tiles_blend_exactly_for_a_local_map():
    codec = PixelUnshuffleCodec(2)
    images = torch.rand(3, 300, 220)
    latent = tiled_apply(codec.encode, images, 128, 32, 0.5)
    assert torch.allclose(latent, codec.encode(images[None])[0], atol=1e-6)
    back = tiled_apply(codec.decode, latent, 40, 8, 2)
    assert torch.allclose(back, images, atol=1e-6)
    # A local codec is not tiled at all, so blocks of any size give bit-identical numbers.
    assert torch.equal(tiled_encode(codec, images), codec.encode(images[None])[0])


def test_diffusers_vae_tiled_decode_close_to_one_shot():
    torch.manual_seed(0)
    vae = DiffusersVAE(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                     norm_num_groups=4, layers_per_block=1))
    latent = torch.randn(4, 48, 80)
    whole = vae.decode(latent[None])[0]
    naive = tiled_decode(vae, latent, tile_latent=16, overlap_latent=0)
    blended = tiled_decode(vae, latent, tile_latent=16, overlap_latent=6)
    assert blended.shape == whole.shape == (3, 96, 160)
    # Overlap blending is closer to the one-shot decode than abutting tiles.
    assert (blended - whole).abs().mean() < 0.5 * (naive - whole).abs().mean()
