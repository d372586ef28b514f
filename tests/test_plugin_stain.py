"""The virtual-stain widget in a real (Xvfb-drawn) napari viewer, with real worker threads.

Source: the bundled CMU-1-Small-Region.svs opened through the plugin's own reader. Models:
`identity`, and tiny SiT checkpoints saved to disk the way `mupad stain` loads them.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from mupad_core.store.omezarr import PROGRESS_FILE

REPO = Path(__file__).resolve().parents[1]
from helpers import figures_dir  # noqa: E402

IMAGES = figures_dir()
ROI = (400, 900, 512, 384)  # level-0 x, y, w, h on CMU-1-Small-Region (tissue)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def slide_viewer(make_napari_viewer):
    """A shown viewer with the bundled slide as the reader helper makes it (multiscale RGB, scale = mpp)."""
    from napari_mupad._sample_data import cmu1_small_region

    viewer = make_napari_viewer(show=True)
    for data, meta, _kind in cmu1_small_region():
        viewer.add_image(data, **meta)
    return viewer


def _notifications():
    from napari.utils.notifications import notification_manager

    seen = []

    def record(event):
        seen.append(event.notification if hasattr(event, "notification") else event)

    notification_manager.notification_ready.connect(record)
    return seen, lambda: notification_manager.notification_ready.disconnect(record)


def _messages(seen) -> list[str]:
    return [str(getattr(n, "message", n)) for n in seen]


def _checkpoint(folder: Path, *, tasks=("he2he",), seed: int = 0, std: float = 0.05) -> Path:
    """A tiny spatial-template SiT (pixel-unshuffle:2 latents) saved as `mupad stain` loads it."""
    from helpers import randomize

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    model = MupadSiT(in_channels=12, concat_channels=12, hidden_size=48, depth=1, num_heads=2)
    randomize(model, seed=seed, std=std)  # every path live: the output is visibly not the source
    return save_model(model, folder, pipeline={"vae": "pixel-unshuffle:2", "tasks": list(tasks)})


def _widget(viewer, tmp_path, qtbot, **engine):
    from napari_mupad.widgets.stain import StainWidget

    widget = StainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MUPAD stain")
    viewer.window._qt_window.resize(1280, 820)  # room for the canvas beside the dock
    widget.output_edit.setText(str(tmp_path / "out"))
    widget.engine_options.update(engine)
    _settle(viewer, qtbot)
    return widget


from helpers import settle_canvas as _settle  # noqa: E402


def _draw_roi(viewer, source, roi, name="rois"):
    """A Shapes layer with one rectangle whose corners are the ROI's first/last pixel centres + 1."""
    x, y, w, h = roi
    mpp_y, mpp_x = source.scale[-2:]
    rect = np.array([[y * mpp_y, x * mpp_x], [(y + h) * mpp_y, (x + w) * mpp_x]])
    return viewer.add_shapes([rect], shape_type="rectangle", name=name, edge_color="yellow", face_color="transparent",
                             units=source.units)


def _run(widget, qtbot, timeout=120_000):
    widget.run()
    assert widget.running, widget.status_label.text()
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def _cam(viewer):
    from napari_mupad.widgets._geometry import camera

    return camera(viewer)


def _shot(viewer) -> np.ndarray:
    return np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)


def _canvas_box(viewer, top_left_world, bottom_right_world, shot_shape):
    """(row0, col0, row1, col1) canvas pixels of a world box in a screenshot of shape shot_shape."""
    center = np.asarray(_cam(viewer).center)[-2:]
    zoom = _cam(viewer).zoom
    size = np.asarray(viewer.canvas.size, dtype=float)
    ratio = np.asarray(shot_shape[:2]) / size  # device pixel ratio
    tl = ((np.asarray(top_left_world) - center) * zoom + size / 2) * ratio
    br = ((np.asarray(bottom_right_world) - center) * zoom + size / 2) * ratio
    return int(round(tl[0])), int(round(tl[1])), int(round(br[0])), int(round(br[1]))


def _assert_changed_only_inside(viewer, shown, hidden, roi, mpp, inside: float) -> tuple[int, int, int, int]:
    """The two screenshots differ inside the ROI's box (at least `inside` of its pixels) and
    nowhere outside it (2 screen px of slack at the edges); returns the box."""
    x, y, w, h = roi
    assert shown.shape == hidden.shape
    changed = np.abs(shown - hidden).sum(-1) > 0
    r0, c0, r1, c1 = _canvas_box(viewer, ((y - 0.5) * mpp, (x - 0.5) * mpp),
                                 ((y + h - 0.5) * mpp, (x + w - 0.5) * mpp), shown.shape)
    assert 0 < r0 < r1 < changed.shape[0] and 0 < c0 < c1 < changed.shape[1]
    outside = np.ones_like(changed)
    outside[max(r0 - 2, 0) : r1 + 2, max(c0 - 2, 0) : c1 + 2] = False
    assert not changed[outside].any(), "the overlay changed the screen outside its ROI"
    assert changed[r0 + 2 : r1 - 2, c0 + 2 : c1 - 2].mean() > inside, "the overlay is not drawn over its ROI"
    return r0, c0, r1, c1


# -- tests ------------------------------------------------------------------------------


