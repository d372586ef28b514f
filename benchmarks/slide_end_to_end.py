#!/usr/bin/env python
"""Seconds per slide end to end, and peak memory against slide size, with a real model.

    python benchmarks/slide_end_to_end.py [--sizes 4096 8192 16384 28284] [--model demo-he2ihc]
                                          [--steps 8] [--target-mpp MPP] [--random-sit B/2]
                                          [--device auto] [--workdir DIR] [--glass skip|generate|both]
    python benchmarks/slide_end_to_end.py --slide SLIDE [SLIDE ...] ...   # real slides instead

For each size, the synthetic pyramidal slide of `slide_throughput.py` (real H&E tiles on
glass, about half tissue, 0.5 µm/px, tiled JPEG that OpenSlide reads; cached in --workdir) goes
from file to finished OME-Zarr through `run_stain` in a fresh process, exactly as `mupad stain`
runs it: model load, tissue mask, windows fused at every step, pyramid and metadata. Reported
per size: slide area, seconds (load, stain, total), mm² of slide per second, network calls
(window batches through the model, each step and guidance pass counted), windows sampled
(summed over steps; windows without tissue are steered to glass without a pass unless
--glass generate; --glass both runs each slide both ways and prints the ratios), peak RSS
(VmHWM of that process) and, on a GPU, peak allocated GPU memory.

--model: a bundled id, checkpoint folder or hub id, run at its own pixel size unless
--target-mpp says otherwise (demo-he2ihc: 0.5 µm/px, TAEF2 codec). --random-sit S/2|B/2|L/2|XL/2 instead
builds a random-weight MupadSiT of that size with the source as spatial template, writes it
into --workdir and runs it at the slide's 0.5 µm/px: speed does not depend on the weights, so
this measures the paper's setting (256-px tiles, 2x2 patches of 8x-reduced latents) without
trained weights. Its codec is pixel-unshuffle:8 (the same token grid as SD-VAE latents; no VAE
cost is included).

The last line is the headline `peak_rss_growth: R`, R = peak RSS at the largest size / at the
smallest: about 1 when the engine streams (memory does not grow with the slide).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide_throughput import SLIDE_VERSION, machine_lines, make_slide, peak_rss  # noqa: E402

SLIDE_MPP = 0.5  # the synthetic slide's pixel size
SIT_SIZES = {"S/2": (384, 12, 6), "B/2": (768, 12, 12), "L/2": (1024, 24, 16), "XL/2": (1152, 28, 16)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 28284],
                   help="slide sides in px (28284 px at 0.5 µm/px = 2 cm²)")
    p.add_argument("--slide", type=Path, nargs="+", default=None,
                   help="real slide files to run instead of the synthetic sizes (area from their own pixel size)")
    p.add_argument("--model", default="demo-he2ihc")
    p.add_argument("--random-sit", choices=sorted(SIT_SIZES), help="a random-weight SiT of this size instead")
    p.add_argument("--task", default=None, help="default: the model's first task")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--target-mpp", type=float, default=None, help="default: the model's own pixel size")
    p.add_argument("--batch-size", type=int, default=8, help="windows per network pass")
    p.add_argument("--block-px", type=int, default=1024,
                   help="output block side; larger blocks recompute less margin (default 1024, as mupad stain)")
    p.add_argument("--device", default="auto")
    p.add_argument("--read-workers", type=int, default=None,
                   help="threads reading each block (default: 1 on CPU, up to 8 on a GPU host)")
    p.add_argument("--glass", choices=("skip", "generate", "both"), default="skip",
                   help="windows without tissue inside tissue blocks: steered to glass (skip, as mupad stain), "
                        "sampled like the rest (generate), or each slide run both ways side by side")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mupad_slide_throughput")
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # internal: one slide in this process
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def random_sit(size: str, folder: Path) -> Path:
    """A random-weight template SiT of a standard size, saved as `mupad stain` loads it."""
    import torch

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    if (folder / "config.json").is_file():
        return folder
    hidden, depth, heads = SIT_SIZES[size]
    torch.manual_seed(0)
    model = MupadSiT(in_channels=192, concat_channels=192, hidden_size=hidden, depth=depth, num_heads=heads)
    return save_model(model, folder, pipeline={"vae": "pixel-unshuffle:8", "tasks": ["he2ihc"], "mpp": 0.5,
                                               "window_px": 256})


class GpuBusy:
    """Samples the GPU's utilisation (NVML: the share of the last sample period in which a
    kernel ran, what nvidia-smi shows) every 50 ms in a thread; `mean(t0, t1)` over a span."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml, self._device = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as error:  # no NVML (CPU run, or the package is missing): report none
            self._nvml, self.error = None, str(error)

    def __enter__(self):
        import threading

        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            rate = self._nvml.nvmlDeviceGetUtilizationRates(self._device).gpu
            self.samples.append((time.perf_counter(), rate))

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self, t0: float, t1: float, exclude=()) -> float | None:
        inside = [rate for t, rate in self.samples if t0 <= t <= t1 and not any(a <= t <= b for a, b in exclude)]
        return sum(inside) / len(inside) / 100 if inside else None


