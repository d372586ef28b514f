"""`mupad eval`: generated images against references (and baselines), as JSON and a Markdown report.

Each set is a folder of images, an OME-Zarr result or a slide; stores and slides are cut
into tiles (background tiles dropped). Two kinds of numbers:

- **distribution** (always): FID and KID with 95% intervals in a chosen embedding
  (`evaluate.features`: FID's InceptionV3 by default, a pathology encoder by name);
- **paired** (when predictions and references match one to one: same file names, or two
  stores of one size): PSNR, SSIM, pixel PCC and GigaTIME's 8-px patch PCC per channel.

The report holds a table per metric, a bar chart of FID/KID with their intervals, and an
image grid reference | prediction | baselines of the first paired tiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .distribution import fid, kid
from .metrics import patch_pearson, pearson, psnr

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class ImageSet:
    """Named tiles (H, W, C) uint8 of one set: file stems, or tile positions in a store."""

    name: str
    source: str
    tiles: dict[str, np.ndarray] = field(default_factory=dict)


def load_set(path: str | Path, name: str | None = None, tile: int = 256, max_tiles: int = 2000,
             background: float = 220.0) -> ImageSet:
    """A folder of images, or an OME-Zarr / slide cut into `tile`-px tiles (mean grey above
    `background` = glass, skipped)."""
    path = Path(path)
    images = ImageSet(name or path.name, str(path))
    if path.is_dir() and not (path / ".zattrs").exists() and not (path / "zarr.json").exists():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for file in files[:max_tiles]:
            with Image.open(file) as image:
                array = np.asarray(image)
            images.tiles[str(file.relative_to(path).with_suffix(""))] = array if array.ndim == 3 else array[..., None]
        return images
    from ..slide.readers import open_slide

    with open_slide(path, require_mpp=False) as reader:
        width, height = reader.dimensions
        for y in range(0, height - tile + 1, tile):
            for x in range(0, width - tile + 1, tile):
                pixels = reader.read_region(0, x, y, tile, tile)
                if reader.kind == "brightfield" and pixels.mean() > background:
                    continue
                images.tiles[f"y{y}-x{x}"] = pixels
                if len(images.tiles) >= max_tiles:
                    return images
    if not images.tiles:
        raise ValueError(f"{path}: no {tile}-px tiles with tissue")
    return images


def _as_batch(tiles: list[np.ndarray]) -> torch.Tensor:
    batch = np.stack([t[..., :3] if t.shape[-1] >= 3 else np.repeat(t[..., :1], 3, -1) for t in tiles])
    scale = 255.0 if batch.dtype == np.uint8 else float(np.iinfo(batch.dtype).max) if batch.dtype.kind in "iu" else 1.0
    return torch.from_numpy(batch.astype(np.float32) / scale).permute(0, 3, 1, 2)


def paired_metrics(prediction: ImageSet, reference: ImageSet) -> dict | None:
    """Per-channel PSNR, SSIM, pixel and 8-px patch PCC over the tiles both sets name alike."""
    from skimage.metrics import structural_similarity

    common = sorted(set(prediction.tiles) & set(reference.tiles))
    if not common:
        return None
    rows = {"psnr": [], "ssim": [], "pcc": [], "patch_pcc": []}
    for key in common:
        p, r = prediction.tiles[key], reference.tiles[key]
        if p.shape != r.shape:
            raise ValueError(f"{key}: prediction {p.shape} and reference {r.shape} differ in size")
        rows["psnr"].append(psnr(p, r))
        rows["pcc"].append(pearson(p, r))
        rows["patch_pcc"].append(patch_pearson(p, r))
        rows["ssim"].append(np.array([structural_similarity(p[..., c], r[..., c], data_range=255)
                                      for c in range(p.shape[-1])]))
    out = {"tiles": len(common)}
    for metric, values in rows.items():
        per_channel = np.nanmean(np.stack(values), axis=0)
        out[metric] = {"per_channel": [round(float(v), 4) for v in per_channel],
                       "mean": round(float(np.nanmean(per_channel)), 4)}
    return out


def evaluate_sets(prediction: ImageSet, reference: ImageSet, baselines: list[ImageSet] = (), *,
                  features: str = "inception", resamples: int = 200, seed: int = 0, device: str = "cpu") -> dict:
    """Every number of the report, as a JSON-ready dict."""
    from .features import load_extractor

    extractor = load_extractor(features, device=device)

    def embed(images: ImageSet) -> np.ndarray:
        return extractor(_as_batch(list(images.tiles.values()))).numpy()

    reference_features = embed(reference)
    results = {"reference": {"name": reference.name, "source": reference.source, "tiles": len(reference.tiles)},
               "features": extractor.name, "sets": []}
    for images in [prediction, *baselines]:
        feats = embed(images)
        entry = {"name": images.name, "source": images.source, "tiles": len(images.tiles),
                 "fid": fid(feats, reference_features, resamples=resamples, seed=seed).as_dict(),
                 "kid": kid(feats, reference_features, resamples=resamples, seed=seed).as_dict(),
                 "paired": paired_metrics(images, reference)}
        results["sets"].append(entry)
    return results


def write_report(results: dict, out_dir: str | Path, prediction: ImageSet, reference: ImageSet,
                 baselines: list[ImageSet] = (), grid_tiles: int = 4) -> Path:
    """report.json, report.md, distribution.png and grid.png into `out_dir`; returns report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(results, indent=2))

    sets = results["sets"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric in zip(axes, ("fid", "kid")):
        values = [s[metric]["value"] for s in sets]
        errors = np.array([[s[metric]["value"] - s[metric]["low"], s[metric]["high"] - s[metric]["value"]]
                           for s in sets]).T.clip(min=0)
        ax.bar([s["name"] for s in sets], values, yerr=errors, capsize=4, color="#6a5acd")
        ax.set_title(f"{metric.upper()} to {results['reference']['name']} (95% interval)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out_dir / "distribution.png", dpi=110)
    plt.close(fig)

    grid = _grid([reference, prediction, *baselines], grid_tiles)
    if grid is not None:
        Image.fromarray(grid).save(out_dir / "grid.png")

    lines = [f"# Evaluation against {results['reference']['name']}", "",
             f"Reference: `{results['reference']['source']}` ({results['reference']['tiles']} tiles). "
             f"Embedding: {results['features']}. Intervals: 95%, subsampling bootstrap "
             f"({sets[0]['fid']['resamples']} draws).", "",
             "| set | tiles | FID | FID 95% | KID ×1000 | KID 95% ×1000 |", "|---|---|---|---|---|---|"]
    for s in sets:
        f, k = s["fid"], s["kid"]
        lines.append(f"| {s['name']} | {s['tiles']} | {f['value']:.2f} | {f['low']:.2f} – {f['high']:.2f} | "
                     f"{1000 * k['value']:.2f} | {1000 * k['low']:.2f} – {1000 * k['high']:.2f} |")
    paired = [s for s in sets if s["paired"]]
    if paired:
        lines += ["", "Paired tiles (same names): mean over channels, per channel in report.json.", "",
                  "| set | tiles | PSNR (dB) | SSIM | pixel PCC | 8-px patch PCC |", "|---|---|---|---|---|---|"]
        for s in paired:
            p = s["paired"]
            lines.append(f"| {s['name']} | {p['tiles']} | {p['psnr']['mean']:.2f} | {p['ssim']['mean']:.3f} | "
                         f"{p['pcc']['mean']:.3f} | {p['patch_pcc']['mean']:.3f} |")
    lines += ["", "![FID and KID with intervals](distribution.png)", ""]
    if grid is not None:
        lines += [f"![tiles: {' | '.join([reference.name, prediction.name, *[b.name for b in baselines]])}](grid.png)",
                  ""]
    lines.append("Generated images are hypothesis-generating, not for diagnosis.")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _grid(sets: list[ImageSet], count: int) -> np.ndarray | None:
    """Rows of tiles named alike in every set (reference | prediction | baselines)."""
    common = sorted(set.intersection(*(set(s.tiles) for s in sets)))[:count]
    if not common:
        return None
    rows = []
    for key in common:
        tiles = [s.tiles[key][..., :3] if s.tiles[key].shape[-1] >= 3 else np.repeat(s.tiles[key][..., :1], 3, -1)
                 for s in sets]
        size = min(t.shape[0] for t in tiles)
        rows.append(np.concatenate([np.asarray(Image.fromarray(t.astype(np.uint8)).resize((size, size)))
                                    for t in tiles], axis=1))
    width = min(r.shape[1] for r in rows)
    return np.concatenate([r[:, :width] for r in rows], axis=0)
