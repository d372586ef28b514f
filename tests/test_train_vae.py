"""`mupad train` with `task: vae`: a diffusers AutoencoderKL trained on real slide patches with
the denoisers' tooling (loss falls, exact resume, export), then used as a denoiser's codec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mupad_core.demo import sample_slide_path
from mupad_core.train.config import ConfigError, load_config
from mupad_core.train.run import train

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = {"block_out_channels": [16, 32], "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
            "kl_weight": 1.0e-6}


def _config(tmp_path: Path, name: str, **train_options) -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny-he2he.yaml").read_text())
    config.update(name=name, out_dir=str(tmp_path / "runs"), task="vae", model=dict(TINY_VAE), conditions={})
    config["data"].update(slides=[str(sample_slide_path())], patch_px=32)
    config["train"].update({"steps": 24, "batch_size": 8, "lr": 2.0e-3, "checkpoint_every": 8, "log_every": 1,
                            **train_options})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow  # ~30 s on 2 cores: 24 + 24 steps of a small AutoencoderKL
def test_vae_trains_resumes_exactly_and_exports_a_usable_codec(tmp_path):
    from mupad_core.models.vae import load_vae

    whole = train(load_config(_config(tmp_path, "whole")), progress_bar=False, log=lambda m: None)
    losses = [r["loss_reconstruction"] for r in whole.history]
    assert len(losses) == 24 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses

    # Stopped after 16 steps (a checkpoint), resumed: the same weights as the uninterrupted run.
    path = _config(tmp_path, "split")
    train(load_config(path), progress_bar=False, log=lambda m: None, stop_after=16)
    resumed = train(load_config(path), resume=True, progress_bar=False, log=lambda m: None)
    assert resumed.resumed_from == 16
    a = load_file(str(whole.model_dir / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed.model_dir / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The export is a diffusers AutoencoderKL whose scaling gives unit-scale latents.
    codec = load_vae(str(whole.model_dir))
    from mupad_core.slide.readers import open_slide

    with open_slide(sample_slide_path()) as reader:
        tile = torch.from_numpy(reader.read_region(0, 1200, 1760, 64, 64)).permute(2, 0, 1).float()[None] / 255
    latents = codec.encode(tile)
    assert latents.shape == (1, 4, 32, 32)
    assert 0.3 < float(latents.std()) < 3.0
    assert codec.decode(latents).shape == (1, 3, 64, 64)


def test_a_denoiser_trains_on_the_trained_vae(tmp_path):
    vae = train(load_config(_config(tmp_path, "codec", steps=4, checkpoint_every=4)), progress_bar=False, log=lambda m: None).model_dir
    config = yaml.safe_load((REPO / "configs" / "tiny-he2he.yaml").read_text())
    config.update(name="on-vae", out_dir=str(tmp_path / "runs"), vae=str(vae))
    config["model"] = {"hidden_size": 64, "depth": 1, "num_heads": 4}
    config["data"].update(slides=[str(sample_slide_path())], patch_px=32)
    config["train"].update(steps=2, checkpoint_every=2, log_every=1)
    path = tmp_path / "on-vae.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    assert len(result.history) == 2
    from mupad_core.models.checkpoint import load_model, read_pipeline

    assert load_model(result.model_dir).config.in_channels == 4  # the VAE's latent channels
    assert read_pipeline(result.model_dir)["vae"] == str(vae)


def test_a_vae_config_with_conditions_is_refused(tmp_path):
    path = _config(tmp_path, "bad")
    config = yaml.safe_load(path.read_text())
    config["conditions"] = {"text": {"encoder": "minilm"}}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="task vae trains a latent codec"):
        load_config(path)
