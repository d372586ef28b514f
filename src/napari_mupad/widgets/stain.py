"""The virtual-stain widget: run a task over a slide layer's view, drawn ROIs or the whole slide.

The widget only wires napari to the core: it turns the chosen region into level-0 ROIs of
the source slide, runs `mupad_core.generate.engine.run_stain` for each in a napari
`thread_worker` (never on the GUI thread), and shows each result as an overlay layer aligned
with the source that fills in as blocks finish (read from the store's ``.partial`` folder, only
finished chunks) and is swapped for the finished multiscale store at the end. Cancel stops the
run after the block in progress: the partial store stays on disk (resumable with
``mupad stain --resume``) and its layer is removed, so nothing incomplete looks finished.
Every error ends as a napari notification.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import napari
import numpy as np
import napari.viewer
from napari.layers import Image, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
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

from mupad_core.generate.config import StainConfig, model_pipeline
from mupad_core.tasks import SLIDE_TASKS, supports_strength

from . import _geometry as geo
from ._compare import SideBySide
from ._relay import Relay
from ._worker import (
    JobControls,
    default_output_dir,
    main_thread_torch_threads,
    match_torch_threads,
    resolve_device,
    short_error,
    unique_path,
)

TASKS = SLIDE_TASKS
MODELS = ("identity",)  # then the bundled/cached restaining models; any folder or hub id may be typed
REGIONS = ("Current view", "Drawn rectangles", "Whole slide")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class StainJob:
    """One ROI to stain: what the worker runs and where the GUI puts it."""

    index: int
    roi: tuple[int, int, int, int]  # level-0 x, y, w, h
    out: Path
    label: str
    layers: list = field(default_factory=list)  # preview, then final layers
    store: object | None = None  # PartialStore while running
    status: str = "pending"  # pending, running, done, cancelled, failed
    resume: bool = False  # continue an existing NAME.partial
    out_mpp: float = 0.0  # output pixel size (µm)


def restaining_models() -> list[str]:
    """Ids of the bundled and cached models that restain a source (spatial template)."""
    try:
        from mupad_core.zoo import list_models

        return [e.id for e in list_models() if e.template]
    except Exception:  # a broken cache must not keep the widget from opening
        return []


def _stain_worker(slide_path: str, mpp: float | None, model: str, task: str, device: str, threads: int | None,
                  jobs: list[tuple[int, tuple, str, bool, list | None]], engine: dict, cancel: threading.Event,
                  relay: Relay) -> list:
    """Runs in a worker thread: the model (kept loaded between runs), stain each ROI. Returns [(index, status, path)]."""
    match_torch_threads(threads)
    from mupad_core.generate.engine import Cancelled, StainConfig, run_stain
    from mupad_core.generate.handles import kept_handle
    from mupad_core.slide.readers import open_slide

    results = []
    handle = kept_handle(model, task, device=resolve_device(device))
    from mupad_core.slide.regions import Polygon, Regions

    with open_slide(slide_path, mpp=mpp) as reader:
        for index, roi, out, resume, outline in jobs:
            if cancel.is_set():
                results.append((index, "cancelled", out))
                continue

            def progress(done, total, index=index):
                relay.progress.emit(index, done, total)
                if cancel.is_set() and done < total:  # after the last block: let it finish
                    raise Cancelled()

            config = StainConfig(task=task, roi=tuple(roi), resume=resume, **engine)
            try:
                regions = None if outline is None else Regions([Polygon(np.asarray(outline))], source="napari shape")
                final = run_stain(reader, handle, out, config, progress=progress, regions=regions)
            except Cancelled:
                results.append((index, "cancelled", out))
                continue
            relay.result.emit(index, str(final))
            results.append((index, "done", str(final)))
    return results


class StainWidget(JobControls, QWidget):
    """Dock widget: source layer, task, model, region, steps, seed, device, output folder; Run / Cancel."""

    _cancel_message = "cancelling after the current block …"  # the partial store stays on disk, its layer goes
    _label, _busy_noun = "MUPAD stain", "a stain run"
    _job_noun, _done_word, _failure_title = "ROI(s)", "done", "MUPAD stain failed"

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self._init_job_state(napari_viewer, Relay())
        self.jobs: list[StainJob] = []
        self.side_by_side = SideBySide(napari_viewer)
        self._job_polygons: list = []  # per ROI: a polygon outline (level-0 x, y) to mask by, or None
        self._source_name: str | None = None
        self._relay.progress.connect(lambda *a: self._events.post(self._on_block, *a))
        self._relay.result.connect(lambda *a: self._events.post(self._on_job_done, *a))
        # Engine settings the form does not show (tests and power users may change them).
        self.engine_options: dict = {"batch_size": 8}
        self._engine: dict = {}  # the settings of the run in progress

        self.source_combo = QComboBox()
        self.task_combo = QComboBox()
        self.task_combo.setEditable(True)
        self.task_combo.addItems(TASKS)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(MODELS)
        self.model_combo.addItems(restaining_models())
        self.model_combo.setToolTip("'identity' (returns the input; for checks), a checkpoint folder, or a hub id")
        self.model_browse = QPushButton("Folder…")
        self.region_combo = QComboBox()
        self.region_combo.addItems(REGIONS)
        self.shapes_combo = QComboBox()
        self.shapes_combo.setToolTip("Shapes layer whose rectangles and polygons are the ROIs (each is its own run; "
                                     "pixels outside a polygon stay background)")
        self.import_regions = QPushButton("Import…")
        self.import_regions.setToolTip("regions from a GeoJSON file (QuPath: Export objects as GeoJSON) as a Shapes layer")
        self.export_regions = QPushButton("Export…")
        self.export_regions.setToolTip("the chosen Shapes layer as GeoJSON in level-0 pixels (QuPath imports it)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(20)
        self.src_mpp_spin = QDoubleSpinBox()
        self.src_mpp_spin.setDecimals(4)
        self.src_mpp_spin.setRange(0.0, 100.0)
        self.src_mpp_spin.setSingleStep(0.05)
        self.src_mpp_spin.setSpecialValueText("from file")  # 0: the pixel size the slide states
        self.src_mpp_spin.setToolTip("size of one full-resolution pixel of the source in µm, for a file that "
                                     "states none (e.g. 0.25 at 40x, 0.5 at 20x); kept with the layer and "
                                     "recorded in the output")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(3)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.25)
        self.mpp_spin.setSpecialValueText("source")  # 0: the source's own pixel size
        self.mpp_spin.setToolTip("output pixel size in µm; 'source' keeps the slide's; a model's own is set when chosen")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 64)
        self.samples_spin.setToolTip("average this many samples (each its own noise seed); above 1 a 'spread' layer "
                                     "shows where they disagree: where the model is unsure")
        self.strength_spin = QDoubleSpinBox()
        self.strength_spin.setDecimals(2)
        self.strength_spin.setRange(0.05, 1.0)
        self.strength_spin.setSingleStep(0.05)
        self.strength_spin.setValue(1.0)
        self.strength_spin.setToolTip("he2he / ff2ffpe: 1 starts from noise; smaller starts nearer the source "
                                      "and keeps more of its architecture")
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setDecimals(2)
        self.guidance_spin.setRange(0.0, 10.0)
        self.guidance_spin.setSingleStep(0.25)
        self.guidance_spin.setToolTip("classifier-free guidance weight: how strongly each window follows its own "
                                      "source tokens (models with an image stream; 0 = off)")
        self.schedule_combo = QComboBox()
        self.schedule_combo.addItems(["annealed", "constant"])
        self.schedule_combo.setToolTip("annealed: the weight falls to 0 over the trajectory (the paper's), and the "
                                       "unconditional pass is skipped where it is 0")
        self.guidance_spin.setEnabled(False)
        self.schedule_combo.setEnabled(False)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.output_edit = QLineEdit(str(default_output_dir()))
        self.output_browse = QPushButton("Folder…")
        self.resume_check = QCheckBox("Resume an unfinished result of the same ROI")
        self.resume_check.setToolTip("continue NAME.ome.zarr.partial left by a cancelled run (same settings)")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.compare_button = QPushButton("Side by side")
        self.compare_button.setCheckable(True)
        self.compare_button.setToolTip("the source and the stain (the selected layers, else the last result) in "
                                       "boxes that pan and zoom together; press again to go back")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("idle")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Source", self.source_combo)
        form.addRow("Task", self.task_combo)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.model_browse)
        form.addRow("Model", model_row)
        form.addRow("Region", self.region_combo)
        shapes_row = QHBoxLayout()
        shapes_row.addWidget(self.shapes_combo, 1)
        shapes_row.addWidget(self.import_regions)
        shapes_row.addWidget(self.export_regions)
        form.addRow("ROI shapes", shapes_row)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Samples", self.samples_spin)
        form.addRow("Strength", self.strength_spin)
        guidance_row = QHBoxLayout()
        guidance_row.addWidget(self.guidance_spin, 1)
        guidance_row.addWidget(self.schedule_combo)
        form.addRow("Guidance", guidance_row)
        form.addRow("Source µm/px", self.src_mpp_spin)
        form.addRow("Output µm/px", self.mpp_spin)
        form.addRow("Device", self.device_combo)
        out_row = QHBoxLayout()
        out_row.addWidget(self.output_edit, 1)
        out_row.addWidget(self.output_browse)
        form.addRow("Output", out_row)
        form.addRow(self.resume_check)
        form.addRow(self.compare_button)
        self._lay_out(form)

        self.model_browse.clicked.connect(self._browse_model)
        self.import_regions.clicked.connect(self._import_regions_dialog)
        self.export_regions.clicked.connect(self._export_regions_dialog)
        self.output_browse.clicked.connect(self._browse_output)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.compare_button.toggled.connect(self._toggle_side_by_side)
        self.region_combo.currentTextChanged.connect(self._update_enabled)
        self.task_combo.currentTextChanged.connect(self._update_enabled)
        self._model_pipeline: dict = {}
        self.model_combo.currentTextChanged.connect(self._model_changed)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.reordered):
            event.connect(self._refresh_layer_choices)
        self._refresh_layer_choices()
        self._update_enabled()

    # -- comparison ------------------------------------------------------------------

    def comparison_layers(self) -> list:
        """The stain to compare: the selected image layers other than the source, else the
        layers of the last finished result."""
        source = self.source_layer()
        selected = [lay for lay in self.viewer.layers.selection if isinstance(lay, Image) and lay is not source]
        if selected:
            return selected
        done = [job for job in self.jobs if job.status == "done"]
        return list(done[-1].layers) if done else []

    def _toggle_side_by_side(self, on: bool) -> None:
        if not on:
            self.side_by_side.end()
            return
        source = self.source_layer()
        try:
            if source is None:
                raise ValueError("no source slide layer")
            self.side_by_side.show(source, self.comparison_layers())
        except ValueError as exc:
            self.compare_button.setChecked(False)
            self.status_label.setText(f"Side by side: {exc}")

    # -- form ------------------------------------------------------------------------
    def _slide_layers(self) -> list[Image]:
        return [lay for lay in self.viewer.layers
                if isinstance(lay, Image) and lay.metadata.get("path") and not lay.metadata.get("mupad_preview")]

    def _refresh_layer_choices(self, event=None) -> None:
        for combo, layers in ((self.source_combo, self._slide_layers()),
                              (self.shapes_combo, [lay for lay in self.viewer.layers if isinstance(lay, Shapes)])):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([lay.name for lay in layers])
            if current in [lay.name for lay in layers]:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _update_enabled(self, *_) -> None:
        self.shapes_combo.setEnabled(self.region_combo.currentText() == "Drawn rectangles")
        self.strength_spin.setEnabled(supports_strength(self.task_combo.currentText()))

    def _model_changed(self, text: str) -> None:
        """A bundled or local model: take its task, output pixel size, window and steps from its pipeline file.

        Reads JSON only; a hub id is not resolved here (no download on the GUI thread)."""
        self._model_pipeline = model_pipeline(text.strip())
        tasks = self._model_pipeline.get("tasks") or []
        if tasks:
            self.task_combo.setCurrentText(str(tasks[0]))
        mpp = self._model_pipeline.get("mpp")
        self.mpp_spin.setValue(float(mpp) if mpp else 0.0)
        self.steps_spin.setValue(int(self._model_pipeline.get("steps") or StainConfig.steps))  # a student says how few
        guided = ("image" in (self._model_pipeline.get("conditions") or [])
                  or self._model_pipeline.get("kind") == "embedding-flow")  # its generator has the stream
        self.guidance_spin.setEnabled(guided)
        self.schedule_combo.setEnabled(guided)
        if not guided:
            self.guidance_spin.setValue(0.0)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "MUPAD checkpoint folder")
        if folder:
            self.model_combo.setCurrentText(folder)

    def _browse_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder", self.output_edit.text())
        if folder:
            self.output_edit.setText(folder)

    def source_layer(self) -> Image | None:
        name = self.source_combo.currentText()
        return next((lay for lay in self._slide_layers() if lay.name == name), None)

    def rois(self) -> list[tuple[int, int, int, int]]:
        """Level-0 ROIs of the source for the chosen region (raises ValueError with a message)."""
        source = self.source_layer()
        if source is None:
            raise ValueError("no source slide layer: open a slide (a layer with a file path) first")
        region = self.region_combo.currentText()
        self._job_polygons = []
        if region == "Whole slide":
            height, width = geo.level0_shape(source)
            return [(0, 0, width, height)]
        if region == "Current view":
            roi = geo.world_box_to_roi(source, *geo.visible_world_box(self.viewer))
            if roi is None:
                raise ValueError("the current view does not show any of the source slide")
            return [roi]
        shapes = next((lay for lay in self.viewer.layers
                       if isinstance(lay, Shapes) and lay.name == self.shapes_combo.currentText()), None)
        if shapes is None:
            raise ValueError("no Shapes layer chosen: draw rectangles in a Shapes layer first")
        outlines = geo.shape_outlines_level0(shapes, source)
        boxes = geo.shape_world_boxes(shapes, rectangles_only=False, kinds=("rectangle", "polygon"))
        if not outlines:
            raise ValueError(f"Shapes layer '{shapes.name}' has no rectangles or polygons")
        kept, self._job_polygons = [], []
        for (kind, outline), (tl, br) in zip(outlines, boxes):
            roi = geo.world_box_to_roi(source, tl, br)  # pixels whose centres lie in the shape's box
            if roi is None:
                continue
            kept.append(roi)
            # A rectangle is its box; any other outline also masks the pixels outside it.
            self._job_polygons.append(None if kind == "rectangle" else outline.round(3).tolist())
        if len(kept) < len(outlines):
            show_warning(f"{len(outlines) - len(kept)} shape(s) lie outside the source slide and are skipped")
        if not kept:
            raise ValueError("no shape overlaps the source slide")
        return kept

    # -- run -------------------------------------------------------------------------
    def _start(self) -> None:
        from napari.qt.threading import create_worker

        source = self.source_layer()
        rois = self.rois()
        model = self.model_combo.currentText().strip()
        if not model:
            raise ValueError("no model: choose 'identity', a checkpoint folder or a hub id")
        task = self.task_combo.currentText().strip() or "he2he"
        typed = self.output_edit.text().strip()
        out_dir = Path(typed).expanduser() if typed else default_output_dir(create=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{Path(source.metadata['path']).name.split('.')[0]}-{task.replace(':', '-')}"
        self.jobs = []
        from mupad_core.store.omezarr import unfinished_result  # zarr only once a run starts

        taken: set[Path] = set()
        for i, roi in enumerate(rois):
            name = f"{stem}-x{roi[0]}-y{roi[1]}-{roi[2]}x{roi[3]}"
            unfinished = unfinished_result(out_dir, name) if self.resume_check.isChecked() else None
            out = unfinished or unique_path(out_dir, name, taken=taken)
            taken.add(out)
            job = StainJob(i, roi, out, f"{source.name} {task} [{roi[0]},{roi[1]} {roi[2]}x{roi[3]}]")
            job.resume = unfinished is not None
            self.jobs.append(job)
        self._source_name = source.name
        self._state_source_mpp(source)
        self._src_mpp_xy = geo.layer_mpp_xy(source)
        self._src_mpp = min(self._src_mpp_xy)
        target = float(self.mpp_spin.value()) or None
        for job in self.jobs:
            job.out_mpp = target or self._src_mpp
        self._cancel = threading.Event()
        # The defaults every entry point shares (the model's own window, a quarter overlap),
        # then what the widget sets; only the settings that differ from a plain StainConfig travel.
        settings = self.settings(model, task)
        engine = {k: v for k, v in asdict(settings).items() if k not in ("task", "roi", "resume")}
        engine.update(self.engine_options)
        self._engine = engine
        # The pixel size the layer records (the file's, or the one given when it was opened);
        # none recorded: open_slide refuses the slide rather than guessing one.
        slide_mpp = self._src_mpp if source.metadata.get("mpp") is not None else None
        worker = create_worker(
            _stain_worker, str(source.metadata["path"]), slide_mpp, model, task,
            self.device_combo.currentText(), main_thread_torch_threads(),
            [(j.index, j.roi, str(j.out), j.resume, self._job_polygons[j.index] if self._job_polygons else None)
             for j in self.jobs], engine, self._cancel, self._relay,
            _start_thread=False, _ignore_errors=True,
        )
        self._launch(worker, total=0, status=f"loading model {model} …")  # busy until the first block reports

    def _import_regions_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import regions", "", "GeoJSON (*.geojson *.json)")
        if path:
            try:
                self.import_geojson(path)
            except (OSError, ValueError) as exc:
                show_error(str(exc))

    def _export_regions_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export regions", "regions.geojson", "GeoJSON (*.geojson)")
        if path:
            try:
                show_info(f"wrote {self.export_geojson(path)}")
            except (OSError, ValueError) as exc:
                show_error(str(exc))

    def import_geojson(self, path: str | Path) -> Shapes:
        """Regions of a GeoJSON file (QuPath's export, level-0 px) as a Shapes layer on the source."""
        from mupad_core.slide.regions import read_regions

        source = self.source_layer()
        if source is None:
            raise ValueError("open the slide the regions belong to first")
        height, width = geo.level0_shape(source)
        regions = read_regions(path, slide_size=(width, height))
        outlines = [geo.level0_to_world(source, p.exterior) for p in regions.polygons]
        if any(p.holes for p in regions.polygons):
            show_warning(f"{Path(path).name}: napari shapes have no holes; the holes are dropped from the layer")
        layer = self.viewer.add_shapes(outlines, shape_type="polygon", name=Path(path).stem, edge_color="yellow",
                                       face_color="transparent", **geo.layer_units(source))
        self.shapes_combo.setCurrentText(layer.name)
        return layer

    def export_geojson(self, path: str | Path) -> Path:
        """The chosen Shapes layer as GeoJSON polygons in the source's level-0 px (QuPath imports it)."""
        import json

        from mupad_core.slide.regions import Polygon, Regions

        source = self.source_layer()
        shapes = next((lay for lay in self.viewer.layers
                       if isinstance(lay, Shapes) and lay.name == self.shapes_combo.currentText()), None)
        if source is None or shapes is None:
            raise ValueError("choose the source slide and a Shapes layer to export")
        outlines = geo.shape_outlines_level0(shapes, source)
        if not outlines:
            raise ValueError(f"Shapes layer '{shapes.name}' has no rectangles or polygons")
        path = Path(path)
        path.write_text(json.dumps(Regions([Polygon(o) for _, o in outlines]).as_geojson(), indent=1))
        return path

    def settings(self, model: str, task: str) -> StainConfig:
        """The run's engine settings from the form: `StainConfig.for_model`, as the CLI and demo."""
        return StainConfig.for_model(
            model, task=task, steps=self.steps_spin.value(), seed=self.seed_spin.value(),
            target_mpp=float(self.mpp_spin.value()) or None, samples=self.samples_spin.value(),
            strength=self.strength_spin.value() if supports_strength(task) else 1.0,
            guidance=self.guidance_spin.value() if self.guidance_spin.isEnabled() else 0.0,
            guidance_schedule=self.schedule_combo.currentText())

    def _state_source_mpp(self, source) -> None:
        """A slide whose file states no pixel size runs at the size given in 'Source µm/px',
        kept in the layer's metadata (so later runs and exports agree) and, through the reader,
        in every output's provenance. Without one the run is refused here, before any work."""
        stated = float(self.src_mpp_spin.value()) or None
        recorded = source.metadata.get("mpp")
        if recorded is not None and stated is None:
            return
        if recorded is None and stated is None:
            raise ValueError(f"{Path(str(source.metadata.get('path', source.name))).name} states no pixel size: "
                             "set 'Source µm/px' to the size of one full-resolution pixel (e.g. 0.25 at 40x)")
        if recorded is not None and not source.metadata.get("mpp_stated"):
            raise ValueError(f"{source.name} states its own pixel size ({geo.layer_mpp(source):g} µm): "
                             "leave 'Source µm/px' at 'from file'")
        source.metadata["mpp"] = (stated, stated)
        source.metadata["mpp_stated"] = "stated in the Virtual stain widget"


    # -- worker events (GUI thread) ----------------------------------------------------
    def _on_block(self, index: int, done: int, total: int) -> None:
        job = self.jobs[index]
        job.status = "running"
        try:
            if job.store is None and not job.layers:
                self._add_preview(job)
            elif job.store is not None:
                job.store.update()
                for layer in job.layers:
                    layer.refresh()
        except Exception as exc:  # a preview problem must not stop the run
            show_warning(f"MUPAD: cannot show the partial result: {short_error(exc)}")
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)
        self.status_label.setText(f"ROI {index + 1}/{len(self.jobs)}: block {done}/{total}")
        if self._progress is not None:
            if self._progress.total != total:
                self._progress.total = total
                self._progress.n = 0
            self._progress.set_description(f"MUPAD ROI {index + 1}/{len(self.jobs)}")
            self._progress.update(done - self._progress.n)

    def _placement(self, job: StainJob, out_mpp: float) -> dict:
        source = self.viewer.layers[self._source_name] if self._source_name in self.viewer.layers else None
        if source is None:
            scale = (out_mpp, out_mpp)
            translate = (job.roi[1] * self._src_mpp, job.roi[0] * self._src_mpp)
        else:
            scale, translate = geo.overlay_placement(source, job.roi, self._src_mpp_xy, out_mpp)
            return {"scale": scale, "translate": translate, **geo.layer_units(source)}
        return {"scale": scale, "translate": translate}

    def _add_preview(self, job: StainJob) -> None:
        from ._preview import PartialStore, preview_levels

        partial = job.out.with_name(job.out.name + ".partial")
        if not partial.exists():
            return
        store = PartialStore(partial)
        job.store = store
        place = self._placement(job, job.out_mpp)
        meta = {"path": str(partial), "mpp": (job.out_mpp, job.out_mpp), "mupad_preview": True,
                "roi_level0": list(job.roi)}
        name = f"{job.label} (running)"
        multiscale = len(store.factors) > 1
        if store.kind == "rgb":
            data = preview_levels(store)
            job.layers = [self.viewer.add_image(data if multiscale else data[0], rgb=True, multiscale=multiscale,
                                                contrast_limits=(0, 255), name=name, metadata=meta, **place)]
        else:
            from mupad_core.store.omezarr import FLUORESCENCE_COLORS
            from napari_mupad._layers import napari_colormap

            names = list(self._model_pipeline.get("channels") or [])
            colors = list(self._model_pipeline.get("colors") or [])
            job.layers = []
            for c in range(store.channels):
                data = preview_levels(store, c)
                color = colors[c] if c < len(colors) else FLUORESCENCE_COLORS[c % len(FLUORESCENCE_COLORS)]
                label = names[c] if c < len(names) else f"c{c}"
                job.layers.append(self.viewer.add_image(
                    data if multiscale else data[0], multiscale=multiscale, contrast_limits=(0, 255),
                    colormap=napari_colormap(color.lstrip("#").upper()), blending="additive",
                    name=f"{job.label} {label} (running)", metadata=dict(meta), **place))
        self._below_rois(job.layers)

    def _below_rois(self, layers) -> None:
        """Put new layers under the ROI Shapes layer (when one was used) so its rectangles stay visible."""
        if self.region_combo.currentText() != "Drawn rectangles":
            return
        shapes = next((lay for lay in self.viewer.layers
                       if isinstance(lay, Shapes) and lay.name == self.shapes_combo.currentText()), None)
        for layer in layers:
            if shapes is not None and layer in self.viewer.layers:
                here, there = self.viewer.layers.index(layer), self.viewer.layers.index(shapes)
                if here > there:
                    self.viewer.layers.move(here, there)

    def _remove_layers(self, job: StainJob) -> None:
        for layer in job.layers:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        job.layers = []
        job.store = None

    def _on_job_done(self, index: int, path: str) -> None:
        """Swap the preview for the finished store, opened by the plugin's own reader."""
        from mupad_core.store import spread_path
        from napari_mupad._reader import read_slide

        job = self.jobs[index]
        visible = [lay.visible for lay in job.layers]
        opacity = [lay.opacity for lay in job.layers]
        self._remove_layers(job)
        try:
            tuples = read_slide(path)
        except Exception as exc:
            show_error(f"MUPAD: finished {path} but cannot open it: {short_error(exc)}")
            return
        spread = spread_path(path)
        if self._engine.get("samples", 1) > 1 and spread.is_dir():
            try:
                tuples += read_slide(str(spread))  # the per-pixel spread of the samples: its own overlay
            except Exception as exc:
                show_warning(f"MUPAD: cannot open the spread {spread}: {short_error(exc)}")
        place = self._placement(job, job.out_mpp)
        layers = []
        for data, meta, _kind in tuples:
            meta = dict(meta)
            provenance = meta["metadata"].get("provenance") or {}
            meta["metadata"] = {**meta["metadata"], "mupad": provenance, "roi_level0": list(job.roi),
                                "source_path": provenance.get("source", {}).get("path")}
            meta["name"] = job.label if meta.get("rgb") else f"{job.label} {meta['name']}"
            meta.update(place)
            layers.append(self.viewer.add_image(data, **meta))
        for k, layer in enumerate(layers):
            if k < len(visible):
                layer.visible, layer.opacity = visible[k], opacity[k]
        job.layers = layers
        self._below_rois(job.layers)
        job.status = "done"

    def _on_returned(self, results: list) -> None:
        cancelled = [index for index, status, _ in results if status == "cancelled"]
        for index in cancelled:
            job = self.jobs[index]
            job.status = "cancelled"
            self._remove_layers(job)
        if cancelled:
            kept = [str(self.jobs[i].out) + ".partial" for i in cancelled
                    if self.jobs[i].out.with_name(self.jobs[i].out.name + ".partial").exists()]
            show_info("MUPAD stain cancelled" + (f"; unfinished store kept (resumable): {kept[0]}" if kept else ""))

    def _discard(self, job: StainJob) -> None:
        self._remove_layers(job)

    def _idle_progress(self, text: str) -> int:
        return 1 if text.startswith("idle") and not self._cancel.is_set() else 0
