"""The signals a widget's worker thread emits, one class for every widget."""

from __future__ import annotations

from qtpy.QtCore import QObject, Signal


class Relay(QObject):
    """Delivered queued on the GUI thread: the progress of job `index` (done of total), and a
    job's result (whatever payload that widget's worker makes)."""

    progress = Signal(int, int, int)
    result = Signal(int, object)