def test_identity_on_drawn_rois_is_exact_and_aligned(slide_viewer, tmp_path, qtbot):
    viewer = slide_viewer
    source = viewer.layers[0]
    mpp = source.scale[-1]
    second = (1500, 2000, 300, 260)
    shapes = _draw_roi(viewer, source, ROI)
    x, y, w, h = second
    shapes.add_rectangles(np.array([[y * mpp, x * mpp], [(y + h) * mpp, (x + w) * mpp]]))
    widget = _widget(viewer, tmp_path, qtbot, block_px=256, chunk_px=128)
    widget.source_combo.setCurrentText(source.name)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.shapes_combo.setCurrentText("rois")
    widget.model_combo.setCurrentText("identity")
    assert widget.rois() == [ROI, second]
    _run(widget, qtbot)

    assert [job.status for job in widget.jobs] == ["done", "done"], widget.status_label.text()
    assert len({job.out for job in widget.jobs}) == 2  # each ROI its own store
    for job, roi in zip(widget.jobs, (ROI, second)):
        assert job.out.is_dir() and not job.out.with_name(job.out.name + ".partial").exists()
        (overlay,) = job.layers
        assert overlay in viewer.layers and overlay.multiscale and overlay.rgb
        x, y, w, h = roi
        expected = np.array([[y * mpp, x * mpp], [(y + h - 1) * mpp, (x + w - 1) * mpp]])
        np.testing.assert_allclose(overlay.extent.world, expected, rtol=0, atol=1e-9)
        pixels = np.asarray(overlay.data[0])
        truth = np.asarray(source.data[0][y : y + h, x : x + w])
        assert np.array_equal(pixels, truth)
        assert overlay.metadata["path"] == str(job.out) and overlay.metadata["mupad"]["not_for_diagnosis"] is True
        assert overlay.metadata["roi_level0"] == list(roi)
        assert viewer.layers.index(overlay) < viewer.layers.index(shapes)  # rectangles stay visible
    assert not [lay for lay in viewer.layers if "(running)" in lay.name]

FAST = dict(window_px=64, overlap_px=16, margin_px=64, block_px=128, chunk_px=128, skip_background=False)


def test_tiny_sit_overlay_streams_in_and_changes_the_screen_only_where_it_lies(slide_viewer, tmp_path, qtbot):
    viewer = slide_viewer
    source = viewer.layers[0]
    mpp = source.scale[-1]
    x, y, w, h = ROI
    _draw_roi(viewer, source, ROI)
    viewer.layers["rois"].visible = False  # the outline is not part of the overlay
    ckpt = _checkpoint(tmp_path / "ckpt")
    widget = _widget(viewer, tmp_path, qtbot, **FAST)
    # Zoom so the ROI fills about half the canvas, the slide's level 0 drawn around it.
    _cam(viewer).center = (0, (y + h / 2) * mpp, (x + w / 2) * mpp)
    _cam(viewer).zoom = 0.5 * min(np.asarray(viewer.canvas.size) / (np.array([h, w]) * mpp))
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.shapes_combo.setCurrentText("rois")
    widget.model_combo.setCurrentText(str(ckpt))
    widget.steps_spin.setValue(2)

    states = []  # (preview layer names, fraction of the ROI shown) after each block

    def watch(index, done, total):
        running = [lay for lay in viewer.layers if lay.name.endswith("(running)")]
        if running:
            data = running[0].data[0] if running[0].multiscale else running[0].data
            states.append((done, total, float(np.asarray(data[:, :, 3]).mean() / 255)))

    widget._relay.progress.connect(watch)
    _run(widget, qtbot)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()

    # It filled in block by block in a '(running)' layer, never complete before the end.
    assert len(states) >= 6, states
    fractions = [f for _, _, f in states]
    assert fractions == sorted(fractions) and 0 < fractions[0] < 0.5, fractions
    # Never ahead of the blocks reported (a chunk shows only once it is on disk), and partly
    # filled well before the end.
    assert all(frac <= done / total + 1e-9 for done, total, frac in states), states
    assert any(0.4 <= frac < 1 for _, _, frac in states), states
    assert not [lay for lay in viewer.layers if lay.name.endswith("(running)")]

    (overlay,) = job.layers
    expected = np.array([[y * mpp, x * mpp], [(y + h - 1) * mpp, (x + w - 1) * mpp]])
    np.testing.assert_allclose(overlay.extent.world, expected, atol=1e-9)
    generated = np.asarray(overlay.data[0])
    truth = np.asarray(source.data[0][y : y + h, x : x + w])
    assert generated.shape == truth.shape
    assert np.abs(generated.astype(int) - truth).mean() > 10  # a real model, not a copy
    provenance = overlay.metadata["mupad"]
    assert provenance["model_id"] == str(ckpt) and len(provenance["weights_hash"]) == 64
    assert provenance["source"]["roi_level0"] == list(ROI) and provenance["steps"] == 2

    after = _shot(viewer)
    overlay.visible = False
    hidden = _shot(viewer)
    overlay.visible = True
    assert after.shape == hidden.shape
    _assert_changed_only_inside(viewer, after, hidden, ROI, mpp, inside=0.9)

    from PIL import Image as PILImage

    IMAGES.mkdir(parents=True, exist_ok=True)
    gap = np.full((after.shape[0], 8, 3), 255)
    PILImage.fromarray(np.concatenate([hidden, gap, after], axis=1).astype(np.uint8)).save(
        IMAGES / "plugin-stain-overlay.png")


