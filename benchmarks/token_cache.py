#!/usr/bin/env python
"""What caching window tokens by their pixels saves a model with an image stream.

    python benchmarks/token_cache.py [--model demo-he2he] [--side 1536] [--steps 2] [--block-px 1024]

A model with an image condition stream (the bundled H&E-variations model: TAEF2 encoder plus a
small convolutional head per window) encodes every window's source pixels before sampling it.
`TokenCache` (generate/handles.py) keeps those tokens by the window's bytes, so a window that two
neighbouring blocks share through their margin is encoded once, and a rerun of the same region
(another seed, strength or step count: what a napari user does) encodes nothing. Side by side, in
one process, over the most tissue-rich square of the bundled slide at the model's pixel size:

1. one run with the cache off (`max_bytes=0`, every block encodes its own windows) against one
   run with an empty cache: what the shared margin windows save inside a run;
2. a rerun with another seed on a fresh handle (cache empty; what a viewer that loads the
   model per run pays) against the same rerun on the handle that has seen the region.

A warm-up run over a corner of the region comes first, untimed. In the first pair both handles
are new (each loads its encoder's codec on first use); in the second, the kept handle has its
codec loaded already, which is part of what keeping a handle saves (the model load itself,
about 2 s, is outside the timings).

Reported: seconds, windows encoded and the ratio; the outputs of each pair are compared pixel
for pixel (the cache must not change them).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr


def timed_run(handle, reader, roi, out: Path, args, seed: int) -> tuple[float, int, np.ndarray]:
    from mupad_core.generate.config import StainConfig
    from mupad_core.generate.engine import run_stain

    encoded = []
    encode = handle.image_encoder.encode
    handle.image_encoder.encode = lambda crop: encoded.append(1) or encode(crop)
    config = StainConfig.for_model(args.model, task=args.task, roi=roi, steps=args.steps, seed=seed,
                                   block_px=args.block_px, overwrite=True)
    try:
        start = time.perf_counter()
        store = run_stain(reader, handle, out, config)
        seconds = time.perf_counter() - start
    finally:
        del handle.image_encoder.encode
    return seconds, len(encoded), zarr.open_group(str(store), mode="r")["0"][:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-he2he")
    p.add_argument("--task", default="he2he")
    p.add_argument("--side", type=int, default=1536, help="region side, level-0 px of the bundled slide")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--block-px", type=int, default=1024)
    args = p.parse_args()
    from mupad_core.demo import sample_slide_path, tissue_rich_roi
    from mupad_core.generate.handles import TokenCache, load_handle
    from mupad_core.slide import open_slide

    torch.set_grad_enabled(False)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.model}, {args.steps} steps, block {args.block_px} px, {time.strftime('%Y-%m-%d')}")
    with open_slide(sample_slide_path()) as reader, tempfile.TemporaryDirectory() as tmp:
        roi = tissue_rich_roi(reader, args.side)
        print(f"region {roi} (level-0 px) of {sample_slide_path().name}\n")
        rows = []
        x, y, _, _ = roi  # warm-up (imports, kernels) on a corner, untimed, so the first pair starts even
        timed_run(load_handle(args.model, args.task), reader, (x, y, 256, 256), Path(tmp) / "warm.ome.zarr", args, 0)
        off = load_handle(args.model, args.task)
        off.token_cache = TokenCache(max_bytes=0)
        on = load_handle(args.model, args.task)
        a = timed_run(off, reader, roi, Path(tmp) / "off.ome.zarr", args, seed=0)
        b = timed_run(on, reader, roi, Path(tmp) / "on.ome.zarr", args, seed=0)
        rows.append(("one run, cache off vs on (shared margin windows)", a, b))
        fresh = load_handle(args.model, args.task)
        c = timed_run(fresh, reader, roi, Path(tmp) / "fresh.ome.zarr", args, seed=1)
        d = timed_run(on, reader, roi, Path(tmp) / "rerun.ome.zarr", args, seed=1)
        rows.append(("rerun with another seed, fresh handle vs kept handle", c, d))
    print("| comparison | without: s (windows encoded) | with: s (windows encoded) | speed-up | same pixels |")
    print("|---|---|---|---|---|")
    for label, (s0, n0, x0), (s1, n1, x1) in rows:
        print(f"| {label} | {s0:.1f} ({n0}) | {s1:.1f} ({n1}) | {s0 / s1:.2f}x | {np.array_equal(x0, x1)} |")
    (a, b), (c, d) = ((r[1][0], r[2][0]) for r in rows)
    print(f"\ntoken_cache_speedup: run {a / b:.2f}x, rerun {c / d:.2f}x")


if __name__ == "__main__":
    main()
