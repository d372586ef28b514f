#!/usr/bin/env python
"""Big images without a pyramid: first open (overview built), reopen, a region, and peak memory.

    python benchmarks/flat_images.py [--size 40000] [--png-size 16000] [--workdir DIR]

Generated from real H&E texture (the bundled CMU-1), written without holding the image: a
tiled JPEG TIFF (512-px tiles), a stripped uncompressed TIFF (one strip, as many microscopes
and scripts write), and a PNG. Each step runs in a fresh process with an empty overview cache
($MUPAD_HOME in --workdir):
- floor: every pixel read once through the same reader, nothing kept (the decode cost any
  overview must pay at least once);
- first open: `open_slide`, which streams the image once into the cached coarse levels;
- reopen: `open_slide` again, then the coarsest level whole (what napari draws first) and a
  512² region at full resolution;
- viewer open (TIFFs; empty cache again): `open_slide(overview="background")`, as the napari
  reader opens, then the same first draw (the coarsest level reads blank until built), then the
  wait until the thread has finished the overview;
- napari (TIFFs; empty cache again): a real viewer under Xvfb opens the file through the
  plugin; seconds until the layer is there, until its first screenshot (a real draw), until the
  overview is finished and drawn again; peak RSS of the whole napari process.
Reported per file: image size (decoded bytes), seconds for each, first open / floor, and the
peak RSS (VmHWM) of each process against the image size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide_throughput import machine_lines, peak_rss, run_json_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "src" / "mupad_core" / "data" / "CMU-1-Small-Region.svs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=40000, help="side of the TIFFs in px (default 40000)")
    p.add_argument("--png-size", type=int, default=16000, help="side of the PNG in px (default 16000)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mupad_flat_images")
    p.add_argument("--step", choices=("floor", "first", "reopen", "viewer", "napari"), help=argparse.SUPPRESS)  # internal
    p.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def texture_rows(size: int):
    """rows(top, h) -> (h, size, 3) uint8 of real H&E, tiled from a 2048² CMU-1 crop."""
    import numpy as np
    import openslide

    with openslide.OpenSlide(str(CMU)) as slide:
        patch = np.asarray(slide.read_region((0, 0), 0, (2048, 2048)).convert("RGB"))

    def rows(top: int, height: int):
        start = top % 2048
        block = patch[start : start + height]
        if block.shape[0] < height:
            block = np.concatenate([block, patch[: height - block.shape[0]]])
        return np.tile(block, (1, size // 2048 + 1, 1))[:, :size]

    return rows


def make_tiled(path: Path, size: int) -> None:
    import numpy as np
    import tifffile

    rows = texture_rows(size)

    def tiles():
        for top in range(0, size, 512):
            band = rows(top, min(512, size - top))
            for left in range(0, size, 512):
                yield band[:, left : left + 512]

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), tile=(512, 512), photometric="rgb", compression="jpeg", shape=(size, size, 3), dtype=np.uint8)


def make_stripped(path: Path, size: int) -> None:
    import numpy as np
    import tifffile

    rows = texture_rows(size)
    image = tifffile.memmap(path, shape=(size, size, 3), dtype=np.uint8, photometric="rgb", bigtiff=True)
    for top in range(0, size, 512):
        image[top : top + 512] = rows(top, min(512, size - top))
    image.flush()
    del image


def make_png(path: Path, size: int) -> None:
    import numpy as np
    from PIL import Image

    rows = texture_rows(size)
    Image.fromarray(np.concatenate([rows(top, min(2048, size - top)) for top in range(0, size, 2048)])).save(
        path, compress_level=1)


def in_process(args) -> None:
    from mupad_core.slide.readers import open_slide

    start = time.perf_counter()
    result: dict = {}
    if args.step == "floor":
        with open_slide(args.file, mpp=0.5, overview=False) as reader:
            level = reader.levels[0]
            for top in range(0, level.shape[0], 2048):
                for left in range(0, level.shape[1], 4096):
                    level[top : top + 2048, left : left + 4096].compute(scheduler="sync")
    elif args.step == "first":
        with open_slide(args.file, mpp=0.5) as reader:
            result["levels"] = len(reader.levels)
    elif args.step == "viewer":
        with open_slide(args.file, mpp=0.5, overview="background") as reader:
            result["open_s"] = time.perf_counter() - start
            t = time.perf_counter()
            reader.levels[-1].compute()
            width, height = reader.dimensions
            reader.read_region(0, width // 2, height // 2, 512, 512)
            result["draw_s"] = time.perf_counter() - t
            reader.overview_build.result()
            result["complete_s"] = time.perf_counter() - start
    elif args.step == "napari":
        import napari
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True)
        start = time.perf_counter()
        (layer,) = viewer.open(args.file, plugin="napari-mupad")
        result["open_s"] = time.perf_counter() - start
        viewer.screenshot(canvas_only=True, flash=False)
        result["draw_s"] = time.perf_counter() - start
        while "mupad_overview_building" in layer.metadata:
            QApplication.processEvents()
            time.sleep(0.05)
        viewer.screenshot(canvas_only=True, flash=False)
        result["complete_s"] = time.perf_counter() - start
        viewer.close()
    else:
        with open_slide(args.file, mpp=0.5) as reader:
            result["open_s"] = time.perf_counter() - start
            reader.levels[-1].compute()
            t = time.perf_counter()
            width, height = reader.dimensions
            reader.read_region(0, width // 2, height // 2, 512, 512)
            result["region_s"] = time.perf_counter() - t
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss() / 2**20, **result}))


def run_step(step: str, path: Path, home: Path) -> dict:
    import os
    import subprocess

    env = {**os.environ, "MUPAD_HOME": str(home)}
    if step == "napari" and not os.environ.get("DISPLAY"):  # a real viewer needs an X server: Xvfb
        command = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", sys.executable, __file__, "--step", step,
                   "--file", str(path)]
        output = subprocess.run(command, check=True, capture_output=True, text=True,
                                env={**env, "QT_API": env.get("QT_API", "pyqt6")}).stdout
        return json.loads(output.strip().splitlines()[-1])
    return run_json_step(__file__, ["--step", step, "--file", str(path)], env=env)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.step:
        in_process(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = [
        (args.workdir / f"tiled-jpeg-{args.size}.tif", args.size, make_tiled),
        (args.workdir / f"stripped-raw-{args.size}.tif", args.size, make_stripped),
        (args.workdir / f"flat-{args.png_size}.png", args.png_size, make_png),
    ]
    for line in machine_lines():
        print(line)
    print()
    print("| file | decoded size | floor: read all (s) | first open, overview built (s) | first / floor "
          "| first open peak RSS | reopen (s) | coarsest level + 512² region (s) | reopen peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    viewer_rows = []
    for path, size, make in files:
        if not path.exists():
            make(path, size)
        home = args.workdir / "home"
        shutil.rmtree(home, ignore_errors=True)
        floor = run_step("floor", path, home)
        first = run_step("first", path, home)
        again = run_step("reopen", path, home)
        decoded = size * size * 3 / 2**30
        print(f"| {path.name} ({path.stat().st_size / 2**20:.0f} MB on disk) | {decoded:.1f} GiB | {floor['seconds']:.1f} "
              f"| {first['seconds']:.1f} | {first['seconds'] / floor['seconds']:.2f} | {first['peak_rss_mb']:.0f} MB "
              f"| {again['open_s']:.2f} | {again['seconds'] - again['open_s']:.2f} | {again['peak_rss_mb']:.0f} MB |",
              flush=True)
        if path.suffix == ".tif":  # a PNG can only be decoded whole: its overview is built at open
            shutil.rmtree(home, ignore_errors=True)
            viewer = run_step("viewer", path, home)
            shutil.rmtree(home, ignore_errors=True)
            gui = run_step("napari", path, home)
            viewer_rows.append(
                f"| {path.name} | {viewer['open_s']:.2f} | {viewer['draw_s']:.2f} | {viewer['complete_s']:.1f} "
                f"| {viewer['complete_s'] / floor['seconds']:.2f} | {viewer['peak_rss_mb']:.0f} MB "
                f"| {gui['open_s']:.2f} | {gui['draw_s']:.2f} | {gui['complete_s']:.1f} | {gui['peak_rss_mb']:.0f} MB |")
    print()
    print("| file (empty cache) | open_slide, background (s) | first draw: coarsest + 512² (s) | overview complete (s) "
          "| complete / floor | peak RSS | napari: layer there (s) | napari: first screenshot (s) "
          "| napari: overview drawn (s) | napari peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in viewer_rows:
        print(row)


if __name__ == "__main__":
    main()