def test_current_view_and_whole_slide_identity_overlays_match_the_slide_on_screen(slide_viewer, tmp_path, qtbot):
    viewer = slide_viewer
    source = viewer.layers[0]
    mpp = source.scale[-1]
    widget = _widget(viewer, tmp_path, qtbot)
    _cam(viewer).center = (0, 1100 * mpp, 700 * mpp)
    _cam(viewer).zoom = 1.25 / mpp  # 1.25 screen px per level-0 px: level 0 drawn
    widget.region_combo.setCurrentText("Current view")
    (roi,) = widget.rois()
    top_left, bottom_right = (np.asarray(c) / mpp for c in _visible(viewer))
    assert roi[0] == int(np.ceil(top_left[1] - 1e-3)) and roi[1] == int(np.ceil(top_left[0] - 1e-3))
    assert roi[0] + roi[2] == int(np.ceil(bottom_right[1] - 1e-3))
    assert roi[1] + roi[3] == int(np.ceil(bottom_right[0] - 1e-3))
    _run(widget, qtbot)
    (overlay,) = widget.jobs[0].layers
    x, y, w, h = roi
    np.testing.assert_allclose(overlay.extent.world,
                               [[y * mpp, x * mpp], [(y + h - 1) * mpp, (x + w - 1) * mpp]], atol=1e-9)
    assert np.array_equal(np.asarray(overlay.data[0]), np.asarray(source.data[0][y : y + h, x : x + w]))
    # Identity output drawn exactly on top of its source: the screen does not change at all.
    with_overlay = _shot(viewer)
    overlay.visible = False
    slide_only = _shot(viewer)
    overlay.visible = True
    assert (np.abs(with_overlay - slide_only).sum(-1) > 0).mean() < 0.002

    widget.region_combo.setCurrentText("Whole slide")
    _run(widget, qtbot)
    (whole,) = widget.jobs[0].layers
    np.testing.assert_allclose(whole.extent.world, source.extent.world, atol=1e-9)
    assert len(whole.data) >= 2  # the finished store's pyramid


def _visible(viewer):
    from napari_mupad.widgets._geometry import visible_world_box

    return visible_world_box(viewer)


def test_cancel_mid_run_keeps_napari_responsive_and_leaves_nothing_complete(slide_viewer, tmp_path, qtbot):
    from qtpy.QtCore import QTimer

    viewer = slide_viewer
    source = viewer.layers[0]
    _draw_roi(viewer, source, ROI)
    ckpt = _checkpoint(tmp_path / "ckpt")
    widget = _widget(viewer, tmp_path, qtbot, **FAST)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.model_combo.setCurrentText(str(ckpt))
    widget.steps_spin.setValue(40)  # ~3 s a block on 2 cores: 12 blocks would take long

    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    blocks = []
    widget._relay.progress.connect(lambda i, done, total: blocks.append((done, total)))
    layers_before = len(viewer.layers)
    widget.run()
    assert widget.running
    qtbot.waitUntil(lambda: len(blocks) >= 1, timeout=120_000)
    assert any(lay.name.endswith("(running)") for lay in viewer.layers)
    started_cancel = time.perf_counter()
    qtbot.mouseClick(widget.cancel_button, _left())
    assert "cancelling" in widget.status_label.text()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    timer.stop()
    stopped_after = time.perf_counter() - started_cancel

    assert blocks[-1][0] < blocks[-1][1], "the run was not cut short"
    assert stopped_after < 30
    job = widget.jobs[0]
    assert job.status == "cancelled"
    assert not job.out.exists(), "a cancelled run left a complete-looking store"
    partial = job.out.with_name(job.out.name + ".partial")
    record = json.loads((partial / PROGRESS_FILE).read_text())  # resumable: progress record kept
    assert record["params"]["provenance"]["steps"] == 40
    assert len(viewer.layers) == layers_before, [lay.name for lay in viewer.layers]
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    # The event loop kept running the whole time (the timer ticked; no long freeze).
    gaps = np.diff([t for t in ticks if t < started_cancel + stopped_after])
    assert len(ticks) > 20 and gaps.max() < 2.0, (len(ticks), gaps.max())

    # A second run starts and finishes normally.
    widget.model_combo.setCurrentText("identity")
    _run(widget, qtbot)
    assert widget.jobs[0].status == "done" and widget.jobs[0].out.exists()
    assert widget.jobs[0].out != job.out


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def _corrupt_checkpoint(tmp_path):
    folder = _checkpoint(tmp_path / "corrupt")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


@pytest.mark.parametrize(
    "model,expect",
    [
        (lambda tmp: str(tmp / "no-such-model"), "does not exist"),
        (_corrupt_checkpoint, "damaged or truncated"),
        (lambda tmp: _checkpoint(tmp / "ihc", tasks=("he2ihc:ki67",)), "not 'he2he'"),
    ],
    ids=["missing-folder", "truncated-weights", "wrong-task"],
)
def test_bad_model_is_a_notification_not_a_crash(slide_viewer, tmp_path, qtbot, model, expect):
    viewer = slide_viewer
    widget = _widget(viewer, tmp_path, qtbot)
    widget.region_combo.setCurrentText("Whole slide")
    widget.model_combo.setCurrentText(str(model(tmp_path)))
    widget.task_combo.setCurrentText("he2he")  # after the model: choosing one selects its own task
    seen, stop = _notifications()
    layers_before = len(viewer.layers)
    try:
        _run(widget, qtbot)
    finally:
        stop()
    messages = _messages(seen)
    assert any(expect in m and "MUPAD stain failed" in m for m in messages), messages
    assert len(viewer.layers) == layers_before
    assert widget.run_button.isEnabled() and widget.status_label.text().startswith("error")
    assert not list((tmp_path / "out").glob("*.ome.zarr"))


def test_out_of_memory_mid_run_is_a_notification_and_leaves_no_layer(slide_viewer, tmp_path, qtbot, monkeypatch):
    import torch

    import mupad_core.generate.engine as engine

    real = engine.generate_block
    calls = []

    def oom_on_third_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate_block", oom_on_third_block)
    viewer = slide_viewer
    _draw_roi(viewer, viewer.layers[0], ROI)
    widget = _widget(viewer, tmp_path, qtbot, **FAST)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.model_combo.setCurrentText(str(_checkpoint(tmp_path / "ckpt")))
    widget.steps_spin.setValue(1)
    layers_before = len(viewer.layers)
    seen, stop = _notifications()
    try:
        _run(widget, qtbot)
    finally:
        stop()
    assert any("out of memory" in m for m in _messages(seen)), _messages(seen)
    assert widget.jobs[0].status == "failed" and not widget.jobs[0].out.exists()
    assert len(viewer.layers) == layers_before  # the partial preview is gone too
    assert widget.run_button.isEnabled()