def run_one(args) -> dict:
    """Inside the child: load, stain, report."""
    import torch

    from mupad_core.generate import engine
    from mupad_core.slide import tissue as tissue_module
    from mupad_core.generate.engine import StainConfig, run_stain
    from mupad_core.generate.handles import load_handle
    from mupad_core.models.checkpoint import CHECKPOINT_FILES, read_pipeline
    from mupad_core.slide.readers import open_slide
    from mupad_core.zoo import resolve_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    start = time.perf_counter()
    pipeline = read_pipeline(resolve_model(args.model, CHECKPOINT_FILES))
    task = args.task or (pipeline.get("tasks") or ["he2he"])[0]
    handle = load_handle(args.model, task, device=device)
    loaded = time.perf_counter()
    passes = windows = 0
    inner = handle.window_velocity

    def counted(x, *a, **k):
        nonlocal passes, windows
        passes += 1
        windows += x.shape[0]
        return inner(x, *a, **k)

    handle.window_velocity = counted
    phases: dict[str, float] = {}
    spans: list[tuple[float, float]] = []

    def timed(name, function):
        def wrapper(*a, **k):
            begin = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - begin
                spans.append((begin, time.perf_counter()))
        return wrapper

    tissue_module.tissue_mask = timed("tissue_s", tissue_module.tissue_mask)
    engine.PyramidWriter.finalize = timed("finalize_s", engine.PyramidWriter.finalize)
    window = int(pipeline.get("window_px", 256))
    config = StainConfig(task=task, steps=args.steps, target_mpp=args.target_mpp or handle.mpp, overwrite=True,
                         batch_size=args.batch_size, window_px=window, overlap_px=window // 4, margin_px=window,
                         block_px=args.block_px, read_workers=args.read_workers,
                         skip_glass_windows=args.glass == "skip")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    with GpuBusy() as busy, open_slide(args.run) as reader:
        out = run_stain(reader, handle, args.out, config)
    done = time.perf_counter()
    import zarr

    shape = zarr.open_group(str(out), mode="r")["0"].shape
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"load_s": loaded - start, "stain_s": done - loaded, "total_s": done - start, "output_shape": list(shape),
            "network_calls": passes, "windows": windows, "peak_rss": peak_rss(), "peak_gpu": gpu, "device": device,
            "task": task,
            "gpu_busy": busy.mean(loaded, done), "gpu_busy_generating": busy.mean(loaded, done, exclude=spans),
            **phases}


