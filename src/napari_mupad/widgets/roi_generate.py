"""The ROI generation widget: new tissue in each drawn rectangle, from a prompt, an RNA profile or an image.

For every rectangle of the chosen Shapes layer, `mupad_core.generate.roi` samples a region
from noise with a token-conditioned MupadSiT (windows fused where the rectangle is larger
than the model's window) under one condition:

- a text prompt (the checkpoint's text encoder, MiniLM by default);
- an RNA profile: an expression table (CSV/TSV or .h5ad) and a sample/spot id, scored on the
  bundled pathway gene sets by `mupad_core.rna.pathways.pathway_scores`;
- a reference image: another layer's pixels under the rectangle, through the checkpoint's
  image encoder.

Each result is a new RGB layer whose pixel edges are exactly the rectangle's edges, with the
provenance (model, weights hash, condition, seed, steps) in its metadata. Work runs in a
napari `thread_worker`; Cancel stops at the next sampler step; errors are notifications.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import napari
import napari.viewer
import numpy as np
from napari.layers import Image, Shapes
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
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
    QStackedWidget,
    QWidget,
)

from mupad_core.generate.config import check_region_size

from . import _geometry as geo
from ._relay import Relay
from ._worker import JobControls, main_thread_torch_threads, match_torch_threads, resolve_device

CONDITIONS = ("Text prompt", "RNA profile", "Reference image", "Translate region (FF→FFPE)")
KINDS = ("text", "rna", "image", "translate")
DEVICES = ("auto", "cpu", "cuda")
REFERENCE_MAX_PX = 2048  # a reference region is read from the level that brings it under this


@dataclass
class RoiJob:
    index: int
    shape: tuple[int, int]  # output (height, width) px
    scale: tuple[float, float]
    translate: tuple[float, float]
    box: tuple[tuple[float, float], tuple[float, float]]  # world (y, x) top-left, bottom-right
    reference: object | None = None  # lazy array (h, w, C) for image conditioning
    layer: object | None = None
    spread_layer: object | None = None  # with Samples > 1: where the samples disagree
    status: str = "pending"


def generation_models() -> list[str]:
    """Ids of the bundled and cached models that generate from conditions (no spatial template)."""
    try:
        from mupad_core.zoo import list_models

        return [e.id for e in list_models() if not e.template and e.conditions]
    except Exception:  # a broken cache must not keep the widget from opening
        return []


def _generate_worker(model: str, device: str, threads: int, kind: str, value, jobs: list, steps: int, seed: int,
                     guidance: float, cancel: threading.Event, relay: Relay, samples: int = 1) -> list:
    """Worker thread: load the model, encode the condition, sample each rectangle."""
    match_torch_threads(threads)
    from mupad_core.generate.engine import Cancelled
    from mupad_core.generate.roi import condition_from, generate_samples, generation_provenance, load_generator
    from mupad_core.generate.uncertainty import mean_and_spread

    gen = load_generator(model, device=resolve_device(device))
    if kind == "translate":
        return _translate_jobs(gen, value, jobs, steps, guidance, cancel, relay)
    shared, provenance_condition = condition_from(gen, kind, value) if kind != "image" else (None, {"kind": "image"})
    results = []
    for index, (height, width), reference in jobs:
        if cancel.is_set():
            results.append((index, "cancelled"))
            continue
        cond = shared if kind != "image" else condition_from(gen, "image", reference)[0]

        def progress(done, total, index=index):
            relay.progress.emit(index, done, total)
            if cancel.is_set():
                raise Cancelled()

        try:
            drawn = generate_samples(gen, height, width, cond, samples=samples, seed=seed + index, steps=steps,
                                     guidance=guidance, progress=progress)
        except Cancelled:
            results.append((index, "cancelled"))
            continue
        pixels, spread = mean_and_spread(drawn, one_channel=True)
        out = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        spread_out = (spread[0].numpy() * 255).round().astype(np.uint8) if samples > 1 else None
        provenance = generation_provenance(gen, "generate", provenance_condition, seed=seed + index, steps=steps,
                                           guidance=guidance, samples=samples)
        relay.result.emit(index, (out, provenance, spread_out))
        results.append((index, "done"))
    return results


def _translate_jobs(gen, value, jobs: list, steps: int, guidance: float, cancel: threading.Event,
                    relay: Relay) -> list:
    """Worker thread: each rectangle's section pixels, translated to the target prompt's domain."""
    from skimage.transform import resize

    from mupad_core.generate.engine import Cancelled
    from mupad_core.generate.roi import generation_provenance
    from mupad_core.generate.translate import TranslateSettings, translate_region

    source_prompt, target_prompt, inject_steps, section = value
    settings = TranslateSettings(source_prompt, target_prompt, steps=steps, guidance=guidance,
                                 inject_steps=inject_steps)
    results = []
    for index, (height, width), reference in jobs:
        if cancel.is_set():
            results.append((index, "cancelled"))
            continue
        pixels = np.asarray(reference)[..., :3]
        if pixels.shape[:2] != (height, width):  # the section at the rectangle's pixel size
            pixels = resize(pixels, (height, width), order=1, anti_aliasing=True, preserve_range=True)
        pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)

        def progress(done, total, index=index):
            relay.progress.emit(index, done, total)
            if cancel.is_set():
                raise Cancelled()

        try:
            result = translate_region(gen, pixels, settings, progress=progress)
        except Cancelled:
            results.append((index, "cancelled"))
            continue
        out = (result.pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        condition = {"kind": "translate", "section": section, "source_prompt": source_prompt,
                     "target_prompt": target_prompt, "inject_steps": inject_steps}
        provenance = generation_provenance(gen, "ff2ffpe", condition, steps=steps, guidance=guidance,
                                           network_passes=result.network_passes)
        relay.result.emit(index, (out, provenance, None))
        results.append((index, "done"))
    return results


class RoiGenerateWidget(JobControls, QWidget):
    """Dock widget: ROI shapes, condition (text / RNA / reference image), model, sampling; Run / Cancel."""

    _cancel_message = "cancelling after the current step …"
    _label, _busy_noun = "MUPAD generate", "a generation run"
    _job_noun, _done_word, _failure_title = "rectangle(s)", "generated", "MUPAD generate failed"

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._init_job_state(napari_viewer, Relay())
        self.jobs: list[RoiJob] = []
        self._relay.progress.connect(lambda *a: self._events.post(self._on_step, *a))
        self._relay.result.connect(lambda i, payload: self._events.post(self._on_result, i, *payload))

        self.shapes_combo = QComboBox()
        self.condition_combo = QComboBox()
        self.condition_combo.addItems(CONDITIONS)
        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("e.g. invasive carcinoma with dense lymphocytes")
        self.rna_table_edit = QLineEdit()
        self.rna_table_edit.setPlaceholderText("expression table: .csv / .tsv / .h5ad")
        self.rna_browse = QPushButton("File…")
        self.rna_sample_edit = QLineEdit()
        self.rna_sample_edit.setPlaceholderText("sample or spot id (row)")
        self.reference_combo = QComboBox()
        self.translate_source_combo = QComboBox()
        self.translate_source_combo.setToolTip("the section to translate: its pixels under each rectangle")
        self.source_prompt_edit = QLineEdit("fresh frozen")
        self.target_prompt_edit = QLineEdit("ffpe image")
        self.inject_spin = QDoubleSpinBox()
        self.inject_spin.setRange(0.0, 1.0)
        self.inject_spin.setSingleStep(0.1)
        self.inject_spin.setValue(0.6)
        self.inject_spin.setToolTip("fraction of the steps in which the translation attends with the section's own "
                                    "self-attention maps: higher keeps more of its structure")
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.setToolTip("bundled model id, checkpoint folder or hub id of a token-conditioned MUPAD model")
        self.model_combo.addItems(generation_models())
        self.model_browse = QPushButton("Folder…")
        self.pixel_spin = QDoubleSpinBox()
        self.pixel_spin.setDecimals(4)
        self.pixel_spin.setRange(1e-4, 1e4)
        self.pixel_spin.setValue(1.0)
        self.pixel_spin.setToolTip("output pixel size in world units (µm for slides); default: the slide's")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(20)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setRange(0.0, 20.0)
        self.guidance_spin.setSingleStep(0.5)
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 64)
        self.samples_spin.setToolTip("average this many samples; above 1 a 'spread' layer shows where they disagree")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.run_button = QPushButton("Generate")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("idle")
        self.status_label.setWordWrap(True)

        # One page of inputs per condition kind.
        self.condition_pages = QStackedWidget()
        text_page = QWidget()
        QFormLayout(text_page).addRow("Prompt", self.prompt_edit)
        rna_page = QWidget()
        rna_form = QFormLayout(rna_page)
        table_row = QHBoxLayout()
        table_row.addWidget(self.rna_table_edit, 1)
        table_row.addWidget(self.rna_browse)
        rna_form.addRow("Table", table_row)
        rna_form.addRow("Sample", self.rna_sample_edit)
        image_page = QWidget()
        QFormLayout(image_page).addRow("Reference", self.reference_combo)
        translate_page = QWidget()
        translate_form = QFormLayout(translate_page)
        translate_form.addRow("Section", self.translate_source_combo)
        translate_form.addRow("From prompt", self.source_prompt_edit)
        translate_form.addRow("To prompt", self.target_prompt_edit)
        translate_form.addRow("Injection", self.inject_spin)
        for page in (text_page, rna_page, image_page, translate_page):
            self.condition_pages.addWidget(page)

        form = QFormLayout()
        form.addRow("ROI shapes", self.shapes_combo)
        form.addRow("Condition", self.condition_combo)
        form.addRow(self.condition_pages)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.model_browse)
        form.addRow("Model", model_row)
        form.addRow("Pixel size", self.pixel_spin)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Guidance", self.guidance_spin)
        form.addRow("Samples", self.samples_spin)
        form.addRow("Device", self.device_combo)
        self._lay_out(form)

        self.condition_combo.currentIndexChanged.connect(self.condition_pages.setCurrentIndex)
        self.rna_browse.clicked.connect(self._browse_table)
        self.model_browse.clicked.connect(self._browse_model)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.reordered):
            event.connect(self._refresh_layer_choices)
        self._pixel_from_slide = True
        self.pixel_spin.valueChanged.connect(lambda *_: setattr(self, "_pixel_from_slide", False))
        self.model_combo.currentTextChanged.connect(self._model_changed)
        self._refresh_layer_choices()

    # -- form ------------------------------------------------------------------------
    def _refresh_layer_choices(self, event=None) -> None:
        images = [lay for lay in self.viewer.layers if isinstance(lay, Image) and lay.rgb]
        shapes = [lay for lay in self.viewer.layers if isinstance(lay, Shapes)]
        for combo, layers in ((self.shapes_combo, shapes), (self.reference_combo, images),
                              (self.translate_source_combo, images)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([lay.name for lay in layers])
            if current in [lay.name for lay in layers]:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._default_pixel()

    def _model_changed(self, text: str) -> None:
        self._default_pixel()

    def _default_pixel(self) -> None:
        """Until the user sets it: the model's training pixel size (µm) where a slide layer is
        in µm, else the first slide layer's level-0 pixel, in world units."""
        if not self._pixel_from_slide:
            return
        from .stain import model_pipeline

        slides = [lay for lay in self.viewer.layers if isinstance(lay, Image) and lay.metadata.get("path")]
        if not slides:
            return
        mpp = model_pipeline(self.model_combo.currentText().strip()).get("mpp")
        in_um = slides[0].metadata.get("mpp") is not None
        value = float(mpp) if mpp and in_um else float(slides[0].scale[-1])
        self.pixel_spin.blockSignals(True)
        self.pixel_spin.setValue(value)
        self.pixel_spin.blockSignals(False)

    def _browse_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Expression table", "", "Tables (*.csv *.tsv *.txt *.gz *.h5ad)")
        if path:
            self.rna_table_edit.setText(path)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "MUPAD checkpoint folder")
        if folder:
            self.model_combo.setCurrentText(folder)

    def _layer(self, name: str, kind):
        return next((lay for lay in self.viewer.layers if isinstance(lay, kind) and lay.name == name), None)

    def plan(self) -> list[RoiJob]:
        """One job per rectangle: output size and placement (raises ValueError with a message)."""
        shapes = self._layer(self.shapes_combo.currentText(), Shapes)
        if shapes is None:
            raise ValueError("no Shapes layer chosen: add one and draw rectangles")
        boxes = geo.shape_world_boxes(shapes)
        if not boxes:
            raise ValueError(f"Shapes layer '{shapes.name}' has no rectangles")
        pixel = float(self.pixel_spin.value())
        jobs = []
        for i, (tl, br) in enumerate(boxes):
            (h, w), scale, translate = geo.fit_box(tl, br, pixel)
            check_region_size(h, w, f"rectangle {i + 1} at {pixel:g} per px")
            jobs.append(RoiJob(i, (h, w), scale, translate, ((float(tl[0]), float(tl[1])),
                                                             (float(br[0]), float(br[1])))))
        return jobs

    def _reference_region(self, layer: Image, box, at_least: tuple[int, int] | None = None) -> object:
        """Lazy (h, w, C) pixels of `layer` under a world box, from a level that keeps it small
        (or, with `at_least`, the coarsest level that still has that many pixels there)."""
        levels = list(layer.data) if layer.multiscale else [layer.data]
        full = levels[0].shape[:2]
        tl, br = np.zeros(layer.ndim), np.zeros(layer.ndim)
        tl[-2:], br[-2:] = box
        corners = np.array([layer.world_to_data(tl), layer.world_to_data(br)])[:, -2:]
        lo, hi = corners.min(0) + 0.5, corners.max(0) + 0.5  # pixel-edge coordinates
        for level in levels:
            f = np.array(full, float) / np.array(level.shape[:2], float)
            # geo.EPS: Shapes keep float32 vertices, so an edge on a pixel edge comes back ~1e-5 px off
            y0, x0 = np.maximum(np.floor(lo / f + geo.EPS), 0).astype(int)
            y1, x1 = np.minimum(np.ceil(hi / f - geo.EPS), level.shape[:2]).astype(int)
            coarser = levels[levels.index(level) + 1] if level is not levels[-1] else None
            enough = at_least is not None and (coarser is None or np.any(
                (hi - lo) / (np.array(full, float) / np.array(coarser.shape[:2], float)) < np.array(at_least)))
            small = at_least is None and max(y1 - y0, x1 - x0) <= REFERENCE_MAX_PX
            if small or enough or level is levels[-1]:
                if y1 <= y0 or x1 <= x0:
                    raise ValueError(f"the rectangle does not overlap the reference layer '{layer.name}'")
                return level[y0:y1, x0:x1]
        raise AssertionError("unreachable")

    # -- run -------------------------------------------------------------------------
    def _start(self) -> None:
        from napari.qt.threading import create_worker

        jobs = self.plan()
        model = self.model_combo.currentText().strip()
        if not model:
            raise ValueError("no model: choose a checkpoint folder or hub id of a token-conditioned MUPAD model")
        kind = KINDS[self.condition_combo.currentIndex()]
        value = None
        if kind == "text":
            value = self.prompt_edit.text().strip()
            if not value:
                raise ValueError("empty prompt: type what the tissue should show")
        elif kind == "rna":
            try:
                import mupad_core.rna.pathways  # noqa: F401
            except ImportError as exc:
                raise RuntimeError("RNA profiles are not available yet in this install (mupad_core.rna.pathways)") from exc
            table = self.rna_table_edit.text().strip()
            if not table or not Path(table).expanduser().is_file():
                raise ValueError(f"expression table {table or '(none)'} not found")
            value = (str(Path(table).expanduser()), self.rna_sample_edit.text().strip())
        elif kind == "translate":
            section = self._layer(self.translate_source_combo.currentText(), Image)
            if section is None:
                raise ValueError("no section layer chosen: open the slide to translate")
            prompts = self.source_prompt_edit.text().strip(), self.target_prompt_edit.text().strip()
            if not all(prompts):
                raise ValueError("both prompts are needed: what the section is, and what it should become")
            for job in jobs:
                job.reference = self._reference_region(section, job.box, at_least=job.shape)
            value = (*prompts, float(self.inject_spin.value()), section.name)
        else:
            reference = self._layer(self.reference_combo.currentText(), Image)
            if reference is None:
                raise ValueError("no reference image layer chosen")
            for job in jobs:
                job.reference = self._reference_region(reference, job.box)
            value = reference.name
        self.jobs = jobs
        self._kind, self._value = kind, value
        self._cancel = threading.Event()
        worker = create_worker(
            _generate_worker, model, self.device_combo.currentText(), main_thread_torch_threads(), kind,
            value if kind in ("text", "rna", "translate") else None, [(j.index, j.shape, j.reference) for j in jobs],
            self.steps_spin.value(), self.seed_spin.value(), float(self.guidance_spin.value()),
            self._cancel, self._relay, self.samples_spin.value(), _start_thread=False, _ignore_errors=True,
        )
        self._launch(worker, total=self.steps_spin.value() * len(jobs), status=f"loading model {model} …")
        self.progress_bar.setRange(0, 0)  # busy until the first step reports

    # -- worker events (GUI thread) ----------------------------------------------------
    def _on_step(self, index: int, done: int, total: int) -> None:
        overall_total = total * len(self.jobs)
        overall = index * total + done
        self.progress_bar.setRange(0, overall_total)
        self.progress_bar.setValue(overall)
        self.status_label.setText(f"rectangle {index + 1}/{len(self.jobs)}: step {done}/{total}")
        if self._progress is not None:
            if self._progress.total != overall_total:  # samples or inversion steps change the count
                self._progress.total = overall_total
            self._progress.update(overall - self._progress.n)

    def _describe(self) -> str:
        """What the run was asked, for layer names."""
        value = self._value
        if self._kind == "text":
            return f"'{value[:40]}'"
        if self._kind == "rna":
            return f"RNA {value[1] or Path(value[0]).name}"
        if self._kind == "translate":
            return f"{value[3]} as '{value[1][:30]}'"
        return f"like {value}"

    def _noun(self) -> str:
        return "translated" if self._kind == "translate" else "generated"

    def _on_result(self, index: int, pixels: np.ndarray, provenance: dict, spread: np.ndarray | None = None) -> None:
        job = self.jobs[index]
        what = self._describe()
        shapes = self._layer(self.shapes_combo.currentText(), Shapes)
        units = geo.layer_units(shapes) if shapes is not None else {}
        meta = {"mupad": {**provenance, "roi_world": [list(job.box[0]), list(job.box[1])],
                          "pixel_size": list(job.scale)},
                "generated": True, "not_for_diagnosis": True, "mpp": (job.scale[1], job.scale[0])}
        job.layer = self.viewer.add_image(pixels, rgb=pixels.shape[-1] in (3, 4), contrast_limits=(0, 255),
                                          scale=job.scale, translate=job.translate, metadata=meta,
                                          name=f"{self._noun()} {what} #{index + 1}", **units)
        if spread is not None:  # where the samples disagree: the model's uncertainty, its own overlay
            job.spread_layer = self.viewer.add_image(
                spread, colormap="magenta", blending="additive", contrast_limits=(0, max(int(spread.max()), 1)),
                scale=job.scale, translate=job.translate, name=f"{self._noun()} {what} #{index + 1} spread", **units,
                metadata={**meta, "mupad": {**meta["mupad"], "statistic":
                                             f"per-pixel standard deviation over {provenance['samples']} samples, x2"}})
        if shapes is not None and shapes in self.viewer.layers:  # keep the rectangles visible and editable
            for layer in (job.layer, job.spread_layer):
                if layer is not None:
                    self.viewer.layers.move(self.viewer.layers.index(layer), self.viewer.layers.index(shapes))
        job.status = "done"

    def _on_returned(self, results: list) -> None:
        cancelled = [index for index, status in results if status == "cancelled"]
        for index in cancelled:
            self.jobs[index].status = "cancelled"
        if cancelled:
            show_info(f"MUPAD generate cancelled: {len(cancelled)} rectangle(s) not generated")