def test_unreadable_slide_and_empty_region_are_notifications(make_napari_viewer, tmp_path, qtbot):
    viewer = make_napari_viewer()
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="broken",
                     metadata={"path": str(broken), "mpp": (0.5, 0.5)}, scale=(0.5, 0.5))
    widget = _widget(viewer, tmp_path, qtbot)
    widget.region_combo.setCurrentText("Whole slide")
    seen, stop = _notifications()
    try:
        _run(widget, qtbot)
        widget.region_combo.setCurrentText("Drawn rectangles")  # no Shapes layer: refused before any thread
        widget.run()
        assert not widget.running
    finally:
        stop()
    messages = _messages(seen)
    assert any("broken.svs" in m for m in messages), messages
    assert any("Shapes" in m for m in messages), messages
    assert len(viewer.layers) == 1


def test_widgets_open_from_the_plugin_menu_without_importing_torch(make_napari_viewer):
    import subprocess
    import sys

    code = ("import sys, napari_mupad.widgets.stain, napari_mupad.widgets.roi_generate, napari_mupad.widgets.synthetic\n"
            "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "opening the widgets imported torch: " + proc.stderr[-2000:]

    from napari_mupad.widgets.roi_generate import RoiGenerateWidget
    from napari_mupad.widgets.stain import StainWidget
    from napari_mupad.widgets.synthetic import SyntheticDataWidget

    viewer = make_napari_viewer()
    _, stain = viewer.window.add_plugin_dock_widget("napari-mupad", "Virtual stain")
    _, generate = viewer.window.add_plugin_dock_widget("napari-mupad", "Generate tissue in ROIs")
    _, synthetic = viewer.window.add_plugin_dock_widget("napari-mupad", "Synthetic training data")
    assert isinstance(stain, StainWidget) and isinstance(generate, RoiGenerateWidget)
    assert isinstance(synthetic, SyntheticDataWidget) and synthetic.model_combo.currentText() == "demo-he2he"
    viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True, name="slide", metadata={"path": "x.svs", "mpp": (1, 1)})
    viewer.add_shapes(name="rois")
    assert stain.source_combo.currentText() == "slide"  # the widgets follow this viewer's layers
    assert generate.shapes_combo.currentText() == "rois" and generate.reference_combo.currentText() == "slide"


def test_partial_store_preview_shows_finished_chunks_only(tmp_path, monkeypatch):
    """The preview of a store being written: finished chunks opaque, the rest transparent;
    thumbnails for big outputs filled as chunks finish."""
    import napari_mupad.widgets._preview as preview
    from mupad_core.store import PyramidWriter

    monkeypatch.setattr(preview, "SINGLE_SCALE_MAX_PX", 256)  # a small image gets thumbnail levels too
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 600, 700), dtype=np.uint8)
    writer = PyramidWriter(tmp_path / "p.ome.zarr", (600, 700), 3, mpp=(0.5, 0.5), chunk=128)
    writer.write_tile(0, 128, image[:, :128, 128:256])
    writer.write_tile(512, 640, image[:, 512:, 640:])
    store = preview.PartialStore(tmp_path / "p.ome.zarr.partial")
    assert store.factors == [1, 8] and int(store.done.sum()) == 2
    levels = preview.preview_levels(store)
    assert levels[0].shape == (600, 700, 4) and levels[1].shape == (75, 88, 4)
    full = np.asarray(levels[0])
    assert np.array_equal(full[:128, 128:256, :3], image[:, :128, 128:256].transpose(1, 2, 0))
    assert (full[:128, 128:256, 3] == 255).all() and (full[512:, 640:, 3] == 255).all()
    assert full[..., 3].astype(bool).sum() == 128 * 128 + 88 * 60
    assert not full[128:512, :, :].any()  # unfinished: transparent and empty
    # Stepped and partial requests as napari makes them.
    part = levels[0][100:300:3, 150:160]
    assert np.array_equal(part, full[100:300:3, 150:160])
    assert np.array_equal(levels[0][5, 130:140, :3], full[5, 130:140, :3])
    thumb = np.asarray(levels[1])
    assert np.array_equal(thumb[:16, 16:32, :3], image[:, :128:8, 128:256:8].transpose(1, 2, 0))
    assert (thumb[:16, 16:32, 3] == 255).all() and thumb[20:60, :, 3].max() == 0
    writer.write_tile(256, 0, image[:, 256:384, :128])
    assert store.update() == 3
    assert np.array_equal(np.asarray(levels[0])[256:384, :128, :3], image[:, 256:384, :128].transpose(1, 2, 0))
    assert np.array_equal(np.asarray(levels[1])[32:48, :16, :3], image[:, 256:384:8, :128:8].transpose(1, 2, 0))


