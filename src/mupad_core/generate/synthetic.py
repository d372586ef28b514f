"""Synthetic training data: variations of a few-shot class-folder set, and image-caption pairs.

The paper uses MUPAD to enlarge small labelled sets (few-shot classification) and to make
image-text pairs for CLIP fine-tuning. Both write plain folders other tools read directly:

- ``augment``: ``IN/<class>/*.png`` -> ``OUT/<class>/<stem>.png`` (the originals, unless left
  out) and ``OUT/<class>/<stem>-var<k>.png``, N per image, each generated from the image as
  reference (its image-stream tokens) with a new noise seed; plus ``OUT/manifest.csv``
  (source, class, caption = class, split, generated, reference, seed: a `mupad train`
  manifest) and
  ``OUT/mupad_synthetic.json`` with the model, settings and counts.
- ``synth-pairs``: captions -> ``OUT/images/<key>.png`` and ``OUT/pairs.csv`` (image, caption,
  seed), or WebDataset shards ``OUT/shard-000000.tar`` holding ``<key>.png`` + ``<key>.txt``.

Every image is written then renamed, and the settings are recorded first: an interrupted run
rerun with the same settings skips what exists and finishes; other settings are refused. The
manifest (or pairs table) is written last, so a folder with one is complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import __version__
from .uncertainty import sample_seeds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SETTINGS_FILE = "mupad_synthetic.json"
ProgressCallback = Callable[[int, int], None]


class SyntheticDataError(ValueError):
    """Bad input folder, settings that differ from an unfinished run's, or a model that cannot do it."""


@dataclass(frozen=True)
class AugmentSettings:
    model: str
    variations: int = 4
    steps: int = 20
    guidance: float = 0.0
    seed: int = 0
    keep_originals: bool = True


def find_class_images(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} of a class-folder data set (one sub-folder per class)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SyntheticDataError(f"{folder}: not a folder")
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            classes[sub.name] = images
    if not classes:
        raise SyntheticDataError(
            f"{folder}: no class folders with images (expected {folder}/<class>/<image>.png, "
            f"image types {', '.join(IMAGE_SUFFIXES)})"
        )
    return classes