def run_child(args, model: str, slide: Path, name: str, glass: str) -> dict:
    """One slide in a fresh process (its peak RSS is the run's own)."""
    out = args.workdir / f"end-to-end-{name}.ome.zarr"
    command = [sys.executable, str(Path(__file__).resolve()), "--run", str(slide), "--out", str(out),
               "--model", model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--device", args.device, "--block-px", str(args.block_px), "--read-workers", str(args.read_workers),
               "--glass", glass]
    command += ["--task", args.task] if args.task else []
    command += ["--target-mpp", str(args.target_mpp)] if args.target_mpp else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def slides(args):
    """(name, path, mm²) of each slide to run: the given files, or the synthetic sizes (written on first use)."""
    if args.slide:
        from mupad_core.slide.readers import open_slide

        for path in args.slide:
            with open_slide(path) as reader:
                (w, h), (mx, my) = reader.dimensions, reader.level_mpp(0)
            yield path.name, path, w * mx * h * my / 1e6
        return
    for size in args.sizes:
        slide = args.workdir / f"synthetic-{size}-256-v{SLIDE_VERSION}.tiff"
        if not slide.is_file():
            begin = time.perf_counter()
            make_slide(slide, size, 256)
            print(f"(synthetic {size}-px slide written in {time.perf_counter() - begin:.0f} s, not timed below)", flush=True)
        yield str(size), slide, (size * SLIDE_MPP / 1000) ** 2


def print_row(size: str, area: float, row: dict, label: str = "") -> None:
    """`area`: mm² of the slide (tissue and glass)."""
    _, h, w = row["output_shape"]
    gpu = f"{row['peak_gpu'] / 2**20:.0f}" if row["peak_gpu"] else "–"
    busy = "–" if row["gpu_busy"] is None else f"{row['gpu_busy']:.0%} ({row['gpu_busy_generating'] or 0:.0%})"
    print(f"| {size}{label} | {area:.1f} | {w} × {h} | {row['load_s']:.1f} | {row.get('tissue_s', 0):.1f} | "
          f"{row['stain_s']:.1f} | {row.get('finalize_s', 0):.1f} | {row['total_s']:.1f} | "
          f"{area / row['total_s']:.2f} | {row['network_calls']} | {row['windows']} | {busy} | "
          f"{row['peak_rss'] / 2**20:.0f} | {gpu} |", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.read_workers is None:
        import os

        cuda = args.device.startswith("cuda") or (args.device == "auto" and _cuda())
        args.read_workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 1
    if args.run:
        print(json.dumps(run_one(args)))
        return 0
    for line in machine_lines():
        print(line)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = str(random_sit(args.random_sit, args.workdir / f"random-sit-{args.random_sit.replace('/', '')}")) \
        if args.random_sit else args.model
    print(f"model: {args.random_sit and f'random-weight SiT-{args.random_sit} ({model})' or model}, "
          f"{args.steps} steps, batch {args.batch_size}, block {args.block_px} px, {args.read_workers} read threads")
    print("| slide | area (mm²) | output (px) | load (s) | tissue mask (s) | stain (s) | pyramid (s) | total (s) "
          "| mm²/s | network calls | windows sampled | GPU busy (outside mask+pyramid) | peak RSS (MiB) | peak GPU (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, slide, area in slides(args):
        both = {}
        for glass in (("skip", "generate") if args.glass == "both" else (args.glass,)):  # skip first: a timeout keeps it
            row = run_child(args, model, slide, name, glass)
            both[glass] = row
            print_row(name, area, row, f" (glass {glass})" if args.glass == "both" else "")
        if args.glass == "both":
            g, k = both["generate"], both["skip"]
            print(f"({name}: skipping glass windows samples {k['windows']} windows instead of {g['windows']} "
                  f"({g['windows'] / max(k['windows'], 1):.2f}× fewer) and stains in {k['stain_s']:.1f} s instead of "
                  f"{g['stain_s']:.1f} s ({g['stain_s'] / k['stain_s']:.2f}× faster))", flush=True)
        rows.append(both.get("skip", row))
    last = args.slide[-1].name if args.slide else args.sizes[-1]
    print(f"seconds_per_slide_{last}: {rows[-1]['total_s']:.1f}")
    print(f"peak_rss_growth: {rows[-1]['peak_rss'] / rows[0]['peak_rss']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
