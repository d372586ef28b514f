"""The synthetic-data widget: N generated variations of every image of a few-shot class-folder set.

A front for `mupad_core.generate.synthetic.augment` (the same as `mupad augment`): pick the
class folder, an image-conditioned model (demo-he2he bundled), how many variations, and an
output folder; the run writes a new class-folder set with a `manifest.csv` that `mupad train`
reads. When it finishes, a preview layer shows the first images of each class beside their
variations, so the user sees what the model made before training on it.

Work runs in a napari `thread_worker`; Cancel stops after the current image. An interrupted
set has no manifest yet (it does not look complete): Run again with the same settings and it
finishes, keeping what was written.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import napari
import napari.viewer
import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ._relay import Relay
from ._worker import JobControls, main_thread_torch_threads, match_torch_threads, resolve_device

DEVICES = ("auto", "cpu", "cuda")
PREVIEW_ROWS = 4  # references shown per preview, across classes
PREVIEW_PX = 160  # each preview cell, resized


@dataclass
class SyntheticJob:
    in_dir: Path
    out_dir: Path
    status: str = "pending"
    counts: dict = field(default_factory=dict)
    layer: object | None = None


def variation_models() -> list[str]:
    """Ids of the bundled and cached models that take a reference image and no spatial template."""
    try:
        from mupad_core.zoo import list_models

        return [e.id for e in list_models() if not e.template and "image" in e.conditions]
    except Exception:  # a broken cache must not keep the widget from opening
        return []


def _augment_worker(in_dir: str, out_dir: str, settings, device: str, threads: int | None,
                    cancel: threading.Event, relay: Relay):
    """Worker thread: the whole augment run; returns (out_dir, counts) or None when cancelled."""
    match_torch_threads(threads)
    import json

    from mupad_core.generate.engine import Cancelled
    from mupad_core.generate.synthetic import SETTINGS_FILE, augment

    def progress(done, total):
        relay.progress.emit(0, done, total)
        if cancel.is_set():
            raise Cancelled()

    try:
        out = augment(in_dir, out_dir, settings, device=resolve_device(device), progress=progress)
    except Cancelled:
        return None
    record = json.loads((Path(out) / SETTINGS_FILE).read_text())
    return str(out), record.get("counts", {})


def preview_grid(out_dir: Path, rows: int = PREVIEW_ROWS, cell: int = PREVIEW_PX) -> np.ndarray:
    """(H, W, 3) uint8: a few references (first column) and their variations, from the manifest."""
    import csv

    from PIL import Image as PILImage

    with (out_dir / "manifest.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    by_reference: dict[str, list[str]] = {}
    for row in table:
        by_reference.setdefault(row["reference"], [])
        if row["generated"] == "1":
            by_reference[row["reference"]].append(row["source"])
    # Round-robin over classes so every class shows up.
    classes: dict[str, list[str]] = {}
    for reference in by_reference:
        classes.setdefault(reference.split("/")[0], []).append(reference)
    chosen = []
    while len(chosen) < rows and any(classes.values()):
        for name in list(classes):
            if classes[name] and len(chosen) < rows:
                chosen.append(classes[name].pop(0))
    columns = 1 + max(len(by_reference[r]) for r in chosen)

    def load(name: str) -> np.ndarray:
        path = out_dir / name
        if not path.is_file():  # originals left out: the variation set has only variations
            return np.full((cell, cell, 3), 255, np.uint8)
        return np.asarray(PILImage.open(path).convert("RGB").resize((cell, cell), PILImage.BILINEAR))

    gap = 4
    grid = np.full((len(chosen) * (cell + gap) - gap, columns * (cell + gap) - gap, 3), 255, np.uint8)
    for r, reference in enumerate(chosen):
        for c, name in enumerate([reference, *by_reference[reference]]):
            grid[r * (cell + gap) : r * (cell + gap) + cell, c * (cell + gap) : c * (cell + gap) + cell] = load(name)
    return grid


class SyntheticDataWidget(JobControls, QWidget):
    """Dock widget: class folder in, variations out (a training set), with a preview layer."""

    _cancel_message = "cancelling after the current image …"
    _label, _busy_noun = "MUPAD synthetic data", "a synthetic-data run"
    _job_noun, _done_word, _failure_title = "set(s)", "written", "MUPAD synthetic data failed"

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._init_job_state(napari_viewer, Relay())
        self.jobs: list[SyntheticJob] = []
        self._relay.progress.connect(lambda _job, done, total: self._events.post(self._on_image, done, total))

        self.input_edit = QLineEdit()
        self.input_edit.setPlaceholderText("class folders: IN/<class>/<image>.png")
        self.input_browse = QPushButton("Folder…")
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("a new folder for the enlarged set")
        self.output_browse = QPushButton("Folder…")
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.setToolTip("a MUPAD model with an image condition stream (variations of a reference)")
        self.model_combo.addItems(variation_models())
        self.variations_spin = QSpinBox()
        self.variations_spin.setRange(1, 1000)
        self.variations_spin.setValue(4)
        self.variations_spin.setToolTip("generated variations per image")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(20)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setRange(0.0, 20.0)
        self.guidance_spin.setSingleStep(0.5)
        self.originals_check = QCheckBox("copy the originals into the new set")
        self.originals_check.setChecked(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.run_button = QPushButton("Write variations")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("idle")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        for label, edit, button in (("Class folders", self.input_edit, self.input_browse),
                                    ("Output", self.output_edit, self.output_browse)):
            row = QHBoxLayout()
            row.addWidget(edit, 1)
            row.addWidget(button)
            form.addRow(label, row)
        form.addRow("Model", self.model_combo)
        form.addRow("Variations", self.variations_spin)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Guidance", self.guidance_spin)
        form.addRow(self.originals_check)
        form.addRow("Device", self.device_combo)
        self._lay_out(form)

        self.input_browse.clicked.connect(lambda: self._browse(self.input_edit, "Class-folder data set"))
        self.output_browse.clicked.connect(lambda: self._browse(self.output_edit, "Output folder"))
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)

    def _browse(self, edit: QLineEdit, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title)
        if folder:
            edit.setText(folder)

    def _start(self) -> None:
        from napari.qt.threading import create_worker

        from mupad_core.generate.synthetic import AugmentSettings, find_class_images

        in_text, out_text = self.input_edit.text().strip(), self.output_edit.text().strip()
        if not in_text or not out_text:
            raise ValueError("choose the class-folder data set and an output folder")
        in_dir, out_dir = Path(in_text).expanduser(), Path(out_text).expanduser()
        classes = find_class_images(in_dir)  # names the folder and what is wrong with it, before any work
        model = self.model_combo.currentText().strip()
        if not model:
            raise ValueError("no model: choose a model with an image stream (e.g. demo-he2he)")
        settings = AugmentSettings(model=model, variations=self.variations_spin.value(), steps=self.steps_spin.value(),
                                   guidance=float(self.guidance_spin.value()), seed=self.seed_spin.value(),
                                   keep_originals=self.originals_check.isChecked())
        self.jobs = [SyntheticJob(in_dir, out_dir)]
        self._cancel = threading.Event()
        total = sum(len(v) for v in classes.values()) * settings.variations
        worker = create_worker(_augment_worker, str(in_dir), str(out_dir), settings, self.device_combo.currentText(),
                               main_thread_torch_threads(), self._cancel, self._relay,
                               _start_thread=False, _ignore_errors=True)
        self._launch(worker, total=total, status=f"loading model {model} … ({total} images to write)")

    def _on_image(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)
        self.status_label.setText(f"image {done}/{total}")
        if self._progress is not None:
            self._progress.update(done - self._progress.n)

    def _on_returned(self, result) -> None:
        job = self.jobs[0]
        if result is None:
            job.status = "cancelled"
            show_info(f"MUPAD synthetic data cancelled: {job.out_dir} is unfinished (no manifest); "
                      "Run again with the same settings to finish it")
            return
        out, job.counts = Path(result[0]), result[1]
        job.status = "done"
        job.layer = self.viewer.add_image(
            preview_grid(out), rgb=True, name=f"synthetic preview {out.name}",
            metadata={"mupad": {"kind": "augment", "out_dir": str(out), "manifest": str(out / "manifest.csv"),
                                "counts": job.counts}, "generated": True, "not_for_diagnosis": True})
        written = sum(job.counts.values())
        show_info(f"MUPAD synthetic data: {written} images in {len(job.counts)} classes -> {out}")

    def _idle_progress(self, text: str) -> int:
        return 1 if self.jobs and self.jobs[0].status == "done" else 0
