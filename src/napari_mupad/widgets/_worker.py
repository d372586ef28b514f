"""What the plugin's worker threads share: torch thread settings, cancellation, device choice.

Everything here imports torch lazily: opening a widget must not cost a torch import.

Torch in worker threads
-----------------------
napari runs long jobs with `napari.qt.threading.thread_worker`, i.e. in a thread of Qt's
global `QThreadPool`, and those threads are reused from job to job. With torch's OpenMP
backend the intra-op thread count is per thread (checked with torch 2.13):

- a thread that starts torch work takes torch's current count then;
- `torch.set_num_threads` changes the calling thread only: a later call in the main thread
  (a user limiting torch in napari's console, another plugin) does not reach a pool thread
  that already ran torch, and a count set inside a pool thread by an earlier job stays there.

So a reused pool thread can run at a stale count, e.g. 1 thread where the main thread uses
all cores (the job ~2x slower on 2 cores; more on big machines), or all cores where the user
asked for fewer. `match_torch_threads()`, called first in every plugin worker, sets the
count the main thread uses now (read by `main_thread_torch_threads()` in the GUI thread when
the run starts). `benchmarks/worker_thread_torch.py` measures a fixed forward pass in the
main thread against a worker with and without it (`--stale-threads 1`: the stale case).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path


def main_thread_torch_threads() -> int | None:
    """Call in the GUI thread when a run starts: the torch thread count to use inside the worker.

    None where torch is not imported yet (never imports it): nothing can be stale then, and
    torch's own default applies in the worker."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return int(torch.get_num_threads())


def match_torch_threads(threads: int | None) -> int:
    """Call first inside a worker: run this pool thread at the main thread's torch thread count."""
    import torch

    if threads:
        # Set even when equal: this (re)sizes this thread's own OpenMP team.
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def resolve_device(name: str) -> str:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without one is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda': this torch build sees no CUDA device")
    return name


