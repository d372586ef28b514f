"""`mupad demo`: the bundled demo models stain the bundled real slide.

Every bundled model (`mupad models`) runs through the same whole-slide engine as
`mupad stain`, at the pixel size it was trained at, over a tissue-rich region of the
bundled CC0 slide CMU-1-Small-Region (the whole slide where that is small enough); a model
that learnt from Ki67 IHC brightfield (demo-he2mif) gets the bundled Ki67 IHC crop instead. Each
result is an OME-Zarr pyramid; `preview.png` shows source | result per model, and napari
opens with the slide and every result as overlay layers when a display is present.

The demo models are small and trained on a CPU from a few real tiles (see their model
cards): they show the tool working end to end, not a validated stain.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"
IHC_SAMPLE = "OS-2-Ki67-crop.ome.tif"


def sample_slide_path() -> Path:
    return Path(str(resources.files("mupad_core") / "data" / SAMPLE_SLIDE))


DEMO_STEPS = 12  # for models that record no step count of their own


@dataclass
class DemoConfig:
    steps: int | None = None  # None: each model's own count (a few-step student's), else DEMO_STEPS
    seed: int = 0
    max_output_px: int = 1024  # output side; larger slides are cropped to their most tissue-rich region
    window_px: int = 128  # for models that do not say which window they were trained on


def tissue_rich_roi(reader, side: int) -> tuple[int, int, int, int]:
    """The level-0 square of `side` px (clipped to the slide) holding the most tissue."""
    from scipy.ndimage import uniform_filter

    from .slide.tissue import tissue_mask

    mask, downsample = tissue_mask(reader)
    width0, height0 = reader.dimensions
    side = min(side, width0, height0)
    box = max(1, round(side / downsample))
    density = uniform_filter(mask.astype(np.float32), size=box, mode="constant")
    cy, cx = np.unravel_index(np.argmax(density), density.shape)
    x = int(np.clip(cx * downsample - side / 2, 0, width0 - side))
    y = int(np.clip(cy * downsample - side / 2, 0, height0 - side))
    return x, y, side, side


def run_demo(out_dir: Path, config: DemoConfig = DemoConfig(), log=print, models: list[str] | None = None) -> dict:
    from .models.checkpoint import read_pipeline
    from .slide.readers import open_slide
    from .zoo import bundled_models

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [e for e in bundled_models() if models is None or e.id in models]
    if not entries:
        raise RuntimeError("no bundled demo models in this installation (mupad_core/data/models is empty)")
    slide = sample_slide_path()
    results, rows = [], []
    with open_slide(slide) as reader:
        for entry in entries:
            pipeline = read_pipeline(entry.path)
            task = entry.tasks[0]
            if not pipeline.get("template"):  # generation from conditions, not a restain of the slide
                result, row = _generate(entry, pipeline, reader, out_dir, config, log)
                results.append(result)
                rows.append(row)
                continue
            stain = demo_stain_config(entry.id, task, config)
            if entry.id in IHC_INPUT_MODELS:
                path = ihc_sample_path()
                with open_slide(path) as ihc:
                    result, row = _stain(entry, task, ihc, path, stain, out_dir, config, log)
            else:
                result, row = _stain(entry, task, reader, slide, stain, out_dir, config, log)
            results.append(result)
            rows.append(row)
    preview = out_dir / "preview.png"
    _save_rows(rows, preview)
    summary = {"slide": str(slide), "results": results, "preview": str(preview),
               "note": "demo models on a real slide; generated images, not for diagnosis"}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {preview} (per model: source | result) and {out_dir / 'summary.json'}")
    return summary


# Bundled models that learnt from IHC brightfield, not H&E: the demo gives them an IHC image.
IHC_INPUT_MODELS = {"demo-he2mif"}


def ihc_sample_path() -> Path:
    """The bundled Ki67 IHC crop (OpenSlide test data OS-2, 0.227 µm/px, data/README.md): the
    stain demo-he2mif learnt from, so its row shows what the model does on its own kind of input."""
    return Path(str(resources.files("mupad_core") / "data" / IHC_SAMPLE))


def _stain(entry, task, reader, slide, stain, out_dir: Path, config: DemoConfig, log):
    """One restaining model over a tissue-rich region of `reader` at its own pixel size."""
    import zarr

    from .generate.engine import run_stain
    from .generate.handles import load_handle

    finest = min(reader.level_mpp(0))
    mpp = stain.target_mpp or finest
    side = round(config.max_output_px * mpp / finest)
    width0, height0 = reader.dimensions
    roi = (0, 0, width0, height0) if max(width0, height0) <= side else tissue_rich_roi(reader, side)
    log(f"{entry.id}: {task} over ROI {roi} of {Path(slide).name} at {mpp} µm/px, {stain.steps} steps")
    start = time.perf_counter()
    store = run_stain(reader, load_handle(entry.id, task), out_dir / f"{entry.id}.ome.zarr",
                      replace(stain, roi=roi, target_mpp=mpp), progress=None)
    seconds = time.perf_counter() - start
    group = zarr.open_group(str(store), mode="r")
    output = group["0"][:]
    attrs = group.attrs.asdict()
    source = _source_at(reader, roi, output.shape[1:])
    row = np.concatenate([source, render(output, attrs)], axis=1)
    log(f"  wrote {store} ({output.shape[2]} x {output.shape[1]} px, {seconds:.0f} s)")
    return ({"model": entry.id, "task": task, "source": str(slide), "roi_level0": list(roi), "mpp": mpp,
             "output": str(store), "shape": list(output.shape), "seconds": round(seconds, 1),
             "channels": [c.get("label") for c in attrs.get("omero", {}).get("channels", [])]}, row)


def demo_stain_config(model: str, task: str, config: DemoConfig = DemoConfig()):
    """The defaults every entry point shares (`StainConfig.for_model`); the demo's own window
    and step count only for a model that names none (a few-step student keeps its own)."""
    from .generate.config import StainConfig, model_pipeline

    pipeline = model_pipeline(model)
    window = None if pipeline.get("window_px") else config.window_px
    steps = config.steps if config.steps is not None else None if pipeline.get("steps") else DEMO_STEPS
    return StainConfig.for_model(model, task=task, steps=steps, seed=config.seed, overwrite=True, window_px=window)


# Captions of the kind demo-text2he was trained on (docs/training.md: MoNuSeg + GlaS captions).
DEMO_PROMPTS = ("H&E FFPE section of colon adenocarcinoma, malignant glands, moderately differentiated",
                "H&E FFPE section of breast invasive carcinoma")


def _generate(entry, pipeline, reader, out_dir: Path, config: DemoConfig, log):
    """A generation model draws two regions beside the slide's own tissue at the same pixel
    size: one per demo prompt (text models), or two variations of that tissue (reference-image
    models)."""
    import torch

    from .generate.roi import load_generator
    from .store import PyramidWriter

    generator = load_generator(entry.id)
    steps = config.steps or int(pipeline.get("steps") or DEMO_STEPS)
    mpp = float(pipeline.get("mpp") or reader.level_mpp(0)[0])
    side = 256
    start = time.perf_counter()
    roi = tissue_rich_roi(reader, round(side * mpp / reader.level_mpp(0)[0]))
    real = _source_at(reader, roi, (side, side))
    if "text" in generator.modalities:
        asks = [(f"prompt {prompt!r}", {"prompt": prompt}, generator.conditions(text=prompt)) for prompt in DEMO_PROMPTS]
    elif "image" in generator.modalities:
        reference = generator.conditions(image=real)
        asks = [(f"variation {k} of the slide region {roi}", {"reference_roi_level0": list(roi)}, reference)
                for k in range(len(DEMO_PROMPTS))]
    else:
        asks = [(f"unconditional sample {k}", {}, None) for k in range(len(DEMO_PROMPTS))]
    panels, outputs = [], []
    for k, (what, record, conditions) in enumerate(asks):
        pixels = generator.generate(side, side, conditions, steps=steps, seed=config.seed + k)
        image = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        path = out_dir / f"{entry.id}-{k}.ome.zarr"
        writer = PyramidWriter(path, image.shape[1:], 3, mpp=(mpp, mpp), overwrite=True, provenance={
            "model_id": entry.id, "task": entry.tasks[0], **record, "seed": config.seed + k,
            "steps": steps})
        writer.write_tile(0, 0, image)
        outputs.append(str(writer.finalize()))
        panels.append(image.transpose(1, 2, 0))
        log(f"{entry.id}: generated {side} x {side} px, {what}")
    seconds = time.perf_counter() - start
    result = {"model": entry.id, "task": entry.tasks[0], "asked": [what for what, _, _ in asks], "mpp": mpp,
              "output": outputs[0], "outputs": outputs, "shape": [3, side, side], "seconds": round(seconds, 1),
              "channels": ["R", "G", "B"]}
    return result, np.concatenate([real, *panels], axis=1)


def _source_at(reader, roi, shape_yx) -> np.ndarray:
    """The ROI's source pixels at the output's size, for the preview."""
    from PIL import Image

    region = Image.fromarray(reader.read_region(0, *roi)[..., :3])
    return np.asarray(region.resize((shape_yx[1], shape_yx[0]), Image.BILINEAR))


def render(output: np.ndarray, attrs: dict) -> np.ndarray:
    """(C, H, W) uint8 result as RGB: brightfield as is; markers added in their colours,
    each stretched to its 99.5th percentile (display only; the store keeps raw values)."""
    if attrs.get("mupad", {}).get("kind") == "rgb":
        return output.transpose(1, 2, 0)
    channels = attrs.get("omero", {}).get("channels", [])
    rgb = np.zeros((*output.shape[1:], 3), np.float32)
    for index, plane in enumerate(output):
        colour = channels[index].get("color", "FFFFFF") if index < len(channels) else "FFFFFF"
        weights = np.array([int(colour[k : k + 2], 16) / 255 for k in (0, 2, 4)], np.float32)
        top = max(float(np.percentile(plane, 99.5)), 1.0)
        rgb += np.clip(plane / top, 0, 1)[..., None] * weights
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _save_rows(rows: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    width = max(r.shape[1] for r in rows)
    height = 256
    scaled = []
    for row in rows:  # every row 256 px high, side by side panels kept in proportion
        image = Image.fromarray(row)
        scaled.append(np.asarray(image.resize((max(1, round(row.shape[1] * height / row.shape[0])), height),
                                              Image.BILINEAR)))
    width = max(r.shape[1] for r in scaled)
    canvas = np.full((height * len(scaled), width, 3), 255, np.uint8)
    for i, row in enumerate(scaled):
        canvas[i * height : (i + 1) * height, : row.shape[1]] = row
    Image.fromarray(canvas).save(path)


def show_in_napari(summary: dict) -> None:
    """Open the slide and the results as layers (blocks until the window closes)."""
    import napari

    viewer = napari.Viewer(title="MUPAD demo")
    viewer.open(summary["slide"], plugin="napari-mupad")
    for result in summary["results"]:
        for output in result.get("outputs", [result["output"]]):
            for layer in viewer.open(output, plugin="napari-mupad"):
                layer.name = f"{result['model']}: {layer.name}"
                layer.opacity = 0.8
    napari.run()


def display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
