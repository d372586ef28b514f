"""Whole-slide generation: blocks in raster order, windows fused at every step.

The output region (an ROI or the whole slide, at the target pixel size) is cut into
blocks aligned with the output chunk grid. Each block is generated with a margin of
context around it: inside the block-plus-margin, overlapping latent windows run the
sampler in lockstep and their velocities are fused with smooth weights at every step
(MultiDiffusion), starting from one global noise field (`GlobalNoise`) so that a
position sees the same noise whichever block or window computes it. Only the block's
interior is written, so blocks stream into the OME-Zarr store as they finish, memory
is bounded by one block, and `resume` skips blocks whose chunks are all on disk.

The scheme was chosen over one global lockstep canvas because it streams, bounds
memory and resumes by chunk; the seam test (tests/test_engine.py) measures what it
costs at window and block borders.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..store import PyramidWriter
from ..slide.tissue import TissueMap
from ..store.omezarr import spread_path
from ..tasks import SAME_DOMAIN_TASKS, supports_strength
from ..transport.path import interpolate, source_start
from ..transport.samplers import sample
from .canvas import GlobalNoise
from .fusion import ramp_weights, window_grid
from .fused import FusedBlockVelocity, window_cls_noise
from .handles import ModelHandle
from .uncertainty import mean_and_spread, sample_seeds
from .config import StainConfig  # noqa: F401  (its home is config.py; imported from here for years)
from .resample import PixelMap, pixel_map, read_resampled, to_unit_float

ProgressCallback = Callable[[int, int], None]  # (blocks done, total); may raise to cancel


class Cancelled(Exception):
    """Raised by a progress callback to stop a run; the partial store stays resumable."""




def _check(config: StainConfig, handle: ModelHandle) -> None:
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    if config.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {config.batch_size}")
    if config.guidance != 0 and not handle.passthrough and not getattr(handle, "conditioned", False):
        # Accepting a guidance weight for a model with no condition stream would record a
        # setting that did nothing.
        raise ValueError(f"guidance {config.guidance} needs a model with an image condition stream; "
                         f"{handle.model_id} has none: use 0")
    guidance_schedule(config)  # raises on a malformed schedule
    if config.block_px % config.chunk_px:
        raise ValueError(f"block size {config.block_px} must be a multiple of the chunk size {config.chunk_px}")
    if config.fusion not in ("cosine", "uniform"):
        raise ValueError(f"fusion must be 'cosine' or 'uniform', got {config.fusion!r}")
    if config.method not in ("euler", "heun", "sde"):
        raise ValueError(f"sampler method must be 'euler', 'heun' or 'sde', got {config.method!r}")
    if not 0 <= config.overlap_px < config.window_px:
        raise ValueError(f"overlap {config.overlap_px} must be smaller than the window {config.window_px}")
    if config.samples < 1:
        raise ValueError(f"samples must be at least 1, got {config.samples}")
    if not 0 < config.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {config.strength}")
    if config.strength < 1 and getattr(handle, "cls_dim", 0):
        # Its CLS token would start from noise while the image starts part-way: not what it learnt.
        raise ValueError(f"{handle.model_id} generates a CLS token with each window; run it with strength 1")
    if config.strength < 1 and not handle.passthrough and not supports_strength(config.task):
        raise ValueError(
            f"strength {config.strength} starts from the noised source, which only makes sense when the output is "
            f"the same kind of image as the input ({', '.join(SAME_DOMAIN_TASKS)}), not for {config.task!r}"
        )
    if getattr(handle, "source_start", None) is not None:
        # Its paths start at the source: the SDE's score assumes a Gaussian noise end, and a
        # variation's partial start would mix two different starting points.
        if config.method == "sde":
            raise ValueError(f"{handle.model_id} starts its paths at its source; sample it with euler or heun, not sde")
        if config.strength < 1:
            raise ValueError(f"{handle.model_id} starts its paths at its source; run it with strength 1")
    if config.target_mpp is not None and not (math.isfinite(config.target_mpp) and config.target_mpp > 0):
        raise ValueError(f"target pixel size must be a positive number of µm/px, got {config.target_mpp}")
    if config.window_px < 1:
        raise ValueError(f"window must be positive, got {config.window_px}")
    # A window is whole latent patches: the codec's downscale times the denoiser's patch size.
    model_config = getattr(getattr(handle, "model", None), "config", None)
    patch = int(getattr(model_config, "patch_size", 1) or 1)
    unit = handle.downscale * patch
    for name, multiple in (("window_px", unit), ("overlap_px", handle.downscale), ("margin_px", handle.downscale)):
        if getattr(config, name) % multiple:
            what = f"latent downscale {handle.downscale} x patch size {patch}" if multiple == unit and patch > 1 \
                else f"latent downscale {handle.downscale}"
            raise ValueError(f"{name}={getattr(config, name)} must be a multiple of {multiple} (the {what})")


def output_geometry(reader, config: StainConfig) -> tuple[tuple[int, int, int, int], tuple[float, float], float, int, int]:
    """ROI in level-0 px, source (x, y) mpp, target mpp, and the output (height, width).

    The output has square pixels; by default the source's own size (its finer axis where
    the scanner's pixels are not square, so nothing is lost).
    """
    src_mpp = reader.level_mpp(0)
    target = config.target_mpp or min(src_mpp)
    width0, height0 = reader.dimensions
    x, y, w, h = config.roi or (0, 0, width0, height0)
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width0 or y + h > height0:
        raise ValueError(f"{reader.path.name}: ROI x={x} y={y} w={w} h={h} is not inside the slide ({width0} x {height0})")
    return (x, y, w, h), src_mpp, target, max(1, round(h * src_mpp[1] / target)), max(1, round(w * src_mpp[0] / target))


def output_origin(reader, roi, src_mpp, target_mpp: float) -> tuple[float, float]:
    """(y, x) µm of output pixel (0, 0)'s centre on the source's world: the result of a region
    opens where the region lies. Output pixel i averages source pixels [x0 + i s, x0 + (i+1) s)
    (s = target / source µm/px), so its centre is at source pixel x0 + (s - 1) / 2."""
    x0, y0 = roi[0], roi[1]
    sx, sy = target_mpp / src_mpp[0], target_mpp / src_mpp[1]
    oy, ox = getattr(reader, "origin", (0.0, 0.0))
    return oy + (y0 + (sy - 1) / 2) * src_mpp[1], ox + (x0 + (sx - 1) / 2) * src_mpp[0]


def read_source(reader, pmap: PixelMap, oy: int, ox: int, oh: int, ow: int) -> torch.Tensor:
    """Source pixels (C, oh, ow) float in [0, 1] of output box (oy, ox) at the target size."""
    pixels = read_resampled(reader, pmap, oy, ox, oh, ow)
    return to_unit_float(pixels) if isinstance(pixels, np.ndarray) else pixels


def read_source_parallel(reader, pmap: PixelMap, oy: int, ox: int, oh: int, ow: int, workers: int) -> torch.Tensor:
    """`read_source` of a large box as `workers` horizontal strips read at once.

    Decoding (OpenSlide, tifffile) and resampling release the GIL, so on a many-core GPU
    host a block is read several times faster than in one thread; each output pixel depends
    only on its own taps, so the strips join into exactly the one-piece read."""
    strip = -(-oh // max(workers, 1))
    if workers <= 1 or strip < 256:
        return read_source(reader, pmap, oy, ox, oh, ow)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mupad-read-strip") as pool:
        parts = list(pool.map(lambda y: read_source(reader, pmap, y, ox, min(strip, oy + oh - y), ow),
                              range(oy, oy + oh, strip)))
    return torch.cat(parts, dim=-2)


def read_passthrough(reader, pmap: PixelMap, oy: int, ox: int, oh: int, ow: int) -> np.ndarray:
    """Output pixels (C, oh, ow) of a passthrough (identity) block, in the slide's own dtype.

    A source at the output size is passed on as it is (any channel count, any dtype: a
    16-bit fluorescence panel stays 16-bit); a resampled read is scaled back to the dtype's
    range and rounded.
    """
    pixels = read_resampled(reader, pmap, oy, ox, oh, ow)
    if isinstance(pixels, np.ndarray):
        return np.moveaxis(pixels, -1, 0)
    dtype = np.dtype(reader.dtype)
    if dtype.kind == "f":
        return pixels.numpy().astype(dtype)
    peak = float(np.iinfo(dtype).max)
    return (pixels.clamp(0, 1) * peak).round().numpy().astype(dtype)


def check_input(reader, handle: ModelHandle) -> None:
    """A model runs only on the kind of image it was trained on: refuse any other slide here,
    before anything is written, in one line naming both (not later, inside torch)."""
    if handle.passthrough:
        return
    channels = int(reader.levels[0].shape[2])
    dtype = np.dtype(reader.dtype)
    wanted = int(getattr(handle, "input_channels", 3))
    if channels != wanted or dtype != np.uint8:
        kind = getattr(reader, "kind", "image")
        raise ValueError(f"{Path(str(reader.path)).name} is a {channels}-channel {dtype} {kind} image; "
                         f"{handle.model_id} takes {wanted}-channel 8-bit brightfield (RGB) input")


class ReadAhead:
    """`read(*box)` for each box in order, computed one box ahead in a worker thread.

    Decoding the next block (openslide, numpy: they release the GIL) overlaps encoding
    and writing this one. Only the worker calls `read`; leaving the `with` cancels what is
    queued and waits for a read in flight, so the caller may close the reader right after.
    """

    def __init__(self, read: Callable, boxes: list[tuple]):
        self._read, self._boxes = read, iter(boxes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mupad-read-ahead")
        self._pending: deque[Future] = deque()

    def __enter__(self) -> ReadAhead:
        self._submit()
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        box = next(self._boxes, None)
        if box is not None:
            self._pending.append(self._pool.submit(self._read, *box))

    def next(self):
        self._submit()
        return self._pending.popleft().result()


def block_region(start: int, length: int, margin: int, window: int, stride: int) -> tuple[int, int]:
    """Latent span [lo, hi) of the stride-aligned windows needed for [start, start+length) plus margin.

    Windows sit on one global grid (multiples of `stride`), so two neighbouring blocks
    compute the very same windows where they overlap and fuse them identically.
    """
    lo = math.floor((start - margin) / stride) * stride
    last = math.ceil((start + length + margin - window) / stride) * stride
    return lo, max(last, lo) + window


@dataclass
class Glass:
    """Windows without tissue, and the latent they are steered to instead of being sampled.

    `is_glass(window, origin_latent)` decides from the window's global position (so a window
    shared by two blocks is glass in both); `latent` is the background's (C,) latent. Such a
    window's velocity is the exact one that carries the state to that latent along the
    straight path, (latent - x) / (1 - t): no network pass, and it fuses with its neighbours'
    through the same weights, so tissue fades into glass without a seam."""

    is_glass: Callable
    latent: torch.Tensor


def generate_block(handle: ModelHandle, source: torch.Tensor, origin_latent: tuple[int, int],
                   noise: GlobalNoise | list[GlobalNoise], config: StainConfig,
                   start_noise: list[torch.Tensor] | None = None, glass: Glass | None = None) -> torch.Tensor:
    """Sample one block region in lockstep over fused windows; returns pixels (C, H, W), or
    (K, C, H, W) for a list of K noise fields (the block's source is encoded once).

    `source` covers exactly the region; `origin_latent` is its global latent position,
    a multiple of the window stride. `start_noise` (one per field): the fields' step-0 noise
    over the region, drawn ahead by the caller. `glass`: windows without tissue to skip.
    """
    d = handle.downscale
    prepared = handle.prepare(source)
    hl, wl = source.shape[-2] // d, source.shape[-1] // d
    win, ov = config.window_px // d, config.overlap_px // d
    windows = window_grid(hl, wl, win, ov)
    weight = ramp_weights(win, win, ov if config.fusion == "cosine" else 0)
    weight_sum = torch.zeros(hl, wl)
    for w in windows:
        weight_sum[w.y : w.y + w.h, w.x : w.x + w.w] += weight
    glass_weight = None
    if glass is not None:
        skipped = {w for w in windows if glass.is_glass(w, origin_latent)}
        if skipped:
            glass_weight = torch.zeros(hl, wl)
            for w in skipped:
                glass_weight[w.y : w.y + w.h, w.x : w.x + w.w] += weight
            windows = [w for w in windows if w not in skipped]
    fields = noise if isinstance(noise, list) else [noise]
    starts = start_noise or [None] * len(fields)
    samples = [handle.decode(_sample_latent(handle, prepared, windows, weight, weight_sum, origin_latent, field, config,
                                            start, glass_weight, glass)).clamp(0, 1) for field, start in zip(fields, starts)]
    return torch.stack(samples) if isinstance(noise, list) else samples[0]


def _sample_latent(handle, prepared, windows, weight, weight_sum, origin_latent, noise: GlobalNoise,
                   config: StainConfig, start: torch.Tensor | None = None, glass_weight: torch.Tensor | None = None,
                   glass: Glass | None = None) -> torch.Tensor:
    """One latent sample of the block: the transport's sampler (`config.method`) integrating
    the block's fused velocity (`fused.FusedBlockVelocity`) from t_start to 1.

    The state lives on the model's device and nothing in the loop waits for it (no copy
    back per window batch): on a GPU the host queues the whole block's steps ahead of the
    kernels. Noise is drawn on the CPU, a function of seed and global position (the SDE's
    increments too), so blocks cut differently give the same pixels.
    """
    device = getattr(handle, "device", None) or torch.device("cpu")
    hl, wl = weight_sum.shape
    oy, ox = origin_latent
    x = (noise.window(oy, ox, hl, wl, step=0) if start is None else start).to(device)
    sigma = getattr(handle, "source_start", None)
    if sigma is not None:  # the model's paths start at its source latent (transport/path.py)
        x = source_start(handle.source_latent(prepared).to(device), x, sigma)
    t_start = 1.0 - config.strength
    if t_start > 0:
        # A variation: the source itself, noised to t_start along the same path the model learnt.
        source = handle.source_latent(prepared) if hasattr(handle, "source_latent") else prepared.source_latent
        x = interpolate(source.to(device)[None], x[None], torch.tensor([t_start], device=device))[0]
    # A CLS model (REG) generates one global token per window along with it: each window
    # keeps its own, its noise fixed by the window's global position.
    cls_dim = getattr(handle, "cls_dim", 0)
    cls = (torch.stack([window_cls_noise(noise.seed, oy + w.y, ox + w.x, cls_dim) for w in windows]).to(device)
           if cls_dim else None)
    weight_at = guidance_schedule(config)
    span = max(1.0 - t_start, 1e-9)
    fused = FusedBlockVelocity(
        handle, prepared, windows, weight, weight_sum, config.batch_size,
        guidance_at=lambda t: weight_at((t - t_start) / span) if config.guidance else 0.0, device=device,
        glass_weight=glass_weight, glass_latent=None if glass_weight is None else glass.latent)

    def sde_noise(step: int, shape: tuple) -> torch.Tensor:
        if cls is not None and tuple(shape) == tuple(cls.shape):
            return torch.stack([window_cls_noise(noise.seed, oy + w.y, ox + w.x, cls_dim, step + 1) for w in windows])
        return noise.window(oy, ox, hl, wl, step=step + 1)[None]

    result = sample(fused, x[None], method=config.method, steps=config.steps, cls_noise=cls, t_start=t_start,
                    sde_noise=sde_noise)
    return result.x[0]


def guidance_schedule(config: StainConfig):
    """The guidance weight as a function of progress through the trajectory (0 = noise end)."""
    from ..transport.samplers import annealed, constant, interval

    spec = config.guidance_schedule
    if spec == "constant":
        return constant(config.guidance)
    if spec == "annealed":
        return annealed(config.guidance, 0.0)
    if spec.startswith("interval:"):
        try:
            lo, hi = (float(v) for v in spec.split(":")[1:3])
        except ValueError:
            lo = hi = -1.0
        if 0 <= lo <= hi <= 1:
            return interval(config.guidance, lo, hi)
    raise ValueError(f"guidance schedule {spec!r}: use constant, annealed or interval:LO:HI (0 <= LO <= HI <= 1)")


def blocks_with_tissue(tissue, roi, scale: tuple[float, float], out_h: int, out_w: int, block: int,
                       margin: int) -> set[tuple[int, int]]:
    """(row, col) of the output blocks whose box (plus margin) touches tissue; `tissue` is a
    `TissueMap`, `scale` is (x, y) level-0 px per output px."""
    keep = set()
    for row, by in enumerate(range(0, out_h, block)):
        for col, bx in enumerate(range(0, out_w, block)):
            box = output_box_level0(roi, scale, by - margin, bx - margin, block + 2 * margin, block + 2 * margin)
            if tissue.fraction(*box) > 0:
                keep.add((row, col))
    return keep


def background_latent(handle: ModelHandle, config: StainConfig) -> torch.Tensor | None:
    """The latent windows without tissue are steered to, or None where they are sampled:
    skipping switched off, a passthrough model, or a codec that cannot draw plain background."""
    if not (config.skip_background and config.skip_glass_windows) or handle.passthrough \
            or not hasattr(handle, "background_latent"):
        return None
    return handle.background_latent(1.0 if output_kind(handle) == "rgb" else 0.0)


def glass_windows(handle: ModelHandle, tissue, roi, scale: tuple[float, float], config: StainConfig,
                  latent: torch.Tensor) -> Glass:
    """Which windows hold no tissue: none within the window, `overlap_px` around it and two
    mask pixels more (the mask is coarse; the margin keeps faint tissue edges generated)."""
    d, pad = handle.downscale, config.overlap_px
    mask_pad = 2 * tissue.downsample  # level-0 px: two mask pixels, whatever the output's pixel size

    def is_glass(window, origin_latent) -> bool:
        y, x = (origin_latent[0] + window.y) * d - pad, (origin_latent[1] + window.x) * d - pad
        bx, by, bw, bh = output_box_level0(roi, scale, y, x, window.h * d + 2 * pad, window.w * d + 2 * pad)
        return tissue.fraction(bx - mask_pad, by - mask_pad, bw + 2 * mask_pad, bh + 2 * mask_pad) == 0

    return Glass(is_glass, latent)


def output_box_level0(roi, scale: tuple[float, float], y: float, x: float, h: float, w: float):
    """Level-0 (x, y, w, h) of an output-pixel box."""
    return roi[0] + x * scale[0], roi[1] + y * scale[1], w * scale[0], h * scale[1]


def output_kind(handle: ModelHandle) -> str:
    """RGB for brightfield output; fluorescence for named markers or any other channel count."""
    if getattr(handle, "channel_names", None) or handle.out_channels != 3:
        return "fluorescence"
    return "rgb"


def run_stain(reader, handle: ModelHandle, out_path: str | Path, config: StainConfig = StainConfig(),
              progress: ProgressCallback | None = None, tissue_blocks: set[tuple[int, int]] | None = None,
              regions=None) -> Path:
    """Generate `config.task` over the ROI (or slide) of `reader` into an OME-Zarr at `out_path`.

    `regions` (`slide.regions.Regions`, e.g. a QuPath GeoJSON export): only blocks touching a
    region are generated, pixels outside every region stay background, the ROI defaults to
    their bounding box, and the regions are recorded in the provenance.

    Blocks without tissue (`config.skip_background`; or not in `tissue_blocks` when given)
    are written as background instead of generated. Returns the final store path.
    """
    _check(config, handle)
    check_input(reader, handle)
    if regions is not None and config.roi is None:
        config = replace(config, roi=regions.bbox())
    roi, src_mpp, target_mpp, out_h, out_w = output_geometry(reader, config)
    scale = (target_mpp / src_mpp[0], target_mpp / src_mpp[1])
    pmap = pixel_map(reader, roi, target_mpp)
    glass_latent = background_latent(handle, config)
    provenance = {
        "model_id": handle.model_id,
        "weights_hash": handle.weights_hash,
        "task": config.task,
        "seed": config.seed,
        "steps": config.steps,
        "guidance": config.guidance,
        "method": config.method,
        # Everything that changes pixels (a resume must match it); batch size does not.
        # (a constant guidance schedule, the default, is left out so stores from before schedules resume;
        # glass-window skipping is recorded only where it took effect: a store without it sampled them)
        "engine": {k: v for k, v in asdict(config).items() if k not in ("resume", "overwrite", "batch_size", "read_workers")
                   and not (k == "guidance_schedule" and v == "constant")
                   and not (k == "skip_glass_windows" and glass_latent is None)},
        "batch_size": config.batch_size,
        "source": {"path": str(reader.path), "mpp": list(src_mpp), "roi_level0": list(roi),
                   **({"mpp_origin": reader.mpp_origin} if getattr(reader, "mpp_origin", "file") != "file" else {})},
        "software": f"napari-mupad {__version__}",
    }
    if regions is not None:
        provenance["regions"] = {"file": regions.source, "geojson": regions.as_geojson()}
    origin = output_origin(reader, roi, src_mpp, target_mpp)
    if handle.passthrough:  # a copy: the slide's own channels, names and dtype
        channels, dtype = int(reader.levels[0].shape[2]), np.dtype(reader.dtype)
        kind = "rgb" if channels == 3 and dtype == np.uint8 and reader.kind != "fluorescence" else "fluorescence"
        names = list(reader.channel_names) if kind == "fluorescence" else None
        colors = None
    else:
        channels, dtype, kind = handle.out_channels, np.dtype("uint8"), output_kind(handle)
        names, colors = getattr(handle, "channel_names", None), getattr(handle, "channel_colors", None)
    writer = PyramidWriter(
        out_path, (out_h, out_w), channels, dtype=dtype.name, mpp=(target_mpp, target_mpp),
        chunk=config.chunk_px, version=config.version, kind=kind,
        channel_names=names, channel_colors=colors,
        provenance=provenance, resume=config.resume, overwrite=config.overwrite, origin=origin,
    )
    spread = spread_writer(writer, handle, config, provenance, origin) if config.samples > 1 else None
    glass = None
    if config.skip_background and not handle.passthrough:  # after the writer: a refused resume costs no mask
        tissue = TissueMap.of(reader)
        if tissue_blocks is None:
            tissue_blocks = blocks_with_tissue(tissue, roi, scale, out_h, out_w, config.block_px, config.margin_px)
        glass = glass_windows(handle, tissue, roi, scale, config, glass_latent) if glass_latent is not None else None
    done = writer.done_tiles()
    spread_done = spread.done_tiles() if spread is not None else None
    noises = [GlobalNoise(seed, handle.latent_channels) for seed in sample_seeds(config.seed, config.samples)]
    b, m, c, d = config.block_px, config.margin_px, config.chunk_px, handle.downscale
    blocks = [(by, bx, min(b, out_h - by), min(b, out_w - bx)) for by in range(0, out_h, b) for bx in range(0, out_w, b)]
    chunks_of = [[(y, x) for y in range(by, by + bh, c) for x in range(bx, bx + bw, c)] for by, bx, bh, bw in blocks]

    def finished(chunks) -> bool:
        return all(ch in done for ch in chunks) and (spread is None or all(ch in spread_done for ch in chunks))

    todo = [block for block, chunks in zip(blocks, chunks_of) if not finished(chunks)]

    def generated(block) -> bool:
        by, bx = block[0], block[1]
        if regions is not None and not regions.touches(roi, scale, by, bx, min(b, out_h - by), min(b, out_w - bx)):
            return False
        return not handle.passthrough and (tissue_blocks is None or (by // b, bx // b) in tissue_blocks)

    def inside(by: int, bx: int, bh: int, bw: int):
        """The block's pixels inside the regions (None: no regions, all kept)."""
        return None if regions is None else regions.mask(roi, scale, by, bx, bh, bw)

    def source_box(by: int, bx: int, bh: int, bw: int) -> tuple[int, int, int, int]:
        """Output px box of the block plus the margin its stride-aligned windows need."""
        win, stride, margin = config.window_px // d, (config.window_px - config.overlap_px) // d, m // d
        ly0, ly1 = block_region(by // d, -(-bh // d), margin, win, stride)
        lx0, lx1 = block_region(bx // d, -(-bw // d), margin, win, stride)
        return ly0 * d, lx0 * d, (ly1 - ly0) * d, (lx1 - lx0) * d

    def report(done_blocks: int) -> None:
        if progress is not None:
            progress(done_blocks, len(blocks))

    # The next block is read (decoded, resampled) in a worker thread while this one is
    # generated, and a finished block is written in another while the next is generated, so
    # neither the model's device nor the disk waits on the other. Progress is reported from
    # the writer, in order, once a block is on disk; a cancel raised there stops the loop at
    # its next block.
    def source_and_noise(oy: int, ox: int, oh: int, ow: int):
        """The block's source pixels and each noise field's starting noise over it."""
        source = read_source_parallel(reader, pmap, oy, ox, oh, ow, config.read_workers)
        return source, [field.window(oy // d, ox // d, oh // d, ow // d, step=0) for field in noises]

    if handle.passthrough:
        reads = ReadAhead(lambda *box: read_passthrough(reader, pmap, *box), todo)
    else:
        reads = ReadAhead(source_and_noise, [source_box(*block) for block in todo if generated(block)])
    with reads, WriteBehind() as writes:
        for n, ((by, bx, bh, bw), chunks) in enumerate(zip(blocks, chunks_of)):
            if finished(chunks):
                writes.submit(report, n + 1)
                continue
            spread_pixels = None
            if handle.passthrough:
                out = reads.next()
            elif not generated((by, bx)):
                background = 255 if output_kind(handle) == "rgb" else 0
                out = np.full((handle.out_channels, bh, bw), background, dtype=np.uint8)
            else:
                oy, ox, _, _ = source_box(by, bx, bh, bw)
                source, start_noise = reads.next()
                full = generate_block(handle, source, (oy // d, ox // d), noises, config, start_noise, glass)
                pixels = full[..., by - oy : by - oy + bh, bx - ox : bx - ox + bw]
                if spread is None:  # one sample (or its spread already on disk): no spread map to compute
                    out = pixels[0] if pixels.shape[0] == 1 else pixels.mean(0)
                else:
                    out, spread_pixels = mean_and_spread(pixels, one_channel=output_kind(handle) == "rgb")
            if spread is not None and spread_pixels is None:  # background or passthrough: nothing varies
                spread_pixels = np.zeros((spread.shape[0], bh, bw), dtype=np.uint8)
            writes.submit(write_finished_block, writer, done, spread, spread_done, by, bx, out, spread_pixels, chunks, c,
                          None if regions is None else partial(inside, by, bx, bh, bw),
                          255 if writer.kind == "rgb" else 0)
            writes.submit(report, n + 1)
    if spread is not None:
        spread.finalize()  # before the mean: a finished mean store means a finished spread too
    return writer.finalize()


def write_finished_block(writer, done, spread, spread_done, by, bx, out, spread_pixels, chunks, c,
                         keep_mask: Callable[[], np.ndarray] | None = None, background: int = 255) -> None:
    """Converts (float pixels in [0, 1] become uint8) and writes one block, in the writer thread;
    pixels outside `keep_mask()` (the regions asked for, rasterised here, off the sampling
    thread) are written as background."""
    out = as_uint8(out)
    keep = keep_mask() if keep_mask is not None else None
    if keep is not None and not keep.all():
        out = out.copy()
        out[:, ~keep] = background
        if spread_pixels is not None:
            spread_pixels = as_uint8(spread_pixels).copy()
            spread_pixels[:, ~keep] = 0
    write_block(writer, done, by, bx, out, chunks, c)
    if spread is not None:
        write_block(spread, spread_done, by, bx, as_uint8(spread_pixels), chunks, c)
    release_freed_memory()


class WriteBehind:
    """Runs each submitted task (a block's write, a progress report) in a worker thread, one
    at a time and in order.

    At most two tasks wait behind the one in flight, so memory holds two finished blocks at
    most. Once a task fails (a write error, or a progress callback raising `Cancelled`) the
    tasks queued after it are skipped, so the store holds exactly the blocks reported before
    the stop, however far the generating thread had got; the error is raised at the next
    `submit` or on leaving the `with`, which waits for the tasks submitted.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mupad-write-behind")
        self._pending: deque[Future] = deque()
        self._error: BaseException | None = None

    def __enter__(self) -> WriteBehind:
        return self

    def _run(self, task: Callable, args: tuple) -> None:
        if self._error is not None:
            return
        try:
            task(*args)
        except BaseException as error:
            self._error = error
            raise

    def submit(self, task: Callable, *args) -> None:
        if self._error is not None:
            raise self._error
        while len(self._pending) >= 2:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._run, task, args))

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            while self._pending:
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
                else:  # already failing: wait for the task, keep the first error
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)


def release_freed_memory() -> None:
    """Hand memory freed by the block back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Blocks allocate and free large buffers of varying sizes (edge blocks are smaller); glibc
    keeps the freed pages, so the process grew block by block with the slide's size: peak RSS
    983 MiB after 16 blocks of a 2 cm² slide, 641 MiB with a trim after each block (measured,
    benchmarks/slide_end_to_end.py). A trim costs milliseconds against seconds per block. It runs
    inside napari too, on purpose: a stain run from the widget grows the viewer's process the same
    way, and a trim only hands back pages glibc already holds free (no other thread's memory moves)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    global _MALLOC_TRIM
    if _MALLOC_TRIM is False:
        import ctypes
        import sys

        _MALLOC_TRIM = None
        if sys.platform.startswith("linux"):
            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # musl and other C libraries have none
                _MALLOC_TRIM = None
    return _MALLOC_TRIM


_MALLOC_TRIM = False  # not looked up yet


def as_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    return pixels if isinstance(pixels, np.ndarray) else to_uint8(pixels)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_block(writer: PyramidWriter, done: set, by: int, bx: int, out: np.ndarray, chunks, c: int) -> None:
    """Write a block's chunks that are not on disk yet (all at once when none is: zarr encodes
    them together and one progress record is written)."""
    if not any(ch in done for ch in chunks):
        writer.write_tile(by, bx, out)
        return
    for y, x in chunks:
        if (y, x) not in done:
            writer.write_tile(y, x, out[:, y - by : y - by + c, x - bx : x - bx + c])


def spread_writer(writer: PyramidWriter, handle: ModelHandle, config: StainConfig, provenance: dict,
                  origin) -> PyramidWriter | None:
    """The writer of the per-pixel spread store; None when a resumed run finds it already
    finished (the crash came between the two finalize() calls)."""
    path = spread_path(writer.path)
    names = getattr(handle, "channel_names", None)
    if output_kind(handle) == "rgb":
        channel_names, colors = ["spread"], ["FF00FF"]
    else:
        count = handle.out_channels
        channel_names = [f"{name} spread" for name in (names or [f"c{i}" for i in range(count)])]
        colors = ["FF00FF"] * count
    if config.resume and path.exists() and not path.with_name(path.name + ".partial").exists():
        return None
    return PyramidWriter(
        path, writer.shape[1:], len(channel_names), dtype="uint8", mpp=writer.mpp, chunk=writer.chunk,
        version=writer.version, kind="fluorescence", channel_names=channel_names, channel_colors=colors,
        provenance={**provenance, "statistic": f"per-pixel standard deviation over {config.samples} samples, x2, 0-255",
                    "spread_of": writer.path.name},
        resume=config.resume, overwrite=config.overwrite, origin=origin,
    )