def test_cancelled_result_resumes_into_the_same_store(slide_viewer, tmp_path, qtbot, monkeypatch):
    """Cancel after block 2 (set from the worker thread itself: deterministic), then resume:
    the finished store is the cancelled one's path, and equals an uninterrupted run."""
    from qtpy.QtCore import Qt

    viewer = slide_viewer
    source = viewer.layers[0]
    _draw_roi(viewer, source, ROI)
    ckpt = _checkpoint(tmp_path / "ckpt")
    widget = _widget(viewer, tmp_path, qtbot, **FAST)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.model_combo.setCurrentText(str(ckpt))
    widget.steps_spin.setValue(2)
    widget.seed_spin.setValue(3)

    def cancel_after_two(index, done, total):  # runs in the worker thread, before its cancel check
        if done == 2:
            widget._cancel.set()

    widget._relay.progress.connect(cancel_after_two, Qt.ConnectionType.DirectConnection)
    _run(widget, qtbot)
    widget._relay.progress.disconnect(cancel_after_two)
    cancelled = widget.jobs[0]
    assert cancelled.status == "cancelled" and not cancelled.out.exists()
    record = json.loads((cancelled.out.with_name(cancelled.out.name + ".partial") / PROGRESS_FILE).read_text())
    # Exactly the 2 blocks reported are on disk, though the engine may have generated a third.
    finished = int(np.unpackbits(np.frombuffer(base64.b64decode(record["done"]), dtype=np.uint8)).sum())
    assert finished == 2, finished

    import mupad_core.generate.engine as engine

    computed = []
    real = engine.generate_block
    monkeypatch.setattr(engine, "generate_block", lambda *a, **k: computed.append(1) or real(*a, **k))
    widget.resume_check.setChecked(True)
    _run(widget, qtbot)
    resumed = widget.jobs[0]
    assert resumed.status == "done" and resumed.out == cancelled.out and resumed.out.is_dir()
    assert not resumed.out.with_name(resumed.out.name + ".partial").exists()
    assert len(computed) == 12 - finished  # 12 blocks of 128 px; the finished ones were not recomputed
    monkeypatch.undo()

    widget.resume_check.setChecked(False)
    _run(widget, qtbot)
    fresh = widget.jobs[0]
    assert fresh.out != resumed.out
    a = zarr.open_group(str(resumed.out), mode="r")["0"][:]
    b = zarr.open_group(str(fresh.out), mode="r")["0"][:]
    assert np.array_equal(a, b)  # resume gives the uninterrupted result bit for bit


@pytest.mark.slow  # ~40 s on 2 cores: a 512² ROI through the TAEF2 codec and a 4-block SiT, 4 steps
def test_bundled_he2ihc_model_at_its_own_pixel_size(slide_viewer, tmp_path, qtbot):
    """A bundled demo model from the list: its task and pixel size (0.5 µm/px) are taken up,
    the overlay covers the drawn ROI at that size, and the screen shows it there."""
    from PIL import Image as PILImage

    viewer = slide_viewer
    source = viewer.layers[0]
    mpp_x, mpp_y = source.metadata["mpp"]
    roi = (700, 1000, 512, 512)  # epidermis and dermis
    _draw_roi(viewer, source, roi)
    widget = _widget(viewer, tmp_path, qtbot)
    models = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert models[0] == "identity" and "demo-he2ihc" in models and "demo-he2mif" in models
    assert "demo-text2he" not in models  # generation from text: the other widget's
    widget.model_combo.setCurrentText("demo-he2ihc")
    assert widget.task_combo.currentText() == "he2ihc" and widget.mpp_spin.value() == pytest.approx(0.5)
    widget.region_combo.setCurrentText("Drawn rectangles")
    assert widget.steps_spin.value() == 2  # the model's own count: a 2-step student
    _run(widget, qtbot, timeout=300_000)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    (overlay,) = job.layers
    x, y, w, h = roi
    data = np.asarray(overlay.data[0])
    assert data.shape == (round(h * mpp_y / 0.5), round(w * mpp_x / 0.5), 3)
    assert overlay.metadata["mupad"]["engine"]["target_mpp"] == pytest.approx(0.5)
    assert overlay.metadata["mupad"]["engine"]["window_px"] == 128  # the model's own tile size
    np.testing.assert_allclose(overlay.scale, (0.5, 0.5))
    # Pixel edges: top-left exactly the ROI's; bottom-right within one output pixel.
    lo = overlay.extent.world[0] - np.asarray(overlay.scale) / 2
    hi = overlay.extent.world[1] + np.asarray(overlay.scale) / 2
    np.testing.assert_allclose(lo, [(y - 0.5) * mpp_y, (x - 0.5) * mpp_x], atol=1e-9)
    assert np.all(np.abs(hi - [(y + h - 0.5) * mpp_y, (x + w - 0.5) * mpp_x]) < 0.5 / 2 + 1e-9)
    viewer.layers["rois"].visible = False
    _cam(viewer).center = (0, (y + h / 2) * mpp_y, (x + w / 2) * mpp_x)
    _cam(viewer).zoom = 0.9 * min(np.asarray(viewer.canvas.size) / (np.array([h, w]) * mpp_y))
    qtbot.wait(100)
    widget_shot = _shot(viewer)
    overlay.visible = False
    slide_shot = _shot(viewer)
    overlay.visible = True
    assert (np.abs(widget_shot - slide_shot).sum(-1) > 30).mean() > 0.2  # the IHC overlay is on screen
    IMAGES.mkdir(parents=True, exist_ok=True)
    gap = np.full((slide_shot.shape[0], 8, 3), 255)
    PILImage.fromarray(np.concatenate([slide_shot, gap, widget_shot], axis=1).astype(np.uint8)).save(
        IMAGES / "plugin-stain-demo-he2ihc.png")

    # Side by side: H&E | IHC in two boxes under one camera; back to the overlay as it was.
    overlay.opacity = 0.4
    widget.compare_button.setChecked(True)
    grid = viewer.canvas.grid
    assert grid.enabled and overlay.opacity == 1.0 and source.visible and overlay.visible
    shown = [i for i, layer in enumerate(viewer.layers) if layer.visible]
    assert len(shown) == 2 and len({grid.position(i, viewer.layers) for i in shown}) == 2
    _settle(viewer, qtbot)
    pair = _shot(viewer)
    half = pair.shape[1] // 2
    left, right = pair[:, :half], pair[:, half : 2 * half]  # an odd canvas width leaves one column over
    tissue = [(np.abs(box - box.reshape(-1, 3).max(0)).sum(-1) > 60).mean() for box in (left, right)]
    assert min(tissue) > 0.05 and np.abs(left - right).mean() > 5  # two different images of tissue
    PILImage.fromarray(pair.astype(np.uint8)).save(IMAGES / "plugin-side-by-side.png")
    widget.compare_button.setChecked(False)
    assert not grid.enabled and overlay.opacity == pytest.approx(0.4) and overlay.visible


