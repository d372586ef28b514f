#!/usr/bin/env python
"""OME-TIFF export of a whole-slide result: seconds and peak memory against slide size.

    python benchmarks/ome_tiff_export.py [--sizes 4096 16384 28284] [--workdir DIR] [--compression zlib]

For each size, the synthetic slide of `slide_throughput.py` (real H&E tiles on glass, 0.5 µm/px;
28284 px a side is 2 cm²) goes through `mupad stain --model identity` into an OME-Zarr pyramid
(the result a stain writes, cached in --workdir), then, each in a fresh process:
- floor: every tile of every level of the store read once, nothing written;
- export: the store to a pyramidal OME-TIFF (`mupad export`, tifffile SubIFDs, zlib);
- check: the OME-TIFF reopened by our reader and compared with the store at every level, block
  by block (the count of differing pixels must be 0), and its OME-XML validated by ome-types.
Reported per size: seconds for each, export/floor, peak RSS (VmHWM) of each process, file size.
The last line is `peak_rss_growth: R`, the export's peak RSS at the largest size over the
smallest: about 1 when the export streams.
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
from slide_throughput import SLIDE_VERSION, machine_lines, make_slide, peak_rss, run_json_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK = 4096


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 28284])
    p.add_argument("--compression", default="zlib")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mupad_ome_tiff_export")
    p.add_argument("--step", choices=("floor", "export", "check"), help=argparse.SUPPRESS)  # internal
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tiff", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def floor(store: Path) -> dict:
    """Read every tile of every level once: what any export must at least do."""
    from mupad_core.slide.readers import open_slide

    with open_slide(store) as reader:
        for level in reader.levels:
            height, width = level.shape[:2]
            for top in range(0, height, 512):
                for left in range(0, width, 512):
                    level[top : top + 512, left : left + 512].compute()
    return {}


def export(store: Path, tiff: Path, compression: str) -> dict:
    from mupad_core.slide.readers import open_slide
    from mupad_core.store.ometiff import export_ome_tiff

    with open_slide(store) as reader:
        export_ome_tiff(reader, tiff, compression=compression, overwrite=True)
    return {"bytes": tiff.stat().st_size}


def check(store: Path, tiff: Path) -> dict:
    """Differing pixels between the store and the OME-TIFF at every level (must be 0)."""
    import numpy as np
    import tifffile
    from ome_types import from_xml

    from mupad_core.slide.readers import open_slide

    with tifffile.TiffFile(tiff) as tif:
        from_xml(tif.ome_metadata, validate=True)
    differing = 0
    with open_slide(store) as original, open_slide(tiff) as exported:
        assert len(original.levels) == len(exported.levels)
        for a, b in zip(original.levels, exported.levels):
            assert a.shape == b.shape, (a.shape, b.shape)
            for top in range(0, a.shape[0], BLOCK):
                for left in range(0, a.shape[1], BLOCK):
                    window = (slice(top, top + BLOCK), slice(left, left + BLOCK))
                    differing += int(np.count_nonzero(np.asarray(a[window]) != np.asarray(b[window])))
    return {"differing_pixels": differing, "levels": len(original.levels)}


def in_process(args) -> None:
    start = time.perf_counter()
    if args.step == "floor":
        result = floor(args.store)
    elif args.step == "export":
        result = export(args.store, args.tiff, args.compression)
    else:
        result = check(args.store, args.tiff)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss() / 2**20, **result}))


def run_step(step: str, store: Path, tiff: Path, compression: str) -> dict:
    return run_json_step(__file__, ["--step", step, "--store", str(store), "--tiff", str(tiff),
                                    "--compression", compression])


def result_store(size: int, workdir: Path) -> Path:
    """The identity stain of the synthetic slide of this size (cached)."""
    slide = workdir / f"synthetic-{size}-v{SLIDE_VERSION}.tiff"
    if not slide.exists():
        make_slide(slide, size, 256)
    store = workdir / f"stained-{size}.ome.zarr"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "mupad_core.cli", "stain", str(slide), "-o", str(store),
                        "--model", "identity", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return store


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.step:
        in_process(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    for line in machine_lines():
        print(line)
    print()
    print("| side (px) | area at 0.5 µm/px | levels | floor: read all (s) | export (s) | export / floor "
          "| export peak RSS (MB) | floor peak RSS (MB) | OME-TIFF size | differing pixels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    peaks = []
    for size in args.sizes:
        store = result_store(size, args.workdir)
        tiff = args.workdir / f"stained-{size}.ome.tif"
        read = run_step("floor", store, tiff, args.compression)
        written = run_step("export", store, tiff, args.compression)
        checked = run_step("check", store, tiff, args.compression)
        peaks.append(written["peak_rss_mb"])
        area = (size * 0.5e-3) ** 2 / 100  # cm²
        print(f"| {size} | {area:.2f} cm² | {checked['levels']} | {read['seconds']:.1f} | {written['seconds']:.1f} "
              f"| {written['seconds'] / read['seconds']:.2f} | {written['peak_rss_mb']:.0f} | {read['peak_rss_mb']:.0f} "
              f"| {written['bytes'] / 2**20:.0f} MB | {checked['differing_pixels']} |", flush=True)
        tiff.unlink()
    print(f"\npeak_rss_growth: {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
