"""Domain translation (ff2ffpe): exact-enough inversion, self-attention injection, `mupad translate`.

A tiny text-conditioned MupadSiT with random weights (every path live) and the offline MiniLM
encoder; the region (96 x 80 px) is larger than the model's 64-px window, so fused windows and
per-call attention maps are exercised. The image is a crop of the bundled CC0 slide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from mupad_core.cli import main
from mupad_core.demo import sample_slide_path
from mupad_core.generate.translate import TranslateSettings, translate_region

ROI = (1200, 1760, 96, 80)


def _text_model(folder, std: float):
    from helpers import randomize

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    model = MupadSiT(in_channels=12, hidden_size=48, depth=2, num_heads=2, condition_dims={"text": 384})
    randomize(model, seed=3, std=std)
    return save_model(model, folder, pipeline={
        "vae": "pixel-unshuffle:2", "tasks": ["ff2ffpe"], "window_px": 64, "encoders": {"text": {"name": "minilm"}}})


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _text_model(tmp_path_factory.mktemp("tr") / "model", std=0.05)


@pytest.fixture(scope="module")
def gen(text_model):
    from mupad_core.generate.roi import load_generator

    return load_generator(str(text_model))


@pytest.fixture(scope="module")
def sharp_gen(tmp_path_factory):
    """Larger random weights: sharper attention and a prompt that matters, so injection shows."""
    from mupad_core.generate.roi import load_generator

    return load_generator(str(_text_model(tmp_path_factory.mktemp("sharp") / "model", std=0.2)))


@pytest.fixture(scope="module")
def section():
    from mupad_core.slide.readers import open_slide

    with open_slide(sample_slide_path()) as reader:
        return reader.read_region(0, *ROI)


def _pixels(result) -> np.ndarray:
    return result.pixels.permute(1, 2, 0).numpy() * 255


def test_same_prompt_without_guidance_returns_the_input(gen, section):
    """Inversion is exact enough: out and back under one prompt gives the section to within
    half a grey level (5e-5 measured), with and without injection."""
    for inject_steps in (0.0, 1.0):
        result = translate_region(gen, section, TranslateSettings("fresh frozen", "fresh frozen", steps=10,
                                                                  inject_steps=inject_steps))
        assert result.pixels.shape == (3, ROI[3], ROI[2])
        assert np.abs(_pixels(result) - section).max() < 0.5
    assert result.reconstruction is not None  # injection on every step: the source pass ran to the end
    assert torch.allclose(result.reconstruction, result.pixels, atol=1e-5)


def test_injection_steers_the_target_pass_and_is_a_no_op_under_the_same_prompt(sharp_gen, section):
    gen = sharp_gen
    plain = translate_region(gen, section, TranslateSettings("fresh frozen", "ffpe image", steps=6, inject_steps=0.0))
    assert np.abs(_pixels(plain) - section).mean() > 1  # another prompt: another image
    for inject in ("maps", "features"):
        injected = translate_region(gen, section, TranslateSettings("fresh frozen", "ffpe image", steps=6,
                                                                    inject_steps=1.0, inject=inject))
        assert np.abs(_pixels(injected) - _pixels(plain)).mean() > 0.1, inject  # injection changes the target pass
        # 6 inversion steps x (1 + 4 fixed-point) + 6 target + 6 reconstruction passes, x 2 windows in one batch
        assert injected.network_passes == plain.network_passes + 6
    same = translate_region(gen, section, TranslateSettings("ffpe image", "ffpe image", steps=6, inject_steps=1.0))
    alone = translate_region(gen, section, TranslateSettings("ffpe image", "ffpe image", steps=6, inject_steps=0.0))
    assert torch.allclose(same.pixels, alone.pixels, atol=1e-5)  # its own maps: nothing changes


def test_bad_settings_and_models_are_refused(gen, section):
    with pytest.raises(ValueError, match="inject_steps"):
        translate_region(gen, section, TranslateSettings(inject_steps=1.5))
    with pytest.raises(ValueError, match="'maps' or 'features'"):
        translate_region(gen, section, TranslateSettings(inject="values"))
    with pytest.raises(ValueError, match="prompts must not be empty"):
        translate_region(gen, section, TranslateSettings(target_prompt=" "))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        translate_region(gen, section[..., 0], TranslateSettings())


def test_translate_cli_writes_a_placed_store(text_model, tmp_path, capsys):
    from mupad_core.slide.readers import open_slide
    from mupad_core.store import validate_omezarr

    out = tmp_path / "ffpe.ome.zarr"
    code = main(["translate", str(sample_slide_path()), "-o", str(out), "--roi", *map(str, ROI), "--model",
                 str(text_model), "--steps", "3", "--inject-steps", "0.5", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out)
    validate_omezarr(out)
    provenance = zarr.open_group(str(out), mode="r").attrs["mupad"]
    assert provenance["task"] == "ff2ffpe" and provenance["translate"]["inject_steps"] == 0.5
    assert provenance["source"]["roi_level0"] == list(ROI) and provenance["not_for_diagnosis"]
    with open_slide(sample_slide_path()) as slide, open_slide(out) as result:
        mpp_x, mpp_y = slide.level_mpp(0)
        assert result.origin == pytest.approx((ROI[1] * mpp_y, ROI[0] * mpp_x))  # opens over its region
        assert result.dimensions == ROI[2:]

    assert main(["translate", str(sample_slide_path()), "-o", str(tmp_path / "x.ome.zarr"), "--roi", *map(str, ROI),
                 "--model", "demo-he2he", "--quiet"]) == 1
    assert "needs a text condition stream" in capsys.readouterr().err


def test_stain_domain_pair_keeps_the_cells_and_takes_the_pale_reference_colour(shared_data, tmp_path):
    """The FF->FFPE stand-in data: the pale side has the reference's tissue colour statistics,
    the same structure as the scanned side, and glass stays glass."""
    from PIL import Image
    from skimage.color import rgb2gray, rgb2lab
    from skimage.metrics import structural_similarity

    from mupad_core.demo_data import DOMAIN_PROMPTS, prepare_stain_domains, reinhard

    folder = prepare_stain_domains(shared_data, tmp_path)
    rows = (folder / "manifest.csv").read_text().splitlines()[1:]
    assert len(rows) == 18 and {r.split(",")[-1] for r in rows} == {"train", "val"}
    assert sum(DOMAIN_PROMPTS[1] in r for r in rows) == 9
    scanned = np.asarray(Image.open(folder / "cmu_0_scanned.png").convert("RGB"))
    pale = np.asarray(Image.open(folder / "cmu_0_pale.png").convert("RGB"))
    reference = np.asarray(Image.open(shared_data / "he_tiles/torchstain/target.png").convert("RGB"))
    tissue = scanned.mean(-1) < 200
    ref_tissue = reference.mean(-1) < 200
    before = np.abs(rgb2lab(scanned)[tissue].mean(0) - rgb2lab(reference)[ref_tissue].mean(0)).sum()
    after = np.abs(rgb2lab(pale)[tissue].mean(0) - rgb2lab(reference)[ref_tissue].mean(0)).sum()
    assert after < before / 3, (before, after)  # measured 2026-11-29: 42.6 -> 7.4 (luminance SSIM 0.89)
    assert structural_similarity(rgb2gray(scanned), rgb2gray(pale), data_range=1.0) > 0.8
    white = np.full((8, 8, 3), 250, np.uint8)
    assert np.array_equal(reinhard(white, reference), white)