def test_bundled_he2mif_model_gives_named_marker_layers(slide_viewer, tmp_path, qtbot):
    """The mIF layer set: three coloured additive marker layers over the ROI and nowhere else;
    the screenshots (H&E | H&E + markers | markers alone) go into the docs."""
    from PIL import Image as PILImage

    viewer = slide_viewer
    source = viewer.layers[0]
    roi = (1200, 1760, 224, 160)  # dense tissue
    _draw_roi(viewer, source, roi)
    widget = _widget(viewer, tmp_path, qtbot)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.model_combo.setCurrentText("demo-he2mif")
    assert widget.task_combo.currentText() == "he2mif" and widget.mpp_spin.value() == pytest.approx(0.25)
    widget.steps_spin.setValue(4)
    _run(widget, qtbot, timeout=300_000)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    names = [lay.name.rsplit(" ", 1)[-1] for lay in job.layers]
    assert names == ["DAPI", "Lap2beta", "Ki67"]
    assert [lay.blending for lay in job.layers] == ["additive"] * 3
    mpp = source.scale[-1]
    for layer in job.layers:
        np.testing.assert_allclose(layer.scale, (0.25, 0.25))
        lo = layer.extent.world[0] - 0.125
        hi = layer.extent.world[1] + 0.125
        x, y, w, h = roi
        np.testing.assert_allclose(lo, [(y - 0.5) * mpp, (x - 0.5) * mpp], atol=1e-9)
        assert np.all(np.abs(hi - [(y + h - 0.5) * mpp, (x + w - 0.5) * mpp]) <= 0.125 + 1e-9)
        assert layer.metadata["mupad"]["task"] == "he2mif"

    x, y, w, h = roi
    viewer.layers["rois"].visible = False
    _cam(viewer).center = (0, (y + h / 2) * mpp, (x + w / 2) * mpp)
    _cam(viewer).zoom = 0.6 * min(np.asarray(viewer.canvas.size) / (np.array([h, w]) * mpp))
    qtbot.wait(100)
    with_markers = _shot(viewer)
    for layer in job.layers:
        layer.visible = False
    he_only = _shot(viewer)
    r0, c0, r1, c1 = _assert_changed_only_inside(viewer, with_markers, he_only, roi, mpp, inside=0.5)
    for layer in job.layers:
        layer.visible = True
    source.visible = False
    markers_only = _shot(viewer)
    source.visible = True
    inside = markers_only[r0 + 2 : r1 - 2, c0 + 2 : c1 - 2]
    # Additive colour layers on black: several hues, not one grey image.
    assert inside.max() > 60 and np.ptp(inside.reshape(-1, 3).mean(0)) > 5
    crop = (slice(max(r0 - 40, 0), r1 + 40), slice(max(c0 - 40, 0), c1 + 40))
    gap = np.full((with_markers[crop].shape[0], 8, 3), 255)
    IMAGES.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.concatenate([he_only[crop], gap, with_markers[crop], gap, markers_only[crop]],
                                      axis=1).astype(np.uint8)).save(IMAGES / "plugin-stain-mif-layers.png")


def test_samples_add_a_spread_overlay_and_strength_follows_the_task(slide_viewer, tmp_path, qtbot):
    """Uncertainty in the viewer: with Samples 3 the result is the mean and a 'spread' layer
    lies over exactly the same place, brightest where the samples disagree."""
    viewer = slide_viewer
    source = viewer.layers[0]
    roi = (400, 900, 256, 192)
    _draw_roi(viewer, source, roi)
    ckpt = _checkpoint(tmp_path / "ckpt")
    widget = _widget(viewer, tmp_path, qtbot, **FAST)
    widget.task_combo.setCurrentText("he2ihc")
    assert not widget.strength_spin.isEnabled()  # another kind of image: no partial start
    widget.model_combo.setCurrentText(str(ckpt))
    assert widget.task_combo.currentText() == "he2he" and widget.strength_spin.isEnabled()
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.steps_spin.setValue(2)
    widget.samples_spin.setValue(3)
    widget.strength_spin.setValue(0.6)
    _run(widget, qtbot)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    mean, spread = job.layers
    assert mean.rgb and spread.name.endswith("spread") and not spread.rgb
    np.testing.assert_allclose(spread.extent.world, mean.extent.world, atol=1e-9)
    engine = mean.metadata["mupad"]["engine"]
    assert engine["samples"] == 3 and engine["strength"] == pytest.approx(0.6)
    values = np.asarray(spread.data[0] if spread.multiscale else spread.data)
    assert values.shape == np.asarray(mean.data[0]).shape[:2] and values.max() > 0
    assert spread.metadata["provenance"]["spread_of"] == job.out.name


