"""The Synthetic training data widget in a real napari window: a few-shot class-folder set in,
variations out (the `mupad augment` set), cancel and resume, a preview layer, bad input as a
notification."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from qtpy.QtCore import Qt

from mupad_core.demo import sample_slide_path
from mupad_core.generate.synthetic import SETTINGS_FILE

CROPS = {"epithelium": [(1200, 1760), (1300, 1800)], "stroma": [(900, 2300), (700, 2500)]}  # level-0 x, y


@pytest.fixture
def few_shot(tmp_path):
    """Two classes of two real 64 x 64 px H&E crops of the bundled slide."""
    from mupad_core.slide.readers import open_slide

    folder = tmp_path / "fewshot"
    with open_slide(sample_slide_path()) as reader:
        for name, corners in CROPS.items():
            (folder / name).mkdir(parents=True)
            for k, (x, y) in enumerate(corners):
                Image.fromarray(reader.read_region(0, x, y, 64, 64)).save(folder / name / f"tile{k}.png")
    return folder


from helpers import record_notifications as _notifications  # noqa: E402


REPO = Path(__file__).resolve().parents[1]


def _widget(make_napari_viewer, few_shot, out, show=False):
    viewer = make_napari_viewer(show=show)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mupad", "Synthetic training data")
    widget.input_edit.setText(str(few_shot))
    widget.output_edit.setText(str(out))
    widget.model_combo.setCurrentText("demo-he2he")  # bundled: a reference-image stream
    widget.variations_spin.setValue(2)
    widget.steps_spin.setValue(2)
    return viewer, widget


def test_variations_set_with_cancel_resume_and_preview(make_napari_viewer, qtbot, few_shot, tmp_path):
    out = tmp_path / "enlarged"
    viewer, widget = _widget(make_napari_viewer, few_shot, out, show=True)
    seen, stop = _notifications()
    try:
        # Cancel at once: the run stops after the image in progress; no manifest, so the
        # set does not look complete.
        widget.run()
        assert widget.running
        qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
        assert "cancelling" in widget.status_label.text()
        qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
        assert widget.jobs[0].status == "cancelled"
        assert not (out / "manifest.csv").exists()
        assert not json.loads((out / SETTINGS_FILE).read_text()).get("complete")
        assert len(viewer.layers) == 0
        written = sorted(p.relative_to(out) for p in out.rglob("*-var*.png"))
        assert len(written) == 1
        first = {p: (out / p).read_bytes() for p in written}

        # Run again with the same settings: it finishes, keeping what was written.
        widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    finally:
        stop()
    job = widget.jobs[0]
    assert job.status == "done", widget.status_label.text()
    assert all((out / p).read_bytes() == data for p, data in first.items())
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 + 8  # originals + 2 variations of each of the 4 images
    assert job.counts == {"epithelium": 6, "stroma": 6}
    (preview,) = viewer.layers
    assert preview.name == job.layer.name  # the widget holds it through napari's plugin proxy
    assert preview.rgb, (preview.data.shape, preview.data.dtype)
    assert preview.metadata["mupad"]["manifest"] == str(out / "manifest.csv")
    grid = np.asarray(preview.data)
    assert grid.shape == (4 * 160 + 3 * 4, 3 * 160 + 2 * 4, 3)  # 4 references x (original + 2 variations)
    cells = [grid[:160, c * 164 : c * 164 + 160].astype(int) for c in range(3)]
    assert all(cell.std() > 5 for cell in cells)  # images, not blank cells
    assert np.abs(cells[1] - cells[2]).mean() > 1  # two variations differ
    assert widget.progress_bar.value() == widget.progress_bar.maximum() == 1
    assert any("12 images in 2 classes" in m for m in seen), seen

    from helpers import settle_canvas

    viewer.window._qt_window.resize(1100, 760)
    viewer.reset_view()
    settle_canvas(viewer, qtbot)
    shot = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3]
    from helpers import figures_dir
    Image.fromarray(shot).save(figures_dir() / "plugin-synthetic.png")


def test_bad_folder_and_model_are_notifications(make_napari_viewer, qtbot, few_shot, tmp_path):
    viewer, widget = _widget(make_napari_viewer, tmp_path / "nowhere", tmp_path / "out")
    seen, stop = _notifications()
    try:
        widget.run()
        assert not widget.running and "nowhere: not a folder" in widget.status_label.text()
        widget.input_edit.setText(str(few_shot))
        widget.model_combo.setCurrentText("demo-text2he")  # text stream only: no variations
        widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    finally:
        stop()
    assert "no image condition stream" in widget.status_label.text()
    assert any("not a folder" in m for m in seen) and any("no image condition stream" in m for m in seen)
    assert len(viewer.layers) == 0
