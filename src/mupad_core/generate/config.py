"""Engine settings and the one place their defaults are resolved (no torch: the plugin imports it).

`StainConfig.for_model(model, **overrides)` is how `mupad stain`, `mupad stain-batch`, `mupad
demo` and the napari widget turn "this model, and what the user set" into settings: a model
runs at the task, pixel size and window it was trained on (its `mupad_pipeline.json`) unless
told otherwise, with a quarter-window overlap and a one-window margin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


MAX_REGION_PIXELS = 4096 * 4096  # one generated region (ROI generation, translation): beyond it a CPU run takes hours


def check_region_size(height: int, width: int, what: str = "region", limit: int = MAX_REGION_PIXELS) -> None:
    """Refuse a region-generation job larger than `limit` pixels before any work (one line)."""
    if height * width > limit:
        raise ValueError(f"{what} is {width} x {height} px, more than the limit of {limit} px for one generated "
                         "region: choose a smaller one or a coarser pixel size")


def model_pipeline(spec: str) -> dict:
    """The `mupad_pipeline.json` of a bundled model id, a local checkpoint folder or a hub id
    already in the MUPAD cache; {} for `identity` and anything not found. It never downloads
    (the napari widget calls it on the main thread); the loader fetches and names any problem."""
    from ..hub import mupad_cache_dir
    from ..zoo import PIPELINE_FILE, bundled_models_dir

    if not spec or spec == "identity":
        return {}
    folder = bundled_models_dir() / spec
    if "/" in spec or not (folder / "config.json").is_file():
        folder = Path(spec).expanduser()
    if not folder.exists() and spec.count("/") == 1:  # a hub id: its cached snapshot, if any
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=spec, cache_dir=mupad_cache_dir() / "hub", local_files_only=True))
        except Exception:  # not cached (or no huggingface_hub): the loader will say
            return {}
    try:
        return json.loads((folder / PIPELINE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def model_defaults(spec: str) -> dict:
    """What a checkpoint records about how it runs: {"mpp": µm/px, "window_px": px, "steps": the
    sampling steps it was made for (a few-step student), "task": its first task}, where given.
    `identity` records nothing."""
    pipeline = model_pipeline(spec)
    defaults = {key: cast(pipeline[key]) for key, cast in (("mpp", float), ("window_px", int), ("steps", int))
                if pipeline.get(key)}
    if pipeline.get("tasks"):
        defaults["task"] = str(pipeline["tasks"][0])
    return defaults


@dataclass
class StainConfig:
    task: str = "identity"
    roi: tuple[int, int, int, int] | None = None  # level-0 px: x, y, w, h
    target_mpp: float | None = None  # default: the source's own pixel size
    steps: int = 20
    method: str = "euler"  # or "heun", "sde": any sampler of transport/samplers.py
    guidance: float = 0.0
    # "constant"; "annealed" (guidance -> 0 over the trajectory, the paper's 2.5 -> 0); or
    # "interval:LO:HI" (guidance only for progress in [LO, HI]). Where the weight is 0 the
    # unconditional pass is skipped, so annealing saves passes as well as changing samples.
    guidance_schedule: str = "constant"
    seed: int = 0
    window_px: int = 256
    overlap_px: int = 64
    fusion: str = "cosine"  # window weights: raised-cosine ramps, or "uniform" (plain MultiDiffusion average)
    block_px: int = 1024
    margin_px: int = 256  # >= one window: border positions see the same whole windows from both blocks
    chunk_px: int = 256
    batch_size: int = 8
    read_workers: int = 1  # threads reading one block's source (> 1 where cores are spare: GPU hosts)
    version: str = "0.4"
    skip_background: bool = True  # blocks without tissue are written as background, not generated
    # and, inside generated blocks, windows without tissue are steered to background without
    # a network pass (engine.Glass); needs skip_background
    skip_glass_windows: bool = True
    samples: int = 1  # > 1: the mean of that many samples (uncertainty.sample_seeds) plus a spread store
    strength: float = 1.0  # < 1 (he2he, ff2ffpe): start from the source noised to t = 1 - strength
    resume: bool = False
    overwrite: bool = False

    @classmethod
    def for_model(cls, model: str, **overrides) -> "StainConfig":
        """Settings for `model`: its own task, pixel size, window and step count unless `overrides`
        say otherwise (None means "not set"); overlap a quarter of the window, margin one window."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown engine setting(s): {', '.join(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        for name in ("window_px", "overlap_px", "margin_px", "block_px", "chunk_px", "steps", "samples"):
            value = given.get(name)
            smallest = 0 if name in ("overlap_px", "margin_px") else 1
            if value is not None and (not float(value).is_integer() or value < smallest):
                kind = "a non-negative" if smallest == 0 else "a positive"
                raise ValueError(f"{name}={value} must be {kind} whole number")
        defaults = model_defaults(model)
        window = int(given.get("window_px") or defaults.get("window_px") or cls.window_px)
        given.setdefault("task", defaults.get("task", "he2he"))
        given.setdefault("target_mpp", defaults.get("mpp"))
        if "steps" in defaults:
            given.setdefault("steps", defaults["steps"])
        given["window_px"] = window
        given.setdefault("overlap_px", window // 4)
        given.setdefault("margin_px", window)
        return cls(**given)
