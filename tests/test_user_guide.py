"""The pathologist's user guide (docs/user-guide.md), step by step, in a real napari window.

Each step does what the guide tells a user to do, checks that it did it, and saves the
window as the guide's picture: open the bundled slide, stain it with a bundled demo model,
toggle and fade the overlay, export it to OME-Zarr and reopen it in place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mupad_core.demo import sample_slide_path
from mupad_core.store import validate_omezarr

REPO = Path(__file__).resolve().parents[1]
from helpers import figures_dir  # noqa: E402

IMAGES = figures_dir()
PLUGIN = "napari-mupad"


from helpers import settle_canvas as _settle  # noqa: E402


def _canvas(viewer) -> np.ndarray:
    return np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)


def _save_window(viewer, name: str) -> np.ndarray:
    from PIL import Image

    shot = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3]
    IMAGES.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shot).save(IMAGES / name)
    return shot


@pytest.mark.slow  # ~60 s on 2 cores: the view (about 500 x 400 px of tissue) through demo-he2ihc, 2 steps
def test_open_stain_toggle_export(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)

    # 1. Open: File > Open… (or drag the file in) with the MUPAD reader.
    (slide,) = viewer.open(sample_slide_path(), plugin=PLUGIN)
    assert slide.rgb and slide.multiscale and [str(u) for u in slide.units] == ["micrometer"] * 2
    assert slide.scale[-1] == pytest.approx(0.499, abs=1e-3)
    viewer.reset_view()
    _settle(viewer, qtbot)
    window = _save_window(viewer, "guide-1-open.png")
    assert window.shape[0] > viewer.canvas.size[0]  # the whole window, not just the canvas

    # 2. Stain: Plugins > MUPAD > Virtual stain; pick the model, the region, Run.
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual stain")
    widget.output_edit.setText(str(tmp_path / "results"))
    widget.model_combo.setCurrentText("demo-he2ihc")
    assert widget.source_combo.currentText() == slide.name
    assert widget.task_combo.currentText() == "he2ihc"
    assert widget.mpp_spin.value() == pytest.approx(0.5)  # the model's own pixel size
    widget.region_combo.setCurrentText("Current view")
    assert widget.steps_spin.value() == 2  # the model's own count: a 2-step student
    _settle(viewer, qtbot)
    # Zoom in on the epidermis (level-0 px around x 1000, y 1350): the view is the region.
    mpp = slide.scale[-1]
    viewer.camera.center = (1350 * mpp, 1000 * mpp)
    viewer.camera.zoom = min(np.asarray(viewer.canvas.size) / (np.array([400, 500]) * mpp))
    qtbot.wait(100)
    widget.run()
    assert widget.running, widget.status_label.text()
    qtbot.waitUntil(lambda: not widget.running, timeout=300_000)
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    (overlay,) = job.layers
    assert overlay in viewer.layers and overlay.metadata["mupad"]["model_id"] == "demo-he2ihc"
    assert Path(overlay.metadata["path"]).is_dir() and overlay.metadata["notice"]
    viewer.layers.selection = {overlay}
    _settle(viewer, qtbot)
    _save_window(viewer, "guide-2-stain.png")

    # 3. Toggle and fade: the eye icon hides the overlay; the opacity slider blends it.
    stained = _canvas(viewer)
    overlay.visible = False
    plain = _canvas(viewer)
    overlay.visible = True
    differs = np.abs(stained - plain).sum(-1) > 30
    assert differs.mean() > 0.2  # the stain is on screen, and hiding it shows the slide
    overlay.opacity = 0.5
    half = _canvas(viewer)
    blend = (stained + plain) / 2
    assert np.abs(half - blend)[differs].mean() < 6  # half opacity is half of each, pixel by pixel
    _save_window(viewer, "guide-3-fade.png")
    overlay.opacity = 1.0

    # 4. Export: select the layer, File > Save Selected Layers…, an .ome.zarr name.
    out = tmp_path / "export" / "slide-he2ihc.ome.zarr"
    out.parent.mkdir()
    assert viewer.layers.save(str(out), selected=True, plugin=PLUGIN) == [str(out)]
    validate_omezarr(out)
    (reopened,) = viewer.open(out, plugin=PLUGIN)
    np.testing.assert_allclose(reopened.extent.world, overlay.extent.world, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(reopened.data[0]), np.asarray(overlay.data[0]))
    provenance = reopened.metadata["provenance"]
    assert provenance["model_id"] == "demo-he2ihc" and provenance["generated"] is True
