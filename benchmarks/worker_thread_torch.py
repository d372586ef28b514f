#!/usr/bin/env python
"""Is torch slower inside napari's worker threads than in the main thread?

    python benchmarks/worker_thread_torch.py [--rounds 6] [--calls 4] [--batch 4] [--latent 32]

micro-sam found model inference much slower inside napari's `thread_worker`. This script
times one fixed forward pass (a MupadSiT, width 384, 6 blocks, 6 heads, patch 2, random
N(0, 0.02) weights, eval mode, `torch.inference_mode`, float32) in three places, all in one
process with a running Qt event loop, as inside napari:

- main:          the Qt main thread;
- worker:        a `napari.qt.threading.thread_worker` (a QThreadPool thread), as it comes;
- worker+match:  the same, after `napari_mupad.widgets._worker.match_torch_threads()`, which
                 is what the plugin's workers call first.

With `--viewer` a shown napari Viewer (an image layer, its status-bar thread, its canvas)
lives in the process, as it does for the plugin; `--pan-ms N` also pans its camera every N ms
while the worker runs, so the GUI thread keeps rendering (a user moving around meanwhile; on
few cores this measures CPU contention with the renderer, not a worker-thread effect). A shown
viewer needs a display: run it under `xvfb-run -a` on a headless machine.

`--stale-threads N` first leaves torch at N threads in every napari pool thread (what an
earlier job or another plugin's worker may do), then puts the main thread back: a pool
thread keeps its own OpenMP team size across jobs, so "worker" then runs at N threads.

Rounds are interleaved (main, worker, worker+match, then the reverse order) so machine noise
hits all three alike; each round times `--calls` forward passes after one untimed call in
that thread. Printed: torch/OpenMP thread counts seen in each place, median ms per call, and
the ratios. The last line is `worker_vs_main: R` with R = median(worker+match) /
median(main): 1.00 means the plugin's workers run torch as fast as the main thread.
Run it on a quiet machine (load average well below 1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
if "--viewer" not in sys.argv:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no drawing here: no screen needed


def omp_threads() -> int:
    import torch

    m = re.search(r"omp_get_max_threads\(\)\s*:\s*(\d+)", torch.__config__.parallel_info())
    return int(m.group(1)) if m else -1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=4, help="timed forward calls per round and place")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--viewer", action="store_true", help="a shown napari Viewer in the process")
    p.add_argument("--stale-threads", type=int, default=0,
                   help="first leave torch at N threads in every napari pool thread (as an earlier job or "
                        "another plugin's worker may), then restore the main thread's count")
    p.add_argument("--pan-ms", type=int, default=0, help="with --viewer: pan the camera every N ms during worker runs")
    args = p.parse_args(argv)

    import torch
    from napari.qt.threading import thread_worker
    from qtpy.QtCore import QEventLoop
    from qtpy.QtWidgets import QApplication

    from mupad_core.models.sit import MupadSiT
    from napari_mupad.widgets._worker import main_thread_torch_threads, match_torch_threads

    app = QApplication.instance() or QApplication([])
    viewer = None
    if args.viewer:
        import napari
        from qtpy.QtCore import QTimer

        viewer = napari.Viewer(show=True)
        viewer.add_image(np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8), rgb=True)
        pan = QTimer()
        pan_step = [0]

        def do_pan():
            pan_step[0] += 1
            cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
            cam.center = (0, 1024 + 300 * np.sin(pan_step[0] / 10), 1024 + 300 * np.cos(pan_step[0] / 10))

        pan.timeout.connect(do_pan)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.processor() or platform.machine()}"
          f"  cpus={os.cpu_count()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: {' '.join([sys.executable, *sys.argv])}")
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}  "
          f"load average {os.getloadavg()[0]:.2f}  viewer={'yes' if args.viewer else 'no'}  pan_ms={args.pan_ms}")

    torch.manual_seed(0)
    model = MupadSiT(in_channels=4, hidden_size=384, depth=6, num_heads=6, condition_dims=None).eval()
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(torch.randn_like(q) * 0.02)
    x = torch.randn(args.batch, 4, args.latent, args.latent)
    t = torch.rand(args.batch)

    def forward_times(n: int) -> tuple[list[float], dict]:
        seen = {"torch_threads": torch.get_num_threads(), "omp_threads": omp_threads()}
        with torch.inference_mode():
            model(x, t)  # untimed: first call in this thread starts its OpenMP team
            times = []
            for _ in range(n):
                start = time.perf_counter()
                model(x, t)
                times.append(time.perf_counter() - start)
        return times, seen

    original_threads = main_threads = main_thread_torch_threads()
    keep = []  # workers must outlive their threads' last signal

    def poison_pool() -> None:
        """Leave torch at --stale-threads threads in every pool thread, as an earlier job may have."""
        import threading

        from qtpy.QtCore import QThreadPool

        n_pool = QThreadPool.globalInstance().maxThreadCount()
        barrier = threading.Barrier(n_pool)  # all at once: each lands on its own pool thread

        @thread_worker
        def poison():
            barrier.wait(timeout=30)
            model(x, t)  # torch work first: this thread's OpenMP count is initialised from torch's now
            torch.set_num_threads(args.stale_threads)  # then the job changes it, for this thread only

        loop = QEventLoop()
        left = [n_pool]

        def one_done():
            left[0] -= 1
            if left[0] == 0:
                loop.quit()

        for _ in range(n_pool):
            w = poison()
            keep.append(w)
            w.finished.connect(one_done)
            w.start()
        loop.exec()
        pool = QThreadPool.globalInstance()
        while pool.activeThreadCount():  # back in the pool, so the next job reuses one of them
            app.processEvents()
            time.sleep(0.001)
        torch.set_num_threads(original_threads)

    if args.stale_threads:
        print(f"# before each plain 'worker' round, napari's pool threads are left at {args.stale_threads} "
              f"torch threads; the main thread stays at {original_threads}")

    def in_worker(match: bool) -> tuple[list[float], dict]:
        @thread_worker
        def job():
            if match:
                match_torch_threads(main_threads)
            return forward_times(args.calls)

        if args.stale_threads and not match:
            poison_pool()
        result = {}
        loop = QEventLoop()
        worker = job()
        keep.append(worker)
        worker.returned.connect(lambda r: result.setdefault("r", r))
        worker.errored.connect(lambda e: result.setdefault("e", e))
        worker.finished.connect(loop.quit)
        if viewer is not None and args.pan_ms:
            pan.start(args.pan_ms)
        worker.start()
        loop.exec()  # the main thread idles in Qt's event loop, as napari's does
        if viewer is not None and args.pan_ms:
            pan.stop()
        torch.set_num_threads(original_threads)  # keep the main thread's own setting as it was
        if "e" in result:
            raise result["e"]
        return result["r"]

    places = {"main": lambda: forward_times(args.calls), "worker": lambda: in_worker(False),
              "worker+match": lambda: in_worker(True)}
    times: dict[str, list[float]] = {k: [] for k in places}
    seen: dict[str, set] = {k: set() for k in places}
    order = list(places)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            ts, info = places[name]()
            times[name] += ts
            seen[name].add((info["torch_threads"], info["omp_threads"]))
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    for name in places:
        q1, q3 = np.percentile(np.array(times[name]) * 1e3, [25, 75])
        print(f"{name:>13}: {med[name]:8.1f} ms/call (IQR {q1:.1f}-{q3:.1f}, n={len(times[name])})  "
              "(torch, omp) threads seen: " + ", ".join(f"({a}, {b})" for a, b in sorted(seen[name])))
    print(f"worker_unmatched_vs_main: {med['worker'] / med['main']:.2f}")
    print(f"worker_vs_main: {med['worker+match'] / med['main']:.2f}")
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone()
    if viewer is not None:
        viewer.close()
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
