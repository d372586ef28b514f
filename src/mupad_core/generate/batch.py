"""Many slides on a dask.distributed cluster: one task per slide.

A slide is the natural unit: each task opens its slide, loads the model once and
streams its own OME-Zarr, so workers share nothing but the scheduler. With no
scheduler address a LocalCluster is started: one worker per GPU where there are GPUs
(each pinned to its device), otherwise one single-threaded worker per two cores.
A failed slide is reported and the others go on; resumable outputs mean a rerun with
`resume=True` only redoes what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .engine import StainConfig


@dataclass
class SlideResult:
    slide: str
    output: str | None
    error: str | None = None


def output_name(slide: str | Path) -> str:
    name = Path(slide).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".ome.zarr"
    return Path(name).stem + ".ome.zarr"


def stain_one(slide: str, out_path: str, model: str, config: StainConfig, mpp: float | None, device: str) -> SlideResult:
    """Runs on a worker; never raises, so one bad slide cannot stop the batch."""
    try:
        from ..slide.readers import open_slide
        from .engine import run_stain
        from .handles import load_handle

        if device == "cuda-worker":  # LocalCluster workers are named 0..n-1: one GPU each
            import torch
            from distributed import get_worker

            device = f"cuda:{int(get_worker().name) % torch.cuda.device_count()}"
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        handle = load_handle(model, config.task, device=device)
        if not config.target_mpp and handle.mpp:  # the model's own pixel size, as `mupad stain`
            config = replace(config, target_mpp=handle.mpp)
        with open_slide(slide, mpp=mpp) as reader:
            out = run_stain(reader, handle, out_path, config)
        return SlideResult(slide, str(out))
    except Exception as exc:  # reported per slide, with the file in the message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return SlideResult(slide, None, first)


def local_cluster():
    from distributed import LocalCluster

    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        return LocalCluster(n_workers=gpus, threads_per_worker=1, processes=True), "cuda-worker"
    workers = max(1, (os.cpu_count() or 2) // 2)
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True), "cpu"


def stain_batch(
    slides: list[str],
    out_dir: str | Path,
    model: str,
    config: StainConfig,
    *,
    mpp: float | None = None,
    scheduler: str | None = None,
    device: str = "auto",
    on_result: Callable[[SlideResult], None] | None = None,
) -> list[SlideResult]:
    from distributed import Client, as_completed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [output_name(s) for s in slides]
    if len(set(names)) != len(names):
        raise ValueError("two slides would write the same output name; give them distinct file names")
    cluster = None
    if scheduler is None:
        cluster, worker_device = local_cluster()
        client = Client(cluster)
    else:  # a remote cluster's workers decide for themselves
        client = Client(scheduler)
        worker_device = "auto"
    if device != "auto":
        worker_device = device
    try:
        futures = [
            client.submit(stain_one, str(s), str(out_dir / n), model, replace(config), mpp, worker_device, pure=False)
            for s, n in zip(slides, names)
        ]
        results = []
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            if on_result is not None:
                on_result(result)
        order = {s: i for i, s in enumerate(map(str, slides))}
        return sorted(results, key=lambda r: order[r.slide])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
