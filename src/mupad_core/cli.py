"""The `mupad` command line: thin over the library.

Errors a user can fix (bad file, bad checkpoint, offline hub) end the command with one
line naming the file and the problem and a non-zero exit status, never a traceback
(set MUPAD_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .generate.config import MAX_REGION_PIXELS
from .tasks import SLIDE_TASKS


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, display_available, run_demo, show_in_napari

    summary = run_demo(Path(args.out), DemoConfig(steps=args.steps, seed=args.seed, max_output_px=args.max_output_px))
    if not args.no_gui:
        if display_available():
            show_in_napari(summary)
        else:
            print("no display: skipping napari (results are in the output folder; --no-gui silences this)")
    return 0


def _cmd_info(args) -> int:
    import json

    from .slide.readers import open_slide

    with open_slide(args.slide, mpp=args.mpp, require_mpp=False) as reader:
        info = {
            "path": str(reader.path),
            "backend": reader.backend,
            "vendor": reader.vendor,
            "kind": reader.kind,
            "dimensions": list(reader.dimensions),
            "levels": [list(level.shape) for level in reader.levels],
            "level_downsamples": [round(float(d), 4) for d in reader.level_downsamples],
            "mpp": list(reader.mpp) if reader.mpp else None,
            "objective_power": reader.objective_power,
            "channels": reader.channel_names,
            "dtype": str(reader.dtype),
            "associated_images": sorted(reader.associated_images),
        }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {value}")
        if info["mpp"] is None:
            print("      pixel size: none in the file; pass --mpp to stain it")
    return 0


def _cmd_train(args) -> int:
    from .train.config import load_config
    from .train.run import train

    config = load_config(args.config)
    if args.out_dir:
        config.out_dir = str(Path(args.out_dir).resolve())
    if args.steps:
        config.train.steps = args.steps
    result = train(config, resume=args.resume, stop_after=args.stop_after, progress_bar=not args.quiet)
    if result.model_dir is None and os.environ.get("RANK", "0") == "0":
        print(f"stopped at step {result.steps}; continue with: mupad train {args.config} --resume")
    return 0


def _cmd_models(args) -> int:
    import json

    from .zoo import list_models

    entries = list_models()
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print("no bundled or cached MUPAD models; train one with `mupad train CONFIG.yaml`, "
              "or pass --model a folder or hub id")
        return 0
    print(f"{'id':<28} {'source':<8} {'tasks':<18} {'conditions':<16} {'MB':>6}")
    for e in entries:
        print(f"{e.id:<28} {e.source:<8} {','.join(e.tasks):<18} {','.join(e.conditions) or '-':<16} {e.size_mb:>6.1f}")
    print("plus: identity (returns its input; any task, for checks and benchmarks)")
    return 0


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this torch build sees no CUDA device")
    return name


def _cmd_stain(args) -> int:
    from tqdm import tqdm

    from .generate.engine import run_stain
    from .generate.handles import load_handle
    from .slide.readers import open_slide

    _resolve_task(args)
    device = _resolve_device(args.device)
    handle = load_handle(args.model, args.task, device=device)
    tiff = _writes_ome_tiff(args)
    store = _tiff_work_store(args.out) if tiff else Path(args.out)
    if tiff and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    config = _stain_config(args, roi=tuple(args.roi) if args.roi else None, target_mpp=args.target_mpp)
    if config.target_mpp and not args.target_mpp and not args.quiet:
        print(f"mupad: output at the model's own {config.target_mpp:g} µm/px (--target-mpp to change)",
              file=sys.stderr)
    with open_slide(args.slide, mpp=args.mpp) as reader:
        regions = None
        if args.regions:
            from .slide.regions import read_regions

            regions = read_regions(args.regions, reader.dimensions)
        bar = tqdm(total=None, unit="block", desc=f"{args.task} {reader.path.name}", disable=args.quiet)

        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            if tiff and config.resume and store.exists():
                out = store  # stained before; the export was interrupted
            else:
                out = run_stain(reader, handle, store, config, progress=progress, regions=regions)
            bar.close()
            stores = [out]
            if config.samples > 1:
                from .store import spread_path

                stores.append(spread_path(out))
            results = [_export_tiff(path, args.overwrite, args.quiet) if tiff else path for path in stores]
        except KeyboardInterrupt:
            bar.close()
            print(f"mupad: interrupted; finished chunks are kept — rerun with --resume to continue {args.out}",
                  file=sys.stderr)
            return 130
    for path in results:
        print(path)
    return 0


def _writes_ome_tiff(args) -> bool:
    """--format ome-tiff, or no --format and an output named .ome.tif(f)."""
    from .store.ometiff import is_ome_tiff_path

    fmt = args.format or ("ome-tiff" if is_ome_tiff_path(args.out) else "ome-zarr")
    if fmt == "ome-tiff" and not is_ome_tiff_path(args.out):
        raise ValueError(f"--format ome-tiff: the output {args.out} must end in .ome.tif or .ome.tiff")
    if fmt != "ome-tiff" and is_ome_tiff_path(args.out):
        raise ValueError(f"--format {fmt}: the output {args.out} is named like an OME-TIFF")
    return fmt == "ome-tiff"


def _ngff_version(args) -> str:
    """--ngff-version, or the older spelling --format 0.4 / 0.5."""
    return args.format if args.format in ("0.4", "0.5") else args.ngff_version


def _tiff_work_store(out: str) -> Path:
    """Where an OME-TIFF run stains first: an OME-Zarr beside it that resumes like any run,
    converted when finished and then removed."""
    return Path(out).with_name(Path(out).name + ".work.ome.zarr")


def _export_tiff(store: Path, overwrite: bool, quiet: bool) -> Path:
    import shutil

    from .slide.readers import open_slide
    from .store.ometiff import export_ome_tiff

    name = store.name.removesuffix(".work.ome.zarr")
    if name == store.name:  # a spread store: NAME.ome.tif.work.spread.ome.zarr
        name = store.name.replace(".work.spread.ome.zarr", "").removesuffix(".ome.tif").removesuffix(".ome.tiff")
        name += ".spread.ome.tif"
    out = store.with_name(name)
    with open_slide(store, require_mpp=False) as reader:
        export_ome_tiff(reader, out, overwrite=overwrite, progress=None if quiet else _tile_bar(out))
    shutil.rmtree(store)
    return out


def _tile_bar(out: Path):
    from tqdm import tqdm

    bar = tqdm(total=None, unit="tile", desc=f"OME-TIFF {out.name}")

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
        if done == total:
            bar.close()

    return progress


def _cmd_export(args) -> int:
    from .slide.readers import open_slide
    from .store.ometiff import export_ome_tiff

    with open_slide(args.store, mpp=args.mpp, require_mpp=False) as reader:
        out = export_ome_tiff(reader, args.out, tile=args.tile, compression=args.compression,
                              overwrite=args.overwrite, progress=None if args.quiet else _tile_bar(Path(args.out)))
    print(out)
    return 0


def _cmd_stain_batch(args) -> int:
    from .generate.batch import stain_batch

    _resolve_task(args)
    if args.format == "ome-tiff":
        raise ValueError("stain-batch writes OME-Zarr stores; convert the ones you need with "
                         "`mupad export STORE.ome.zarr OUT.ome.tif`")
    config = _stain_config(args)
    total = len(args.slides)

    def report(result):
        report.done += 1
        status = result.output if result.error is None else f"FAILED: {result.error}"
        print(f"[{report.done}/{total}] {result.slide} -> {status}", flush=True)

    report.done = 0
    results = stain_batch(args.slides, args.out_dir, args.model, config, mpp=args.mpp,
                          scheduler=args.scheduler, device=args.device, on_result=report)
    failed = [r for r in results if r.error]
    print(f"{total - len(failed)} of {total} slides done" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _progress_bar(total_desc: str, quiet: bool):
    from tqdm import tqdm

    bar = tqdm(total=None, unit="img", desc=total_desc, disable=quiet)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, progress


def _cmd_augment(args) -> int:
    from .generate.synthetic import AugmentSettings, augment

    settings = AugmentSettings(model=args.model, variations=args.n, steps=args.steps, guidance=args.guidance,
                               seed=args.seed, keep_originals=not args.no_originals)
    bar, progress = _progress_bar(f"augment {Path(args.input).name}", args.quiet)
    out = augment(args.input, args.out, settings, device=_resolve_device(args.device), progress=progress)
    bar.close()
    print(out / "manifest.csv")
    return 0


def _cmd_synth_pairs(args) -> int:
    from .generate.synthetic import PairSettings, read_captions, synth_pairs

    captions = read_captions(args.captions)
    settings = PairSettings(model=args.model, per_caption=args.n, size_px=args.size, steps=args.steps,
                            guidance=args.guidance, seed=args.seed, shard_size=args.shard_size)
    bar, progress = _progress_bar("synth-pairs", args.quiet)
    out = synth_pairs(captions, args.out, settings, device=_resolve_device(args.device), progress=progress)
    bar.close()
    print(out / "pairs.csv")
    return 0


def _cmd_generate(args) -> int:
    import numpy as np

    from .generate.config import check_region_size
    from .generate.engine import output_origin
    from .generate.roi import condition_from, generate_to_omezarr, load_generator
    from .models.checkpoint import read_pipeline
    from .zoo import resolve_model

    given = [kind for kind in ("text", "rna", "reference") if getattr(args, kind)]
    if len(given) > 1:
        raise ValueError(f"give one condition, not {' and '.join('--' + g for g in given)}")
    gen = load_generator(args.model, device=_resolve_device(args.device))
    model_mpp = read_pipeline(resolve_model(args.model)).get("mpp")
    if args.text:
        conditions, record = condition_from(gen, "text", args.text)
    elif args.rna:
        conditions, record = condition_from(gen, "rna", (args.rna, args.sample))
    elif args.reference:
        from PIL import Image

        with Image.open(args.reference) as image:
            reference = np.asarray(image.convert("RGB"))
        conditions, record = condition_from(gen, "image", reference)
        record["reference"] = str(args.reference)
    else:
        conditions, record = condition_from(gen, "none", None)
    origin, source = None, None
    if args.slide:
        from .slide.readers import open_slide

        if not args.roi:
            raise ValueError("--slide needs --roi X Y W H: the region to generate into")
        with open_slide(args.slide, mpp=args.slide_mpp) as reader:
            src_mpp = reader.level_mpp(0)
            mpp = args.mpp or model_mpp or min(src_mpp)
            x, y, w, h = args.roi
            height, width = max(1, round(h * src_mpp[1] / mpp)), max(1, round(w * src_mpp[0] / mpp))
            origin = output_origin(reader, tuple(args.roi), src_mpp, mpp)
            source = {"path": str(reader.path), "mpp": list(src_mpp), "roi_level0": list(args.roi)}
    else:
        mpp = args.mpp or model_mpp
        height, width = args.size
    check_region_size(height, width, "the region to generate", args.max_pixels)
    bar, progress = _progress_bar("generate", args.quiet)
    written = generate_to_omezarr(gen, args.out, height, width, conditions, record, mpp=mpp, origin=origin,
                                  samples=args.samples, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                  overwrite=args.overwrite, progress=progress, source=source)
    bar.close()
    for path in written:
        print(path)
    return 0


def _cmd_translate(args) -> int:
    from .generate.engine import output_origin
    from .generate.config import check_region_size
    from .generate.roi import load_generator
    from .generate.translate import TranslateSettings, translate_region
    from .slide.readers import open_slide
    from .store import PyramidWriter

    settings = TranslateSettings(source_prompt=args.source_prompt, target_prompt=args.target_prompt, steps=args.steps,
                                 guidance=args.guidance, inject_steps=args.inject_steps, inject=args.inject)
    settings.check()
    gen = load_generator(args.model, device=_resolve_device(args.device))
    with open_slide(args.image, mpp=args.mpp, require_mpp=False) as reader:
        width0, height0 = reader.dimensions
        roi = tuple(args.roi) if args.roi else (0, 0, width0, height0)
        x, y, w, h = roi
        check_region_size(h, w, f"{reader.path.name}: --roi", args.max_pixels)
        pixels = reader.read_region(0, x, y, w, h)
        mpp = reader.level_mpp(0) if reader.mpp is not None else None
        origin = output_origin(reader, roi, mpp, mpp[0]) if mpp is not None else None
        source = {"path": str(reader.path), "roi_level0": list(roi)}
    bar, progress = _progress_bar("translate", args.quiet)
    result = translate_region(gen, pixels, settings, progress=progress)
    bar.close()
    provenance = {"model_id": gen.model_id, "weights_hash": gen.weights_hash, "task": args.task,
                  "translate": {k: v for k, v in vars(settings).items()}, "source": source,
                  "network_passes": result.network_passes}
    writer = PyramidWriter(args.out, (h, w), 3, mpp=mpp, provenance=provenance, overwrite=args.overwrite,
                           origin=origin)
    writer.write_tile(0, 0, (result.pixels.clamp(0, 1) * 255).round().byte().numpy())
    print(writer.finalize())
    return 0


def _cmd_eval(args) -> int:
    from .evaluate.report import evaluate_sets, load_set, write_report

    def named(spec: str):
        name, _, path = spec.rpartition("=")
        return load_set(path, name or None, tile=args.tile, max_tiles=args.max_tiles)

    prediction = load_set(args.pred, args.pred_name, tile=args.tile, max_tiles=args.max_tiles)
    reference = load_set(args.ref, args.ref_name, tile=args.tile, max_tiles=args.max_tiles)
    baselines = [named(spec) for spec in args.baseline or []]
    labels = load_set(args.labels, "labels", tile=args.tile, max_tiles=args.max_tiles) if args.labels else None
    captions = None
    if args.captions or args.text_image_encoder:
        if not (args.captions and args.text_image_encoder):
            raise ValueError("text-image alignment needs both --captions CSV and --text-image-encoder MODEL")
        from .evaluate.report import read_captions_table

        captions = read_captions_table(args.captions)
    results = evaluate_sets(prediction, reference, baselines, features=args.features, resamples=args.resamples,
                            seed=args.seed, device=_resolve_device(args.device), ihc=args.ihc, cells=args.cells,
                            labels=labels, marker_channel=args.marker_channel, mpp=args.mpp,
                            captions=captions, text_image_encoder=args.text_image_encoder)
    report = write_report(results, args.out, prediction, reference, baselines)
    for entry in results["sets"]:
        fid_, kid_ = entry["fid"], entry["kid"]
        print(f"{entry['name']}: FID {fid_['value']:.2f} [{fid_['low']:.2f}, {fid_['high']:.2f}]  "
              f"KID {kid_['value']:.4f} [{kid_['low']:.4f}, {kid_['high']:.4f}]")
    print(report)
    return 0


def _cmd_version(args) -> int:
    import torch

    print(f"napari-mupad {__version__} (torch {torch.__version__}, cuda {'yes' if torch.cuda.is_available() else 'no'})")
    return 0


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by `stain` and `stain-batch`: what runs, how it samples, how it writes."""
    parser.add_argument("--task", default=None, help="one of " + ", ".join(SLIDE_TASKS) + " (default: the "
                        "model's own, else he2he; he2ihc:MARKER with --marker)")
    parser.add_argument("--marker", help="IHC marker (ki67, er, pr, her2, ...): runs task he2ihc:MARKER, which the "
                                         "model must be trained for")
    parser.add_argument("--model", default="identity",
                        help="checkpoint folder, hub id, or 'identity' (returns the input; for checks)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps, one network pass each with euler (default: the model's own, "
                             "recorded in its mupad_pipeline.json, else 20)")
    parser.add_argument("--sampler", choices=("euler", "heun", "sde"), default="euler",
                        help="euler (default), heun (2 passes a step, more accurate at few steps) or sde")
    parser.add_argument("--guidance", type=float, default=0.0,
                        help="classifier-free guidance weight (models with an image stream; default 0)")
    parser.add_argument("--guidance-schedule", default="constant",
                        help="constant, annealed (weight -> 0 over the trajectory: the paper's) or interval:LO:HI; "
                             "the unconditional pass is skipped where the weight is 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per network pass")
    parser.add_argument("--window-px", type=int,
                        help="window size in output pixels (default: the model's own, else 256)")
    parser.add_argument("--overlap-px", type=int, help="window overlap (default: a quarter of the window)")
    parser.add_argument("--block-px", type=int, default=1024,
                        help="output pixels per block: the unit of streaming and resume (default 1024)")
    parser.add_argument("--read-workers", type=int, default=None,
                        help="threads reading each block of the slide (default: 1 on CPU, where the cores run "
                             "the model; up to 8 on a GPU host); pixels do not depend on it")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="average K samples (K noise seeds) and write their per-pixel spread to "
                             "NAME.spread.ome.zarr beside the result: where the model is unsure (default 1)")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="he2he/ff2ffpe: how far from the source to start, 1 = from noise (default), "
                             "smaller keeps more of the source's architecture")
    parser.add_argument("--sample-glass", action="store_true",
                        help="sample windows without tissue inside tissue blocks like the rest, instead of steering "
                             "them to plain background without a network pass (the default; also resumes a store "
                             "started before 0.1.0.dev1, which sampled them)")
    parser.add_argument("--format", choices=("ome-zarr", "ome-tiff", "0.4", "0.5"),
                        help="ome-zarr, or ome-tiff: a pyramidal OME-TIFF that QuPath opens as an overlay "
                             "(default: from the output's extension, .ome.tif(f) or .ome.zarr)")
    parser.add_argument("--ngff-version", choices=("0.4", "0.5"), default="0.4",
                        help="OME-Zarr (NGFF) version (default 0.4: more readers understand it)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its finished chunks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _resolve_task(args) -> None:
    """--marker M is --task he2ihc:M; a task of another family with a marker is a mistake.
    Without either, the task is the model's own (the first it was trained for)."""
    from .generate.config import model_defaults
    from .tasks import task_family

    if args.marker is None:
        args.task = args.task or model_defaults(args.model).get("task") or "he2he"
        return
    marker = args.marker.strip().lower()
    if not marker or ":" in marker:
        raise ValueError(f"--marker {args.marker!r}: give one marker name, e.g. ki67")
    task = args.task or "he2ihc"
    if task_family(task) != "he2ihc" or (":" in task and task.split(":", 1)[1] != marker):
        raise ValueError(f"--marker {marker} picks the he2ihc task's marker; it cannot go with --task {task}")
    args.task = f"he2ihc:{marker}"


def _stain_config(args, target_mpp: float | None = None, **extra):
    """The engine settings: `StainConfig.for_model`, the defaults every entry point shares."""
    from .generate.config import StainConfig

    read_workers = args.read_workers or (_spare_cores() if _resolve_device(args.device) == "cuda" else 1)
    return StainConfig.for_model(
        args.model, task=args.task, steps=args.steps, method=args.sampler, guidance=args.guidance,
        guidance_schedule=args.guidance_schedule, seed=args.seed, batch_size=args.batch_size, version=_ngff_version(args),
        resume=args.resume, overwrite=args.overwrite, window_px=args.window_px, overlap_px=args.overlap_px,
        block_px=args.block_px, samples=args.samples, strength=args.strength, target_mpp=target_mpp,
        read_workers=read_workers, skip_glass_windows=not args.sample_glass, **extra,
    )


def _spare_cores() -> int:
    """Reader threads for a GPU run: half the cores this process may use, 1 to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(8, cores // 2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mupad", description="MUPAD multimodal pathology diffusion")
    parser.add_argument("--version", action="version", version=f"napari-mupad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="stain the bundled slide with the bundled demo models; open napari")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--steps", type=int, default=None,
                      help="sampler steps (default: each model's own count where it records one, else 12)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-output-px", type=int, default=1024,
                      help="longest side of each result; larger regions are cropped to the most tissue (default 1024)")
    demo.add_argument("--no-gui", action="store_true", help="do not open napari")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="what a slide holds: levels, pixel size, channels, vendor")
    info.add_argument("slide")
    info.add_argument("--mpp", type=float, help="pixel size (µm/px) when the file has none")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    stain = sub.add_parser("stain", help="run a task over a slide or ROI into an OME-Zarr or OME-TIFF pyramid")
    stain.add_argument("slide")
    stain.add_argument("-o", "--out", required=True, help="output .ome.zarr (or .ome.tif for QuPath) path")
    where = stain.add_mutually_exclusive_group()
    where.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="level-0 pixels")
    where.add_argument("--regions", metavar="GEOJSON", help="stain only these regions (QuPath's GeoJSON export: "
                       "Polygons/MultiPolygons in level-0 px); pixels outside them stay background")
    stain.add_argument("--mpp", type=float, help="source pixel size (µm/px) when the file has none")
    stain.add_argument("--target-mpp", type=float, help="output pixel size (default: the model's own when it records one, else the source's)")
    _add_run_args(stain)
    stain.add_argument("--quiet", action="store_true", help="no progress bar")
    stain.set_defaults(func=_cmd_stain)

    batch = sub.add_parser("stain-batch", help="run a task over many slides on a dask.distributed cluster")
    batch.add_argument("slides", nargs="+")
    batch.add_argument("--out-dir", required=True)
    batch.add_argument("--scheduler", help="dask scheduler address (default: a LocalCluster here)")
    batch.add_argument("--mpp", type=float, help="pixel size for slides whose files have none")
    _add_run_args(batch)
    batch.set_defaults(func=_cmd_stain_batch)

    train = sub.add_parser("train", help="train a MUPAD model from a YAML config (CPU, GPU, or torchrun for many)")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    train.add_argument("--out-dir", help="override the config's out_dir")
    train.add_argument("--steps", type=int, help="override train.steps")
    train.add_argument("--stop-after", type=int, help="stop cleanly after this many steps in total (resumable)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    gen = sub.add_parser("generate", help="generate tissue into a region from text, an RNA profile or a reference "
                                          "image (text2he, rna2he, he2he variations) into an OME-Zarr")
    gen.add_argument("-o", "--out", required=True, help="output .ome.zarr path")
    gen.add_argument("--model", default="demo-text2he", help="generation model: bundled id, folder or hub id")
    gen.add_argument("--text", help="caption, e.g. 'H&E dense tumour with high nuclear density'")
    gen.add_argument("--rna", help="expression table (CSV/TSV/.h5ad) scored on the 331 pathways")
    gen.add_argument("--sample", help="sample or spot id in the --rna table (its only sample when omitted)")
    gen.add_argument("--reference", help="reference image (PNG/JPEG/TIFF) for variations")
    gen.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(256, 256),
                     help="output size in pixels without --slide (default 256 256)")
    gen.add_argument("--slide", help="place the result on this slide: --roi is then in its level-0 pixels")
    gen.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"))
    gen.add_argument("--slide-mpp", type=float, help="the slide's pixel size when its file has none")
    gen.add_argument("--mpp", type=float, help="output µm/px (default: the model's, else the slide's)")
    gen.add_argument("--samples", type=int, default=1, metavar="K",
                     help="average K samples and write their spread to NAME.spread.ome.zarr (default 1)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    gen.add_argument("--max-pixels", type=int, default=MAX_REGION_PIXELS, help="refuse larger regions (default 4096²)")
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    tr = sub.add_parser("translate", help="translate a region to another domain by inversion + self-attention "
                                          "injection (ff2ffpe: fresh frozen -> FFPE) into an OME-Zarr")
    tr.add_argument("image", help="slide or image file")
    tr.add_argument("-o", "--out", required=True, help="output .ome.zarr path")
    tr.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="level-0 pixels (default: all)")
    tr.add_argument("--model", required=True, help="text-conditioned model trained on both domains")
    tr.add_argument("--task", default="ff2ffpe", help="recorded in the provenance (default ff2ffpe)")
    tr.add_argument("--source-prompt", default="fresh frozen")
    tr.add_argument("--target-prompt", default="ffpe image")
    tr.add_argument("--inject-steps", type=float, default=0.6,
                    help="fraction of the steps (from the noise end) with self-attention injection: "
                         "higher keeps more of the section's structure (default 0.6)")
    tr.add_argument("--inject", choices=("maps", "features"), default="maps",
                    help="inject the reconstruction's attention maps (the paper) or its attention outputs")
    tr.add_argument("--mpp", type=float, help="pixel size (µm/px) when the file has none")
    tr.add_argument("--max-pixels", type=int, default=MAX_REGION_PIXELS, help="refuse larger regions (default 4096²)")
    tr.add_argument("--overwrite", action="store_true")
    _add_sampling_args(tr)
    tr.set_defaults(func=_cmd_translate, steps=50)

    ev = sub.add_parser("eval", help="generated images against references (and baselines): FID/KID with 95%% "
                                     "intervals, paired PSNR/SSIM/PCC; JSON + Markdown report with plots")
    ev.add_argument("--pred", required=True, help="predictions: folder of images, OME-Zarr or slide")
    ev.add_argument("--ref", required=True, help="references: folder of images, OME-Zarr or slide")
    ev.add_argument("--baseline", action="append", metavar="NAME=PATH", help="a baseline's outputs (repeatable)")
    ev.add_argument("--pred-name", help="name in the report (default: the folder name)")
    ev.add_argument("--ref-name", help="name in the report (default: the folder name)")
    ev.add_argument("-o", "--out", required=True, help="report folder: report.md, report.json, plots")
    ev.add_argument("--features", default="inception",
                    help="embedding: inception (FID's InceptionV3, default) or an image encoder (UNI, folder, hub id)")
    ev.add_argument("--tile", type=int, default=256, help="tile size for stores and slides (default 256)")
    ev.add_argument("--max-tiles", type=int, default=2000)
    ev.add_argument("--resamples", type=int, default=200, help="subsampling draws for the intervals")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev.add_argument("--ihc", action="store_true", help="DAB H-score of every set over the nuclei found")
    ev.add_argument("--labels", help="cell label masks named like the tiles (DeepLIIF colours: red positive, "
                                     "blue negative): per-cell AUC of the stain")
    ev.add_argument("--marker-channel", type=int, help="score this channel's mean per cell instead of DAB (mIF)")
    ev.add_argument("--cells", action="store_true", help="cell-composition distance of every set to the reference")
    ev.add_argument("--mpp", type=float, help="µm per pixel of the tiles (nucleus sizes in µm²)")
    ev.add_argument("--captions", help="CSV of name,caption for the images (e.g. mupad synth-pairs' pairs.csv)")
    ev.add_argument("--text-image-encoder", help="text-image dual encoder (CLIP-style; folder or hub id) for the "
                                                 "alignment of images with their captions")
    ev.set_defaults(func=_cmd_eval)

    aug = sub.add_parser("augment", help="N generated variations per image of a class-folder data set, "
                                         "into a new class-folder data set (few-shot training)")
    aug.add_argument("input", help="class-folder data set: INPUT/<class>/<image>")
    aug.add_argument("-o", "--out", required=True, help="new folder for the enlarged data set")
    aug.add_argument("-n", type=int, default=4, help="variations per image (default 4)")
    aug.add_argument("--model", default="demo-he2he", help="reference-image model: bundled id, folder or hub id")
    aug.add_argument("--no-originals", action="store_true", help="write only the variations")
    _add_sampling_args(aug)
    aug.set_defaults(func=_cmd_augment)

    pairs = sub.add_parser("synth-pairs", help="generated image-caption pairs for CLIP fine-tuning")
    pairs.add_argument("captions", help="text file (one caption per line) or CSV/TSV with a 'caption' column")
    pairs.add_argument("-o", "--out", required=True, help="new folder: images/ + pairs.csv (+ shards)")
    pairs.add_argument("-n", type=int, default=4, help="images per caption (default 4)")
    pairs.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    pairs.add_argument("--shard-size", type=int, default=0,
                       help="also write WebDataset tar shards of this many pairs (<key>.png + <key>.txt)")
    pairs.add_argument("--model", default="demo-text2he", help="text-conditioned model: bundled id, folder or hub id")
    _add_sampling_args(pairs)
    pairs.set_defaults(func=_cmd_synth_pairs)

    export = sub.add_parser("export", help="an OME-Zarr result (or any slide we read) as a pyramidal OME-TIFF "
                            "for QuPath and other viewers")
    export.add_argument("store", help="the .ome.zarr (or any slide file) to convert")
    export.add_argument("out", help="output .ome.tif / .ome.tiff")
    export.add_argument("--compression", choices=("zlib", "jpeg", "lzw", "zstd", "none"), default="zlib",
                        help="tile compression (default zlib: lossless; jpeg for smaller RGB files)")
    export.add_argument("--tile", type=int, default=512, help="tile side in pixels, a multiple of 16 (default 512)")
    export.add_argument("--mpp", type=float, help="pixel size (µm/px) when the source has none")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(func=_cmd_export)

    models = sub.add_parser("models", help="the bundled and cached models, with the tasks each supports")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=_cmd_models)

    version = sub.add_parser("version", help="versions of napari-mupad, torch and CUDA availability")
    version.set_defaults(func=_cmd_version)
    return parser


def _quiet_libraries() -> None:
    """--quiet also silences the Hugging Face libraries' own bars ("Loading weights …")."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is first imported
    if "transformers" in sys.modules:  # already imported (a caller's process): switch it off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        _quiet_libraries()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mupad: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback only on request
        if os.environ.get("MUPAD_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"mupad: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
