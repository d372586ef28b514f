"""A restaining model whose paths start at its source latent (`loss.start: source`,
transport/path.py): training, the recorded pipeline and whole-slide sampling agree on where
the path starts, and what the model has not learnt stays as the source had it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mupad_core.generate.config import StainConfig
from mupad_core.train.config import ConfigError, load_config
from mupad_core.transport.loss import LossConfig, training_loss

from test_source_view import real_he_crop, tiny_he2ihc_config


class ZeroVelocity(torch.nn.Module):
    """A model that has learnt nothing yet: velocity 0 everywhere."""

    def forward(self, x, t, conditions, cls=None, concat=None, return_projection=False):
        return SimpleNamespace(velocity=torch.zeros_like(x), cls_velocity=None, projected=None)


def test_the_loss_measures_the_velocity_from_source_plus_noise_to_the_target():
    torch.manual_seed(0)
    target = torch.randn(16, 4, 8, 8)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    # Target == source: from the source, only the start noise (sigma 0.1) is left to undo.
    from_source = training_loss(ZeroVelocity(), target, concat=target, generator=gen(),
                                config=LossConfig(start="source", start_noise=0.1))
    from_noise = training_loss(ZeroVelocity(), target, concat=target, generator=gen(), config=LossConfig())
    assert float(from_source.velocity) == pytest.approx(0.01, rel=0.1)
    assert float(from_noise.velocity) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="pass concat"):
        training_loss(ZeroVelocity(), target, generator=gen(), config=LossConfig(start="source"))


def source_start_config(tmp_path: Path, **loss) -> Path:
    path = tiny_he2ihc_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["loss"].update({"start": "source", "start_noise": 0.01, **loss})
    path.write_text(yaml.safe_dump(config))
    return path


def test_bad_settings_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"view.yaml: loss.start: must be 'noise' or 'source'"):
        load_config(source_start_config(tmp_path, start="floor"))
    with pytest.raises(ConfigError, match=r"loss.start_noise: must be > 0"):
        load_config(source_start_config(tmp_path, start_noise=0))
    path = source_start_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config.pop("template")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"loss.start: 'source' starts the path at the spatial template"):
        load_config(path)


def test_a_trained_model_records_its_start_and_the_engine_starts_there(tmp_path):
    from mupad_core.generate.canvas import GlobalNoise
    from mupad_core.generate.engine import _check, generate_block
    from mupad_core.generate.handles import load_handle
    from mupad_core.train.run import train

    result = train(load_config(source_start_config(tmp_path)), progress_bar=False, log=lambda m: None)
    pipeline = json.loads((result.model_dir / "mupad_pipeline.json").read_text())
    assert pipeline["start"] == "source" and pipeline["start_noise"] == 0.01
    handle = load_handle(str(result.model_dir), "he2ihc")
    assert handle.source_start == 0.01

    # Before it has learnt anything (velocity 0) the model gives back what it sees of its
    # source (the haematoxylin view) to within the start noise; from noise it gives noise.
    with torch.no_grad():
        for p in handle.model.final_layer.parameters():
            p.zero_()
    tile = real_he_crop()[:, :64, :64]
    config = StainConfig(task="he2ihc", steps=2, window_px=64, overlap_px=0)
    seen = handle.viewed(tile)
    out = generate_block(handle, tile, (0, 0), GlobalNoise(1, handle.latent_channels), config)
    assert (out - seen).abs().max() < 0.05
    handle.source_start = None
    from_noise = generate_block(handle, tile, (0, 0), GlobalNoise(1, handle.latent_channels), config)
    assert (from_noise - seen).abs().mean() > 0.2

    handle.source_start = 0.01
    with pytest.raises(ValueError, match="starts its paths at its source; sample it with euler or heun"):
        _check(StainConfig(task="he2ihc", method="sde", window_px=64, overlap_px=0), handle)
    with pytest.raises(ValueError, match="run it with strength 1"):
        _check(StainConfig(task="he2he", strength=0.5, window_px=64, overlap_px=0), handle)  # a same-domain task
