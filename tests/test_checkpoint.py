"""Checkpoints: save -> load is exact; every damaged checkpoint names the file and problem."""

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import randomize, tiny_sit
from mupad_core.hub import HubUnavailableError
from mupad_core.models.checkpoint import CheckpointError, load_model, save_model, weights_sha256
from mupad_core.models.conditions import Conditions
from mupad_core.models.vae import DiffusersVAE, PixelUnshuffleCodec, VAEError, load_vae


def _inputs():
    g = torch.Generator().manual_seed(1)
    c = Conditions(tokens={"image": torch.randn(2, 5, 32, generator=g), "rna": torch.randn(2, 331, generator=g)})
    return torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g), c


@pytest.fixture
def saved(tmp_path):
    model = randomize(tiny_sit(cls_dim=8, align_depth=1, align_dim=6)).eval()
    folder = save_model(model, tmp_path / "ckpt", card="# tiny test model\n")
    return model, folder


def test_save_load_identical_outputs(saved):
    model, folder = saved
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(folder)
    x, t, c = _inputs()
    cls = torch.randn(2, 8)
    with torch.no_grad():
        a, b = model(x, t, c, cls=cls), loaded(x, t, c, cls=cls)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.cls_velocity, b.cls_velocity)
    assert len(weights_sha256(folder)) == 64


def test_truncated_weights(saved):
    _, folder = saved
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: damaged or truncated"):
        load_model(folder)


def test_mismatched_weights(saved, tmp_path):
    _, folder = saved
    other = randomize(tiny_sit(hidden_size=32))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"do not match config\.json .*shape mismatch"):
        load_model(folder)


def test_missing_tensors(saved):
    _, folder = saved
    state = tiny_sit(cls_dim=8, align_depth=1, align_dim=6).state_dict()
    state.pop("final_layer.linear.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="1 missing tensor.*final_layer.linear.weight"):
        load_model(folder)


def test_bad_config(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="not a MUPAD model"):
        load_model(folder)
    # A class MUPAD folders may hold (the pix2pix baseline) whose weights are another model's.
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        load_model(folder)


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    save_model(tiny_sit(), folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(folder)


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    monkeypatch.setenv("MUPAD_HOME", str(tmp_path / "cache"))
    with pytest.raises(HubUnavailableError, match="someone/mupad-xl"):
        load_model("someone/mupad-xl")


def test_vae_codecs(tmp_path):
    from diffusers import AutoencoderKL

    images = torch.rand(2, 3, 32, 32)
    codec = PixelUnshuffleCodec(4)
    z = codec.encode(images)
    assert z.shape == (2, 48, 8, 8)
    assert torch.allclose(codec.decode(z), images, atol=1e-6)  # lossless

    tiny = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, scaling_factor=0.5, shift_factor=0.1)
    tiny.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert isinstance(vae, DiffusersVAE) and vae.downscale == 2 and vae.latent_channels == 4
    lat = vae.encode(images)
    raw = tiny.encode(images * 2 - 1).latent_dist.mode()
    assert torch.allclose(lat, (raw - 0.1) * 0.5, atol=1e-5)  # scaling and shift applied
    out = vae.decode(lat)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    with pytest.raises(VAEError, match="not a diffusers AutoencoderKL"):
        (tmp_path / "empty").mkdir()
        load_vae(tmp_path / "empty")
