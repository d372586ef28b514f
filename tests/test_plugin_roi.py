"""ROI generation: the core sampler over fused windows, and the widget in a real viewer.

The model is a tiny MupadSiT with all three condition streams (text 384-d for the bundled
MiniLM encoder, RNA as 331 pathway tokens, image 32-d from the builtin CNN), random weights,
saved as a checkpoint folder. It generates noise-like tissue, but every path runs for real:
encoders, cross-attention, windowed fusion, sampler, decode, layer placement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from helpers import figures_dir  # noqa: E402

IMAGES = figures_dir()
EXPRESSION = "expression/tcga_blca_xena_rna_clean_first24.csv"


def _generator_checkpoint(folder: Path, window_px: int = 64) -> Path:
    from helpers import randomize

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    model = MupadSiT(in_channels=12, hidden_size=48, depth=1, num_heads=2,
                     condition_dims={"text": 384, "rna": 1, "image": 32}, condition_tokens={"rna": 331})
    randomize(model, seed=3, std=0.05)
    return save_model(model, folder, pipeline={
        "vae": "pixel-unshuffle:2", "tasks": ["generate"], "window_px": window_px,
        "encoders": {"image": {"name": "builtin", "token_dim": 32, "width": 16, "depth": 1}},
    })


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _generator_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt")


@pytest.fixture(scope="module")
def generator(checkpoint):
    from mupad_core.generate.roi import load_generator

    return load_generator(str(checkpoint))


# -- core: mupad_core.generate.roi ---------------------------------------------------------


def test_a_region_that_fits_one_window_is_that_window(generator):
    from mupad_core.generate.fused import region_velocity

    model = generator.model
    x = torch.randn(2, 12, 16, 24)
    t = torch.full((2,), 0.3)
    cond = generator.conditions(text="tumour")
    cond = cond.repeat(2)
    direct = model(x, t, cond).velocity
    fused = region_velocity(model, 16, 24, window=32, overlap=8)(x, t, cond).velocity
    assert torch.allclose(direct, fused, atol=1e-6)


def test_region_windows_are_weighted_by_their_ramps(generator):
    """A model whose velocity is a per-window constant: the fused field is their ramp-weighted
    mean, for each of a batch's states (the transport's guidance batches two)."""
    from mupad_core.generate.fused import region_velocity
    from mupad_core.generate.fusion import ramp_weights, window_grid
    from mupad_core.models.sit import SiTOutput

    calls = []

    def fake(x, t, conditions=None, cls=None, concat=None):
        calls.append(x.shape[0])
        ids = torch.arange(len(calls) * 100, len(calls) * 100 + x.shape[0], dtype=x.dtype)
        return SiTOutput(velocity=ids[:, None, None, None].expand_as(x).clone())

    x = torch.zeros(2, 2, 40, 56)
    fused = region_velocity(fake, 40, 56, window=16, overlap=4, batch_size=3)
    v = fused(x, torch.zeros(2)).velocity
    windows = window_grid(40, 56, 16, 4)
    weight = ramp_weights(16, 16, 4)
    for b in range(2):  # window k of a group is rows 2k (state 0) and 2k + 1 (state 1)
        values = [100 * (k // 3 + 1) + 2 * (k % 3) + b for k in range(len(windows))]
        num, den = torch.zeros(40, 56), torch.zeros(40, 56)
        for w, val in zip(windows, values):
            num[w.y : w.y + w.h, w.x : w.x + w.w] += val * weight
            den[w.y : w.y + w.h, w.x : w.x + w.w] += weight
        assert torch.allclose(v[b, 0], num / den) and torch.allclose(v[b, 1], num / den)
    assert calls == [6] * (len(windows) // 3) + ([2 * (len(windows) % 3)] if len(windows) % 3 else [])
    assert fused.handle.passes == len(calls)


def test_generate_region_size_seed_and_conditions(generator, shared_data):
    from mupad_core.rna.pathways import pathway_scores

    text = generator.conditions(text="invasive carcinoma with lymphocytes")
    # 150 x 200 px with 64-px windows: 12 fused windows (latent 76 x 100, window 32).
    a = generator.generate(150, 200, text, steps=3, seed=1)
    assert a.shape == (3, 150, 200) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, generator.generate(150, 200, text, steps=3, seed=1))  # seeded
    assert not torch.equal(a, generator.generate(150, 200, text, steps=3, seed=2))
    other = generator.conditions(text="normal urothelium")
    assert not torch.equal(a, generator.generate(150, 200, other, steps=3, seed=1))  # the prompt matters
    scores = pathway_scores(shared_data / EXPRESSION, sample="TCGA-MV-A51V").scores
    rna = generator.conditions(rna=scores)
    assert rna.tokens["rna"].shape == (1, 331, 1)
    assert not torch.equal(a, generator.generate(150, 200, rna, steps=3, seed=1))
    image = generator.conditions(image=np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    assert image.tokens["image"].shape == (1, 196, 32)  # resized to 224 px, 14 x 14 tokens
    # No condition given: the same as every stream switched off (presence 0).
    plain = generator.generate(64, 64, None, steps=2, seed=0)
    off = generator.conditions(text="x").without("text")
    assert torch.equal(plain, generator.generate(64, 64, off, steps=2, seed=0))


def test_generator_refuses_models_it_cannot_drive(tmp_path):
    from mupad_core.generate.roi import load_generator
    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    stain = save_model(MupadSiT(in_channels=12, concat_channels=12, hidden_size=48, depth=1, num_heads=2),
                       tmp_path / "stain", pipeline={"vae": "pixel-unshuffle:2"})
    with pytest.raises(ValueError, match="spatial template"):
        load_generator(str(stain))
    wrong = save_model(MupadSiT(in_channels=12, hidden_size=48, depth=1, num_heads=2, condition_dims={"text": 24}),
                       tmp_path / "wrong", pipeline={"vae": "pixel-unshuffle:2"})
    with pytest.raises(ValueError, match="384-d tokens"):
        load_generator(str(wrong))


# -- the widget -----------------------------------------------------------------------------


@pytest.fixture
def slide_viewer(make_napari_viewer):
    from napari_mupad._sample_data import cmu1_small_region

    viewer = make_napari_viewer(show=True)
    for data, meta, _kind in cmu1_small_region():
        viewer.add_image(data, **meta)
    return viewer


def _widget(viewer, qtbot):
    from napari_mupad.widgets.roi_generate import RoiGenerateWidget

    widget = RoiGenerateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MUPAD generate")
    viewer.window._qt_window.resize(1280, 820)
    sizes = []
    qtbot.waitUntil(lambda: sizes.append(tuple(viewer.canvas.size)) or (len(sizes) > 2 and sizes[-1] == sizes[-3]),
                    timeout=5000)
    return widget


def _run(widget, qtbot, timeout=120_000):
    widget.run()
    assert widget.running, widget.status_label.text()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


from helpers import record_notifications as _notifications  # noqa: E402


def test_text_prompt_fills_each_drawn_rectangle_exactly(slide_viewer, checkpoint, qtbot, tmp_path):
    viewer = slide_viewer
    source = viewer.layers[0]
    mpp = float(source.scale[-1])
    # Two rectangles, corners anywhere (not on the pixel grid).
    rects = [np.array([[401.3, 180.7], [497.9, 301.1]]), np.array([[700.2, 520.5], [771.0, 580.0]])]
    shapes = viewer.add_shapes(rects, shape_type="rectangle", name="rois", face_color="transparent",
                               edge_color="yellow", units=source.units)
    widget = _widget(viewer, qtbot)
    widget.model_combo.setCurrentText(str(checkpoint))
    assert widget.pixel_spin.value() == pytest.approx(mpp)  # no pixel size in the checkpoint: the slide's
    widget.shapes_combo.setCurrentText("rois")
    widget.condition_combo.setCurrentText("Text prompt")
    widget.prompt_edit.setText("tumour nests with dense lymphocytes")
    widget.steps_spin.setValue(3)
    widget.seed_spin.setValue(5)
    _run(widget, qtbot)

    assert [job.status for job in widget.jobs] == ["done", "done"], widget.status_label.text()
    for job, rect in zip(widget.jobs, rects):
        layer = job.layer
        assert layer in viewer.layers and layer.rgb
        data = np.asarray(layer.data)
        assert data.dtype == np.uint8 and data.shape == (*job.shape, 3) and data.std() > 5
        # Pixel edges = the rectangle: world extent (pixel centres) grown by half a pixel.
        edges = layer.extent.world + np.array([-0.5, 0.5])[:, None] * np.asarray(layer.scale)
        np.testing.assert_allclose(edges, shapes.extent.world if len(rects) == 1 else _box(rect), atol=1e-4)
        assert np.allclose(layer.scale, mpp, rtol=0.02)  # about the slide's pixel size
        provenance = layer.metadata["mupad"]
        assert provenance["condition"] == {"kind": "text", "text": "tumour nests with dense lymphocytes"}
        assert provenance["model_id"] == str(checkpoint) and provenance["not_for_diagnosis"] is True
    assert widget.jobs[0].layer.metadata["mupad"]["seed"] == 5

    # Export a generated ROI: it reopens where it lay, labelled generated, its condition kept.
    from mupad_core.store import validate_omezarr

    first = widget.jobs[0].layer
    viewer.layers.selection = {first}
    out = tmp_path / "generated-roi.ome.zarr"
    assert viewer.layers.save(str(out), selected=True, plugin="napari-mupad") == [str(out)]
    validate_omezarr(out)
    (reopened,) = viewer.open(out, plugin="napari-mupad")
    np.testing.assert_allclose(reopened.extent.world, first.extent.world, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(reopened.data[0]), np.asarray(first.data))
    assert reopened.metadata["provenance"]["generated"] is True
    assert reopened.metadata["provenance"]["condition"]["text"] == "tumour nests with dense lymphocytes"
    viewer.layers.remove(reopened)

    assert viewer.layers.index(shapes) == len(viewer.layers) - 1  # the rectangles stay on top
    from napari_mupad.widgets._geometry import camera

    camera(viewer).center = (0, 560, 380)
    camera(viewer).zoom = min(viewer.canvas.size) / 650
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))
    from PIL import Image as PILImage

    IMAGES.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(shot[..., :3]).save(IMAGES / "plugin-roi-generation-random.png")


def _box(rect):
    return np.array([rect.min(0), rect.max(0)])


def test_rna_profile_and_reference_image_conditions(slide_viewer, checkpoint, shared_data, qtbot):
    viewer = slide_viewer
    source = viewer.layers[0]
    rect = np.array([[300.0, 300.0], [380.0, 420.0]])
    viewer.add_shapes([rect], shape_type="rectangle", name="rois", units=source.units)
    widget = _widget(viewer, qtbot)
    widget.model_combo.setCurrentText(str(checkpoint))
    widget.steps_spin.setValue(2)

    widget.condition_combo.setCurrentText("RNA profile")
    widget.rna_table_edit.setText(str(shared_data / EXPRESSION))
    widget.rna_sample_edit.setText("TCGA-FD-A3SR")
    _run(widget, qtbot)
    (job,) = widget.jobs
    assert job.status == "done", widget.status_label.text()
    condition = job.layer.metadata["mupad"]["condition"]
    assert condition["kind"] == "rna" and condition["sample"] == "TCGA-FD-A3SR" and condition["genes_matched"] > 1000
    rna_pixels = np.asarray(job.layer.data)

    widget.condition_combo.setCurrentText("Reference image")
    widget.reference_combo.setCurrentText(source.name)
    reference = widget._reference_region(source, (tuple(rect[0]), tuple(rect[1])))
    y0, x0 = int(np.floor(300 / source.scale[-2] + 0.5)), int(np.floor(300 / source.scale[-1] + 0.5))
    assert reference.shape[:2] == (int(np.ceil(380 / source.scale[-2] + 0.5)) - y0,
                                   int(np.ceil(420 / source.scale[-1] + 0.5)) - x0)
    assert np.array_equal(np.asarray(reference), np.asarray(source.data[0][y0 : y0 + reference.shape[0],
                                                                           x0 : x0 + reference.shape[1]]))
    _run(widget, qtbot)
    (job,) = widget.jobs
    assert job.status == "done", widget.status_label.text()
    assert job.layer.metadata["mupad"]["condition"] == {"kind": "image"}
    assert not np.array_equal(np.asarray(job.layer.data), rna_pixels)


def test_bad_inputs_are_notifications(slide_viewer, checkpoint, tmp_path, qtbot):
    viewer = slide_viewer
    viewer.add_shapes([np.array([[100.0, 100.0], [150.0, 160.0]])], shape_type="rectangle", name="rois",
                      units=viewer.layers[0].units)
    widget = _widget(viewer, qtbot)
    layers_before = len(viewer.layers)
    seen, stop = _notifications()
    try:
        widget.prompt_edit.setText("anything")
        widget.model_combo.setCurrentText(str(tmp_path / "missing-model"))
        _run(widget, qtbot)
        widget.model_combo.setCurrentText(str(checkpoint))
        widget.condition_combo.setCurrentText("RNA profile")
        widget.rna_table_edit.setText(str(tmp_path / "nope.csv"))
        widget.run()  # refused before any thread starts
        assert not widget.running
    finally:
        stop()
    assert any("MUPAD generate failed" in m and "does not exist" in m for m in seen), seen
    assert any("nope.csv" in m and "not found" in m for m in seen), seen
    assert len(viewer.layers) == layers_before
    assert widget.run_button.isEnabled()


def test_cancel_stops_generation_and_adds_nothing(slide_viewer, checkpoint, qtbot):
    viewer = slide_viewer
    viewer.add_shapes([np.array([[100.0, 100.0], [400.0, 400.0]])], shape_type="rectangle", name="rois",
                      units=viewer.layers[0].units)
    widget = _widget(viewer, qtbot)
    widget.prompt_edit.setText("tissue")
    widget.model_combo.setCurrentText(str(checkpoint))
    widget.steps_spin.setValue(500)
    steps = []
    widget._relay.progress.connect(lambda i, done, total: steps.append(done))
    layers_before = len(viewer.layers)
    widget.run()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=30_000)
    assert steps[-1] < 500 and widget.jobs[0].status == "cancelled"
    assert len(viewer.layers) == layers_before
    assert widget.run_button.isEnabled()


def test_bundled_text2he_model_draws_tissue_in_the_rectangles(slide_viewer, qtbot):
    """The bundled text->H&E demo model from the list, at its own pixel size (0.5 µm/px)."""
    from PIL import Image as PILImage

    from napari_mupad.widgets._geometry import camera

    viewer = slide_viewer
    source = viewer.layers[0]
    rects = [np.array([[380.0, 40.0], [508.0, 168.0]]), np.array([[380.0, 190.0], [508.0, 318.0]])]
    shapes = viewer.add_shapes(rects, shape_type="rectangle", name="rois", face_color="transparent",
                               edge_color="yellow", edge_width=2, units=source.units)
    widget = _widget(viewer, qtbot)
    models = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "demo-text2he" in models and "demo-he2ihc" not in models
    widget.model_combo.setCurrentText("demo-text2he")
    assert widget.pixel_spin.value() == pytest.approx(0.5)
    widget.shapes_combo.setCurrentText("rois")
    widget.prompt_edit.setText("H&E FFPE section of breast invasive carcinoma")  # a caption it was trained on
    widget.steps_spin.setValue(20)
    _run(widget, qtbot, timeout=300_000)
    assert [job.status for job in widget.jobs] == ["done", "done"], widget.status_label.text()
    for job, rect in zip(widget.jobs, rects):
        assert job.shape == (256, 256)  # 128 µm at 0.5 µm/px
        edges = job.layer.extent.world + np.array([-0.5, 0.5])[:, None] * np.asarray(job.layer.scale)
        np.testing.assert_allclose(edges, _box(rect), atol=1e-6)
        assert job.layer.metadata["mupad"]["model_id"] == "demo-text2he"
    a, b = (np.asarray(job.layer.data) for job in widget.jobs)
    assert not np.array_equal(a, b)  # one seed per rectangle
    camera(viewer).center = (0, 444, 179)
    height, width = viewer.canvas.size
    camera(viewer).zoom = 0.9 * min(width / 290, height / 150)
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))
    IMAGES.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(shot[..., :3]).save(IMAGES / "plugin-roi-generation.png")
    assert viewer.layers.index(shapes) == len(viewer.layers) - 1


def test_samples_give_the_mean_and_a_spread_layer_over_the_same_rectangle(slide_viewer, checkpoint, generator,
                                                                           qtbot):
    import torch

    from mupad_core.generate.uncertainty import sample_seeds

    viewer = slide_viewer
    units = viewer.layers[0].units
    shapes = viewer.add_shapes([np.array([[200.0, 150.0], [248.0, 214.0]])], shape_type="rectangle", name="rois",
                               units=units)
    widget = _widget(viewer, qtbot)
    widget.model_combo.setCurrentText(str(checkpoint))
    widget.prompt_edit.setText("dense tumour")
    widget.steps_spin.setValue(2)
    widget.seed_spin.setValue(11)
    widget.samples_spin.setValue(3)
    _run(widget, qtbot)
    (job,) = widget.jobs
    assert job.status == "done", widget.status_label.text()
    mean, spread = job.layer, job.spread_layer
    assert spread is not None and spread.name.endswith("spread") and spread.blending == "additive"
    np.testing.assert_allclose(spread.extent.world, mean.extent.world, atol=1e-9)
    assert viewer.layers.index(shapes) == len(viewer.layers) - 1
    # The layers are the mean and spread of the very samples the seeds give one by one.
    cond = generator.conditions(text="dense tumour")
    drawn = torch.stack([generator.generate(*job.shape, cond, steps=2, seed=s) for s in sample_seeds(11, 3)])
    expected_mean = (drawn.mean(0).permute(1, 2, 0).numpy() * 255).round()
    expected_spread = (drawn.std(0, unbiased=False).mul(2).mean(0).numpy() * 255).round()
    assert np.abs(np.asarray(mean.data).astype(float) - expected_mean).max() <= 1
    assert np.abs(np.asarray(spread.data).astype(float) - expected_spread).max() <= 1
    assert np.asarray(spread.data).max() > 0
    assert mean.metadata["mupad"]["sample_seeds"] == sample_seeds(11, 3)


def test_translate_region_returns_the_section_under_the_same_prompt(slide_viewer, qtbot, tmp_path):
    """ff2ffpe in the viewer: the section under the rectangle is inverted and resampled; with
    the same prompt both ways and no guidance it comes back (inversion exact enough), placed
    exactly on the rectangle."""
    from helpers import randomize

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    model = MupadSiT(in_channels=12, hidden_size=48, depth=2, num_heads=2, condition_dims={"text": 384})
    randomize(model, seed=3, std=0.05)
    folder = save_model(model, tmp_path / "ff2ffpe", pipeline={
        "vae": "pixel-unshuffle:2", "tasks": ["ff2ffpe"], "window_px": 64, "encoders": {"text": {"name": "minilm"}}})
    viewer = slide_viewer
    slide = viewer.layers[0]
    mpp = float(slide.scale[-1])
    y0, x0 = 1760 * mpp, 1200 * mpp  # corners on pixel edges: the rectangle is whole slide pixels
    rect = np.array([[y0 - mpp / 2, x0 - mpp / 2], [y0 + 40 * mpp - mpp / 2, x0 + 48 * mpp - mpp / 2]])
    viewer.add_shapes([rect], shape_type="rectangle", name="rois", units=slide.units)
    widget = _widget(viewer, qtbot)
    widget.model_combo.setCurrentText(str(folder))
    widget.condition_combo.setCurrentText("Translate region (FF→FFPE)")
    widget.translate_source_combo.setCurrentText(slide.name)
    widget.source_prompt_edit.setText("fresh frozen")
    widget.target_prompt_edit.setText("fresh frozen")
    widget.inject_spin.setValue(0.0)
    widget.steps_spin.setValue(8)
    _run(widget, qtbot)
    (job,) = widget.jobs
    assert job.status == "done", widget.status_label.text()
    layer = job.layer
    assert layer.name.startswith("translated") and job.shape == (40, 48)
    section = np.asarray(slide.data[0][1760:1800, 1200:1248])
    assert np.abs(np.asarray(layer.data).astype(int) - section).max() <= 1
    edges = layer.extent.world + np.array([-0.5, 0.5])[:, None] * np.asarray(layer.scale)
    np.testing.assert_allclose(edges, rect[[0, 1]], atol=1e-4)
    condition = layer.metadata["mupad"]["condition"]
    assert condition["kind"] == "translate" and condition["section"] == slide.name


def test_generate_cli_from_an_rna_sample_and_a_bad_table(checkpoint, shared_data, tmp_path, capsys):
    """rna2he from the command line: a TCGA sample scored on the bundled pathways; a table with
    no known genes is one line naming the file."""
    import zarr

    from mupad_core.cli import main
    from mupad_core.store import validate_omezarr

    out = tmp_path / "rna.ome.zarr"
    code = main(["generate", "-o", str(out), "--model", str(checkpoint), "--rna", str(shared_data / EXPRESSION),
                 "--sample", "TCGA-FD-A3SR", "--size", "48", "64", "--steps", "2", "--mpp", "0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    validate_omezarr(out)
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].shape == (3, 48, 64)
    condition = group.attrs["mupad"]["condition"]
    assert condition["kind"] == "rna" and condition["sample"] == "TCGA-FD-A3SR" and condition["genes_matched"] > 1000

    bad = tmp_path / "no_genes.csv"
    bad.write_text("sample,NOTAGENE1,NOTAGENE2\ns1,1.0,2.0\n")
    capsys.readouterr()
    code = main(["generate", "-o", str(tmp_path / "bad.ome.zarr"), "--model", str(checkpoint), "--rna", str(bad),
                 "--size", "48", "48", "--steps", "1", "--mpp", "0.5", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "no_genes.csv" in err[0], err
    assert not (tmp_path / "bad.ome.zarr").exists()