def default_output_dir(create: bool = False) -> Path:
    """Where results go unless the user picks a folder: $MUPAD_HOME/napari-results
    (default ~/.cache/mupad/napari-results), else a temp folder when that cannot be created."""
    home = os.environ.get("MUPAD_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mupad"
    folder = base / "napari-results"
    if not create:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        folder = Path(tempfile.gettempdir()) / "mupad-napari-results"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def unique_path(folder: Path, stem: str, suffix: str = ".ome.zarr", taken: set | None = None) -> Path:
    """folder/stem.ome.zarr, or stem-2, stem-3, ... so that no result (or partial) is overwritten."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in stem).strip("-.") or "result"
    n = 1
    while True:
        name = f"{safe}{suffix}" if n == 1 else f"{safe}-{n}{suffix}"
        path = folder / name
        free = not path.exists() and not path.with_name(path.name + ".partial").exists()
        if free and path not in (taken or ()):
            return path
        n += 1


def short_error(exc: BaseException) -> str:
    """One line for a notification: the exception's first line, or its type."""
    if isinstance(exc, MemoryError):
        return "out of memory: try a smaller region, a smaller batch or block size, or the CPU"
    text = str(exc).strip()
    if "out of memory" in text.lower():
        return "out of memory: " + text.splitlines()[0]
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class SerialEvents:
    """Run GUI-thread handlers for worker events one at a time, in order.

    Adding a layer or updating napari's progress can spin the Qt event loop, which would
    deliver the next worker event *inside* the current handler (e.g. "finished" in the
    middle of "block"). Posted here, each handler runs after the previous one returned; an
    exception in one becomes `on_error(exc)` and never reaches Qt.
    """

    def __init__(self, on_error):
        self._queue: list = []
        self._draining = False
        self._on_error = on_error

    def post(self, handler, *args) -> None:
        self._queue.append((handler, args))
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                handler, args = self._queue.pop(0)
                try:
                    handler(*args)
                except Exception as exc:  # a display problem must never take napari down
                    self._on_error(exc)
        finally:
            self._draining = False


class JobControls:
    """Run/Cancel/progress state shared by the widgets that run jobs in a worker.

    A widget implements `_start()` (check the form, build the worker, `_launch` it) and sets
    `_label` ("MUPAD stain"), `_busy_noun` ("a stain run"), `_cancel_message` ("… after the
    current block"), `_job_noun`, `_done_word` and `_failure_title`; it may override
    `_discard(job)` to remove what a job that did not finish left on screen, and
    `_idle_progress(text)` for the bar's value when idle.
    """

    _label = "MUPAD"
    _busy_noun = "a run"
    _cancel_message = "cancelling …"
    _job_noun = "job(s)"
    _done_word = "done"
    _failure_title = "MUPAD job failed"

    def _init_job_state(self, viewer, relay) -> None:
        """The state every job widget keeps; call first in __init__, then connect `relay`'s
        signals through `self._events`."""
        from napari.utils.notifications import show_error

        self.viewer = viewer
        self.worker = None
        self.jobs: list = []
        self._cancel = threading.Event()
        self._progress = None
        self._relay = relay
        self._events = SerialEvents(lambda exc: show_error(f"{self._label}: {short_error(exc)}"))

    @property
    def running(self) -> bool:
        return self.worker is not None

    def run(self) -> None:
        """Start the job (GUI thread); returns at once. Any mistake is a notification, never a crash."""
        from napari.utils.notifications import show_error, show_warning

        if self.running:
            show_warning(f"{self._busy_noun} is in progress; cancel it or wait")
            return
        try:
            self._start()
        except Exception as exc:  # the user sees what to fix
            show_error(f"{self._label}: {short_error(exc)}")
            self._set_idle(f"error: {short_error(exc)}")

    def _start(self) -> None:
        raise NotImplementedError

    def _launch(self, worker, *, total: int, status: str) -> None:
        """Wire a created (not started) worker's events through `self._events`, show the run as
        busy (`total` 0: until the first report), start it."""
        from napari.utils import progress

        self.worker = worker
        worker.returned.connect(lambda r: self._events.post(self._on_returned, r))
        worker.errored.connect(lambda e: self._events.post(self._on_errored, e))
        worker.finished.connect(lambda: self._events.post(self._on_finished))
        self._progress = progress(total=total, desc=self._label)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(0)
        self.status_label.setText(status)
        worker.start()

    def _lay_out(self, form) -> None:
        """The panel: the widget's form, then Run | Cancel, the progress bar, the status line
        and the not-for-diagnosis notice (the widget creates those controls)."""
        from qtpy.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout

        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        self.status_label.setWordWrap(True)  # errors name a file and a setting: show all of it
        layout.addWidget(self.status_label)
        notice = QLabel("Generated images: hypothesis-generating, not for diagnosis.")
        notice.setWordWrap(True)
        layout.addWidget(notice)
        layout.addStretch(1)

    def cancel(self) -> None:
        if not self.running:
            return
        self._cancel.set()
        self.cancel_button.setEnabled(False)
        self.status_label.setText(self._cancel_message)

    def _discard(self, job) -> None:
        """Remove what an unfinished job left on screen (nothing by default)."""

    def _on_errored(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        for job in self.jobs:
            if job.status != "done":
                job.status = "failed"
                self._discard(job)
        show_error(f"{self._failure_title}: {short_error(exc)}")
        self.status_label.setText(f"error: {short_error(exc)}")

    def _on_finished(self) -> None:
        done = sum(job.status == "done" for job in self.jobs)
        text = self.status_label.text() if self.status_label.text().startswith("error") else \
            f"idle — {done}/{len(self.jobs)} {self._job_noun} {self._done_word}" + \
            (" (cancelled)" if self._cancel.is_set() else "")
        self._set_idle(text)

    def _idle_progress(self, text: str) -> int:
        return 0

    def _set_idle(self, text: str) -> None:
        self.worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(self._idle_progress(text))
        self.status_label.setText(text)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt)
        self.cancel()
        super().closeEvent(event)
