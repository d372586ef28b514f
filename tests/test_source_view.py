"""A model's view of its source: the haematoxylin alone (slide/stains.py), the same in
training and at inference, recorded with the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from skimage.color import rgb2hed

from mupad_core.demo import sample_slide_path
from mupad_core.slide.readers import open_slide
from mupad_core.slide.stains import h_dab_view, haematoxylin_view, source_view
from mupad_core.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def real_he_crop() -> torch.Tensor:
    with open_slide(sample_slide_path()) as reader:
        pixels = np.asarray(reader.read_region(0, 600, 900, 128, 128))[..., :3]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def real_ihc_crop() -> torch.Tensor:
    from skimage.data import immunohistochemistry  # a real DAB IHC image shipped with scikit-image

    return torch.from_numpy(immunohistochemistry()[:128, :128].copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("crop", [real_he_crop, real_ihc_crop], ids=["H&E", "IHC"])
def test_the_view_keeps_the_haematoxylin_and_drops_eosin_and_dab(crop):
    image = crop()
    view = haematoxylin_view(image)
    assert view.shape == image.shape and view.dtype == image.dtype
    before = rgb2hed(image.permute(1, 2, 0).numpy())
    after = rgb2hed(view.permute(1, 2, 0).numpy())
    assert np.abs(after[..., 1]).max() < 1e-3 and np.abs(after[..., 2]).max() < 1e-3  # no eosin, no DAB left
    assert np.abs(before[..., 1:]).max() > 0.02  # ... where the input had them
    assert np.abs(after[..., 0] - before[..., 0]).max() < 1e-3  # the haematoxylin exactly as it was
    assert not torch.allclose(view, image, atol=0.02)


def test_the_h_dab_view_is_the_deconvolution_floor_laid_out_as_the_panel():
    """What an mIF model with `source_view: h_dab` starts from: haematoxylin bright in the DAPI and
    Lap2β channels, DAB bright in the Ki67 channel, on a real DAB IHC."""
    image = real_ihc_crop()
    view = h_dab_view(image)
    assert view.shape == image.shape and float(view.min()) >= 0 and float(view.max()) <= 1
    hed = rgb2hed(image.permute(1, 2, 0).numpy())
    assert torch.equal(view[0], view[1])
    for channel, stain in ((0, 0), (2, 2)):  # the stain amount, full scale at 0.2, clipped to [0, 1]
        np.testing.assert_allclose(view[channel].numpy(), np.clip(hed[..., stain] / 0.2, 0, 1), atol=1e-4)
        assert float(view[channel].std()) > 0.02
    assert np.corrcoef(view[2].flatten().numpy(), hed[..., 0].flatten())[0, 1] < 0.9  # DAB is not the haematoxylin
    assert source_view("h_dab") is h_dab_view


def test_unknown_views_are_named():
    with pytest.raises(ValueError, match="demo.json: unknown source view 'dab'"):
        source_view("dab", "demo.json")
    assert source_view("rgb") is None and source_view(None) is None


def tiny_he2ihc_config(tmp_path: Path, **data) -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny-he2he.yaml").read_text())
    slide = str(sample_slide_path())
    config.update(name="view", out_dir=str(tmp_path / "runs"), task="he2ihc", template="source", conditions={})
    config["data"].update({"slides": [slide], "targets": [slide], "paired": True, "patch_px": 32,
                           "source_view": "haematoxylin", **data})
    config["train"].update(steps=3, checkpoint_every=3, log_every=1)
    path = tmp_path / "view.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_config_with_an_unknown_view_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"view.yaml: data.source_view: unknown view 'eosin'"):
        load_config(tiny_he2ihc_config(tmp_path, source_view="eosin"))


def test_training_and_inference_give_the_model_the_same_view(tmp_path):
    from mupad_core.generate.handles import load_handle
    from mupad_core.train.builders import build_dataset
    from mupad_core.train.run import train

    config = load_config(tiny_he2ihc_config(tmp_path))
    item = build_dataset(config)[0]
    source = rgb2hed(item["source"].permute(1, 2, 0).numpy())
    target = rgb2hed(item["target"].permute(1, 2, 0).numpy())
    assert np.abs(source[..., 1]).max() < 1e-3 and target[..., 1].max() > 0.02  # the model sees no eosin; learns it

    result = train(config, progress_bar=False, log=lambda m: None)
    pipeline = json.loads((result.model_dir / "mupad_pipeline.json").read_text())
    assert pipeline["source_view"] == "haematoxylin"
    handle = load_handle(str(result.model_dir), "he2ihc")
    assert handle.source_view is haematoxylin_view
    tile = real_he_crop()
    prepared = handle.prepare(tile)
    expected = handle.codec.encode(haematoxylin_view(tile)[None])[0]
    assert torch.allclose(prepared.source_latent, expected, atol=1e-5)
    assert not torch.allclose(prepared.source_latent, handle.codec.encode(tile[None])[0], atol=1e-3)


def test_a_pipeline_naming_an_unknown_view_fails_on_load(tmp_path):
    from mupad_core.generate.handles import load_handle
    from mupad_core.train.run import train

    model_dir = train(load_config(tiny_he2ihc_config(tmp_path)), progress_bar=False, log=lambda m: None).model_dir
    pipeline_file = model_dir / "mupad_pipeline.json"
    pipeline = json.loads(pipeline_file.read_text())
    pipeline_file.write_text(json.dumps({**pipeline, "source_view": "dab"}))
    with pytest.raises(ValueError, match="mupad_pipeline.json source_view: unknown source view 'dab'"):
        load_handle(str(model_dir), "he2ihc")