def test_variations_model_with_guidance_stains_a_drawn_roi(slide_viewer, tmp_path, qtbot):
    """he2he through the widget: the bundled variations model (image stream) with annealed guidance."""
    viewer = slide_viewer
    source = viewer.layers[0]
    roi = (1200, 1760, 64, 64)  # one window of the model
    _draw_roi(viewer, source, roi)
    widget = _widget(viewer, tmp_path, qtbot)
    assert not widget.guidance_spin.isEnabled()  # identity: no stream to guide
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.model_combo.setCurrentText("demo-he2he")
    assert widget.task_combo.currentText() == "he2he" and widget.guidance_spin.isEnabled()
    widget.guidance_spin.setValue(1.5)
    widget.schedule_combo.setCurrentText("annealed")
    widget.steps_spin.setValue(2)
    _run(widget, qtbot, timeout=300_000)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    recorded = job.layers[0].metadata["mupad"]
    assert recorded["guidance"] == 1.5 and recorded["engine"]["guidance_schedule"] == "annealed"
    data = np.asarray(job.layers[0].data[0])
    assert data.std() > 5  # tissue-like output, not a flat fill


def test_embedding_flow_folder_stains_a_drawn_roi_as_the_library_does(slide_viewer, tmp_path, qtbot):
    """he2ihc by the paper's embedding route through the widget: a flow folder (written as
    `mupad train` writes one, its generator the bundled demo-he2he) picked in the Model box
    runs the pair, and the overlay equals the library's run of the same folder, pixel for pixel."""
    import torch

    from mupad_core.generate.engine import StainConfig, run_stain
    from mupad_core.generate.handles import load_handle
    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.embedding_flow import EmbeddingFlow
    from mupad_core.slide import open_slide

    torch.manual_seed(0)
    flow = EmbeddingFlow(embed_dim=64, hidden_size=32, depth=3)  # demo-he2he's encoder gives 64-d tokens
    for p in flow.parameters():  # every layer live (the output layer starts at zero: the identity)
        torch.nn.init.normal_(p, std=0.2)
    folder = save_model(flow, tmp_path / "flow", pipeline={
        "vae": "pixel-unshuffle:4", "tasks": ["he2ihc"], "template": "source", "kind": "embedding-flow",
        "generator": "demo-he2he", "flow_steps": 4, "conditions": [], "window_px": 64, "mpp": 0.5})

    viewer = slide_viewer
    source = viewer.layers[0]
    roi = (1200, 1760, 128, 64)
    _draw_roi(viewer, source, roi)
    widget = _widget(viewer, tmp_path, qtbot)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.model_combo.setCurrentText(str(folder))
    assert widget.task_combo.currentText() == "he2ihc"
    widget.steps_spin.setValue(2)
    _run(widget, qtbot, timeout=300_000)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    recorded = job.layers[0].metadata["mupad"]
    assert recorded["model_id"] == str(folder) and recorded["task"] == "he2ihc"
    shown = np.asarray(job.layers[0].data[0])

    engine = recorded["engine"]
    config = StainConfig(**{k: v for k, v in engine.items() if k in StainConfig.__dataclass_fields__})
    with open_slide(_slide_path()) as reader:
        out = run_stain(reader, load_handle(str(folder), "he2ihc"), tmp_path / "library.ome.zarr", config)
    library = zarr.open_group(str(out), mode="r")["0"][:]
    assert shown.shape == library.shape[1:] + (3,)  # the layer is RGB, channels last
    assert np.array_equal(shown, library.transpose(1, 2, 0))
    # The flow's weights are in the pair (its own hash mixed into the generator's), and the
    # generator alone is another model: the widget ran the flow, not just its generator.
    assert recorded["weights_hash"] != load_handle("demo-he2he", "he2he").weights_hash


def _slide_path():
    from mupad_core.demo import sample_slide_path

    return sample_slide_path()


def test_a_slide_without_pixel_size_runs_at_the_size_stated_in_the_widget(make_napari_viewer, cmu1, tmp_path, qtbot):
    """A PNG states no pixel size: Run says which field to set (no thread started); with
    'Source µm/px' set the run goes through, the layer keeps the size and the output records
    it as given, not read from the file."""
    from PIL import Image

    from mupad_core.slide.readers import open_slide
    from napari_mupad._reader import get_reader

    with open_slide(cmu1) as reader:
        pixels = np.asarray(reader.read_region(0, 400, 900, 256, 192))[..., :3]
    path = tmp_path / "no-pixel-size.png"
    Image.fromarray(pixels).save(path)
    viewer = make_napari_viewer()
    for data, meta, _kind in get_reader(str(path))(str(path)):
        viewer.add_image(data, **meta)
    layer = viewer.layers[0]
    assert layer.metadata.get("mpp") is None
    widget = _widget(viewer, tmp_path, qtbot)
    widget.region_combo.setCurrentText("Whole slide")
    seen, stop = _notifications()
    try:
        widget.run()
        assert not widget.running
    finally:
        stop()
    assert any("Source µm/px" in m and "no-pixel-size.png" in m for m in _messages(seen)), _messages(seen)

    widget.src_mpp_spin.setValue(0.5)
    _run(widget, qtbot)
    assert widget.jobs[0].status == "done", widget.status_label.text()
    assert layer.metadata["mpp"] == (0.5, 0.5)
    source = zarr.open_group(str(widget.jobs[0].out), mode="r").attrs["mupad"]["source"]
    assert source["mpp"] == [0.5, 0.5] and source["mpp_origin"] == "given"