def augment(in_dir: str | Path, out_dir: str | Path, settings: AugmentSettings, *, device: str = "cpu",
            progress: ProgressCallback | None = None) -> Path:
    """Write `settings.variations` generated variations of every image into a new class-folder set."""
    from .roi import load_generator

    if settings.variations < 1:
        raise SyntheticDataError(f"variations must be at least 1, got {settings.variations}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    classes = find_class_images(in_dir)
    if out_dir.resolve() == in_dir.resolve() or in_dir.resolve() in out_dir.resolve().parents:
        raise SyntheticDataError(f"{out_dir}: the output must not be inside the input {in_dir}")
    gen = load_generator(settings.model, device=device)
    if "image" not in gen.modalities:
        raise SyntheticDataError(
            f"{settings.model}: model has no image condition stream (it has: {', '.join(gen.modalities) or 'none'}); "
            "variations need a reference-image model such as demo-he2he"
        )
    record = {"kind": "augment", "input": str(in_dir.resolve()), **asdict(settings),
              "weights_hash": gen.weights_hash}
    _claim(out_dir, record)
    rows, total = [], sum(len(images) for images in classes.values()) * settings.variations
    done = 0
    for class_index, (name, images) in enumerate(classes.items()):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for image_index, path in enumerate(images):
            reference = _load_rgb(path)
            if settings.keep_originals:
                original = out_dir / name / f"{path.stem}.png"
                if not original.exists():
                    _save_png(reference, original)
                rows.append({"source": f"{name}/{original.name}", "class": name, "caption": name, "split": "train",
                             "generated": 0, "reference": f"{name}/{path.name}", "seed": ""})
            conditions = gen.conditions(image=reference)
            base = settings.seed + 1000 * class_index + image_index  # distinct per image, stable on resume
            for k, seed in enumerate(sample_seeds(base, settings.variations)):
                target = out_dir / name / f"{path.stem}-var{k}.png"
                if not target.exists():
                    pixels = gen.generate(reference.shape[0], reference.shape[1], conditions, steps=settings.steps,
                                          guidance=settings.guidance, seed=seed)
                    _save_png(_to_uint8(pixels), target)
                rows.append({"source": f"{name}/{target.name}", "class": name, "caption": name, "split": "train",
                             "generated": 1, "reference": f"{name}/{path.name}", "seed": seed})
                done += 1
                if progress is not None:
                    progress(done, total)
    _write_table(out_dir / "manifest.csv", rows,
                 ["source", "class", "caption", "split", "generated", "reference", "seed"])
    _finish(out_dir, record, counts={name: sum(1 for r in rows if r["class"] == name) for name in classes})
    return out_dir


@dataclass(frozen=True)
class PairSettings:
    model: str
    per_caption: int = 4
    size_px: int = 256
    steps: int = 20
    guidance: float = 0.0
    seed: int = 0
    shard_size: int = 0  # > 0: WebDataset tar shards of this many pairs instead of images/ + pairs.csv


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file (one per line) or a CSV/TSV with a `caption` column."""
    path = Path(path)
    if not path.is_file():
        raise SyntheticDataError(f"{path}: no such captions file")
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as fh:
            table = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if "caption" not in (table.fieldnames or []):
                raise SyntheticDataError(f"{path}: no 'caption' column (columns: {', '.join(table.fieldnames or [])})")
            captions = [row["caption"].strip() for row in table]
    else:
        captions = [line.strip() for line in path.read_text().splitlines()]
    captions = [c for c in captions if c and not c.startswith("#")]
    if not captions:
        raise SyntheticDataError(f"{path}: no captions")
    return captions


def synth_pairs(captions: Sequence[str], out_dir: str | Path, settings: PairSettings, *, device: str = "cpu",
                progress: ProgressCallback | None = None) -> Path:
    """`settings.per_caption` generated images per caption, as image-caption pairs for CLIP training."""
    from .roi import load_generator

    if settings.per_caption < 1 or settings.size_px < 8:
        raise SyntheticDataError(f"per_caption must be >= 1 and size_px >= 8, got {settings.per_caption}, "
                                 f"{settings.size_px}")
    out_dir = Path(out_dir)
    gen = load_generator(settings.model, device=device)
    if "text" not in gen.modalities:
        raise SyntheticDataError(
            f"{settings.model}: model has no text condition stream (it has: {', '.join(gen.modalities) or 'none'}); "
            "image-caption pairs need a text-conditioned model such as demo-text2he"
        )
    record = {"kind": "synth-pairs", "captions": list(captions), **asdict(settings), "weights_hash": gen.weights_hash}
    _claim(out_dir, record)
    total = len(captions) * settings.per_caption
    pairs, done = [], 0
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for c, caption in enumerate(captions):
        conditions = gen.conditions(text=caption)
        for k, seed in enumerate(sample_seeds(settings.seed + c, settings.per_caption)):
            key = f"c{c:05d}-{k:03d}"
            target = images_dir / f"{key}.png"
            if not target.exists():
                pixels = gen.generate(settings.size_px, settings.size_px, conditions, steps=settings.steps,
                                      guidance=settings.guidance, seed=seed)
                _save_png(_to_uint8(pixels), target)
            pairs.append({"key": key, "image": f"images/{key}.png", "caption": caption, "seed": seed})
            done += 1
            if progress is not None:
                progress(done, total)
    if settings.shard_size > 0:
        _write_shards(out_dir, pairs, settings.shard_size)
    _write_table(out_dir / "pairs.csv", pairs, ["key", "image", "caption", "seed"])
    _finish(out_dir, record, counts={"pairs": len(pairs)})
    return out_dir


def _write_shards(out_dir: Path, pairs: list[dict], shard_size: int) -> None:
    """WebDataset shards: tar files of <key>.png + <key>.txt, written then renamed."""
    for index, start in enumerate(range(0, len(pairs), shard_size)):
        shard = out_dir / f"shard-{index:06d}.tar"
        temporary = shard.with_name(shard.name + ".tmp")
        with tarfile.open(temporary, "w") as tar:
            for pair in pairs[start : start + shard_size]:
                _add_bytes(tar, f"{pair['key']}.png", (out_dir / pair["image"]).read_bytes())
                _add_bytes(tar, f"{pair['key']}.txt", pair["caption"].encode("utf-8"))
        os.replace(temporary, shard)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _claim(out_dir: Path, record: dict) -> None:
    """Record the settings before anything is written; an unfinished run must have the same ones."""
    settings_path = out_dir / SETTINGS_FILE
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        mismatched = [key for key in record if previous.get(key) != json.loads(json.dumps(record[key]))]
        if mismatched:
            raise SyntheticDataError(
                f"{out_dir}: holds a run with other settings ({', '.join(mismatched)} differ); "
                "choose another output folder or delete it"
            )
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise SyntheticDataError(f"{out_dir}: exists and is not empty (and is no mupad synthetic-data run)")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(settings_path, {**record, "software": f"napari-mupad {__version__}", "complete": False})


def _finish(out_dir: Path, record: dict, counts: dict) -> None:
    _write_json(out_dir / SETTINGS_FILE, {**record, "software": f"napari-mupad {__version__}", "complete": True,
                                          "counts": counts, "generated": True, "not_for_diagnosis": True})


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


def _write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise SyntheticDataError(f"{path}: cannot read the image: {error}") from error


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(pixels).save(temporary, format="PNG")
    os.replace(temporary, path)