@pytest.mark.parametrize("model", ["demo-he2ihc", "demo-he2mif", "identity"])
def test_cli_demo_and_widget_resolve_the_same_engine_settings(make_napari_viewer, tmp_path, qtbot, model):
    """One defaults function (StainConfig.for_model) behind every entry point: the same model
    and the same settings give the same config, down to the pixel size and window."""
    from mupad_core.cli import _resolve_task, _stain_config, build_parser
    from mupad_core.demo import DemoConfig, demo_stain_config
    from mupad_core.generate.config import StainConfig

    args = build_parser().parse_args(["stain", "slide.svs", "-o", "out.ome.zarr", "--model", model,
                                      "--steps", "12", "--device", "cpu"])
    _resolve_task(args)
    cli = _stain_config(args)
    widget = _widget(make_napari_viewer(), tmp_path, qtbot)
    widget.model_combo.setCurrentText(model)
    widget.steps_spin.setValue(12)
    from_widget = widget.settings(model, cli.task)
    demo = demo_stain_config(model, cli.task, DemoConfig(steps=12))
    keys = ("task", "target_mpp", "window_px", "overlap_px", "margin_px", "steps", "seed", "guidance", "method")
    assert {k: getattr(cli, k) for k in keys} == {k: getattr(from_widget, k) for k in keys}
    if model != "identity":  # the demo gives identity its own window; it records none
        assert {k: getattr(cli, k) for k in keys} == {k: getattr(demo, k) for k in keys}
    assert cli == StainConfig.for_model(model, task=cli.task, steps=12, batch_size=cli.batch_size)


def test_a_few_step_model_runs_at_its_own_step_count_unless_told(make_napari_viewer, tmp_path, qtbot):
    """A distilled student records the steps it was made for (`steps` in mupad_pipeline.json):
    the command line and the widget start from it, and a step count the user gives wins."""
    import json
    import shutil

    from mupad_core.cli import _resolve_task, _stain_config, build_parser
    from mupad_core.generate.config import StainConfig
    from mupad_core.zoo import resolve_model

    from mupad_core.demo import DEMO_STEPS, DemoConfig, demo_stain_config

    student = tmp_path / "student"
    shutil.copytree(resolve_model("demo-he2mif"), student)
    pipeline = json.loads((student / "mupad_pipeline.json").read_text())
    (student / "mupad_pipeline.json").write_text(json.dumps({**pipeline, "steps": 2}))
    assert StainConfig.for_model("demo-he2mif").steps == 20  # a model that records none: the engine's default
    assert StainConfig.for_model(str(student)).steps == 2
    assert StainConfig.for_model(str(student), steps=6).steps == 6
    assert demo_stain_config(str(student), "he2mif").steps == 2  # `mupad demo` too
    assert demo_stain_config("demo-he2mif", "he2mif").steps == DEMO_STEPS
    assert demo_stain_config(str(student), "he2mif", DemoConfig(steps=5)).steps == 5

    def cli(*extra):
        args = build_parser().parse_args(["stain", "slide.svs", "-o", "out.ome.zarr", "--model", str(student), *extra])
        _resolve_task(args)
        return _stain_config(args).steps

    assert cli() == 2 and cli("--steps", "7") == 7
    widget = _widget(make_napari_viewer(), tmp_path, qtbot)
    widget.model_combo.setCurrentText(str(student))
    assert widget.steps_spin.value() == 2 and widget.settings(str(student), "he2mif").steps == 2
    widget.model_combo.setCurrentText("demo-he2mif")
    assert widget.steps_spin.value() == 20


def test_geojson_regions_import_stain_and_export(slide_viewer, tmp_path, qtbot):
    """QuPath's GeoJSON in, polygons as napari shapes, a stain that keeps only the polygons'
    pixels, and the shapes back out as GeoJSON at the same level-0 coordinates."""
    from mupad_core.slide.regions import read_regions

    regions_file = Path(__file__).parent / "data" / "qupath-regions.geojson"
    viewer = slide_viewer
    widget = _widget(viewer, tmp_path, qtbot)
    seen, stop = _notifications()
    try:
        layer = widget.import_geojson(regions_file)
    finally:
        stop()
    assert any("holes" in m for m in _messages(seen))  # napari shapes have none: said, not silent
    assert len(layer.data) == 3 and set(layer.shape_type) == {"polygon"}
    exported = widget.export_geojson(tmp_path / "back.geojson")
    original, back = read_regions(regions_file), read_regions(exported)
    for a, b in zip(original.polygons, back.polygons):
        ring = b.exterior[:-1] if np.array_equal(b.exterior[0], b.exterior[-1]) else b.exterior
        np.testing.assert_allclose(ring[: len(a.exterior) - 1], a.exterior[:-1], atol=1e-3)

    from PIL import Image as PILImage

    viewer.reset_view()
    _settle(viewer, qtbot)
    IMAGES.mkdir(parents=True, exist_ok=True)  # the guide's picture: QuPath's regions as napari shapes
    PILImage.fromarray(_shot(viewer).astype(np.uint8)).save(IMAGES / "plugin-geojson-regions.png")

    layer.data = [layer.data[1]]  # keep the triangle: (1000, 1000), (1300, 1000), (1000, 1300)
    widget.region_combo.setCurrentText("Drawn rectangles")
    widget.shapes_combo.setCurrentText(layer.name)
    _run(widget, qtbot)
    job = widget.jobs[0]
    assert job.status == "done" and job.roi == (1000, 1000, 300, 300)
    image = zarr.open_group(str(job.out), mode="r")["0"][:]
    with open_slide_bundled() as reader:
        source = reader.read_region(0, 1000, 1000, 300, 300).transpose(2, 0, 1)
    np.testing.assert_array_equal(image[:, 20, 20], source[:, 20, 20])  # inside the triangle
    assert (image[:, 280, 280] == 255).all()  # outside it, inside its box: background


def open_slide_bundled():
    from mupad_core.demo import sample_slide_path
    from mupad_core.slide.readers import open_slide

    return open_slide(sample_slide_path())
