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
    channels: list[str] | None = None  # marker names (an mIF store's omero labels)


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
        if reader.kind == "fluorescence":
            images.channels = list(reader.channel_names)
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
    tile_means = {"prediction": [], "reference": []}  # per tile and channel: slide-level PCC
    for key in common:
        p, r = prediction.tiles[key], reference.tiles[key]
        if p.shape != r.shape:
            raise ValueError(f"{key}: prediction {p.shape} and reference {r.shape} differ in size")
        rows["psnr"].append(psnr(p, r))
        rows["pcc"].append(pearson(p, r))
        rows["patch_pcc"].append(patch_pearson(p, r))
        rows["ssim"].append(np.array([structural_similarity(p[..., c], r[..., c], data_range=255)
                                      for c in range(p.shape[-1])]))
        tile_means["prediction"].append(p.reshape(-1, p.shape[-1]).mean(0))
        tile_means["reference"].append(r.reshape(-1, r.shape[-1]).mean(0))
    out = {"tiles": len(common)}
    rng = np.random.default_rng(0)
    for metric, values in rows.items():
        stacked = np.stack(values)  # (tiles, channels)
        per_channel = np.nanmean(stacked, axis=0)
        # 95% interval of the mean over tiles, per channel (percentile bootstrap of tiles).
        draws = np.stack([np.nanmean(stacked[rng.integers(0, len(stacked), len(stacked))], axis=0)
                          for _ in range(200)])
        low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
        out[metric] = {"per_channel": [round(float(v), 4) for v in per_channel],
                       "low": [round(float(v), 4) for v in low], "high": [round(float(v), 4) for v in high],
                       "mean": round(float(np.nanmean(per_channel)), 4)}
    pred, ref = np.stack(tile_means["prediction"]), np.stack(tile_means["reference"])
    out["tile_means"] = {"prediction": pred.round(3).tolist(), "reference": ref.round(3).tolist()}
    if len(common) > 2:
        from .metrics import _corr

        out["slide_pcc"] = [round(float(v), 4) for v in _corr(pred, ref)]  # across tiles, per channel
    return out


def ihc_metrics(images: ImageSet, labels: ImageSet | None = None, marker_channel: int | None = None,
                mpp: float | None = None) -> dict:
    """DAB H-score over the nuclei the offline segmenter finds, and (with DeepLIIF-style label
    masks named like the tiles) the per-cell AUC of the stain against the labels.
    `marker_channel`: score that channel's mean (an mIF marker) instead of DAB."""
    from .cells import segment_nuclei
    from .ihc import cell_means, dab_density, deepliif_cells, hscore, positivity_auc

    fractions, units = np.zeros(4), 0
    scores, truth = [], []
    for key, tile in images.tiles.items():
        if marker_channel is None:
            cells = segment_nuclei(tile, mpp)
            if cells.max():
                score = hscore(tile, cells)
                fractions += np.array(score.fractions) * score.units
                units += score.units
        if labels is not None and key in labels.tiles:
            cell_labels, positive = deepliif_cells(labels.tiles[key])
            if cell_labels.max():
                signal = dab_density(tile) if marker_channel is None else tile[..., marker_channel].astype(float)
                scores.append(cell_means(signal, cell_labels))
                truth.append(positive)
    out = {}
    if units:
        fractions /= units
        out.update(hscore=round(float(100 * (fractions[1] + 2 * fractions[2] + 3 * fractions[3])), 2),
                   positive_fraction=round(float(1 - fractions[0]), 4), nuclei=units)
    if scores:
        scores_, truth_ = np.concatenate(scores), np.concatenate(truth)
        out.update(labelled_cells=int(len(truth_)), labelled_positive=int(truth_.sum()))
        try:
            out["auc"] = round(positivity_auc(scores_, truth_), 4)
        except ValueError as exc:
            out["auc_error"] = str(exc)
    return out


def evaluate_sets(prediction: ImageSet, reference: ImageSet, baselines: list[ImageSet] = (), *,
                  features: str = "inception", resamples: int = 200, seed: int = 0, device: str = "cpu",
                  ihc: bool = False, cells: bool = False, labels: ImageSet | None = None,
                  marker_channel: int | None = None, mpp: float | None = None,
                  captions: dict[str, str] | None = None, text_image_encoder: str | None = None) -> dict:
    """Every number of the report, as a JSON-ready dict. `ihc`: H-score (and AUC with
    `labels`) per set; `cells`: cell-composition distance of each set to the reference;
    `captions` (tile name -> caption) with a `text_image_encoder`: text-image alignment."""
    from .features import load_extractor

    extractor = load_extractor(features, device=device)

    def embed(images: ImageSet) -> np.ndarray:
        return extractor(_as_batch(list(images.tiles.values()))).numpy()

    reference_features = embed(reference)
    results = {"reference": {"name": reference.name, "source": reference.source, "tiles": len(reference.tiles)},
               "features": extractor.name, "sets": []}
    if ihc or labels is not None:
        results["reference"]["ihc"] = ihc_metrics(reference, labels, marker_channel, mpp)
    aligner = None
    if captions and text_image_encoder:
        from .alignment import TextImageEncoder

        aligner = TextImageEncoder(text_image_encoder, device=device)
        results["reference"]["alignment"] = _alignment(aligner, reference, captions)
    reference_index = {key: i for i, key in enumerate(reference.tiles)}
    for images in [prediction, *baselines]:
        feats = embed(images)
        entry = {"name": images.name, "source": images.source, "tiles": len(images.tiles),
                 "fid": fid(feats, reference_features, resamples=resamples, seed=seed).as_dict(),
                 "kid": kid(feats, reference_features, resamples=resamples, seed=seed).as_dict(),
                 "paired": paired_metrics(images, reference)}
        if entry["paired"]:
            # The paper's image-image cosine similarity: each tile's embedding against its
            # reference's, in the report's encoder.
            rows = [(i, reference_index[key]) for i, key in enumerate(images.tiles) if key in reference_index]
            a = feats[[i for i, _ in rows]]
            b = reference_features[[j for _, j in rows]]
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            entry["paired"]["cosine"] = {"mean": round(float(cos.mean()), 4),
                                         "low": round(float(np.percentile(cos, 2.5)), 4),
                                         "high": round(float(np.percentile(cos, 97.5)), 4)}
        if ihc or labels is not None:
            entry["ihc"] = ihc_metrics(images, labels, marker_channel, mpp)
        if aligner is not None:
            entry["alignment"] = _alignment(aligner, images, captions)
        if cells:
            from .cells import composition_distance

            entry["cells"] = composition_distance(list(reference.tiles.values()), list(images.tiles.values()), mpp)
        results["sets"].append(entry)
    return results


def _alignment(aligner, images: ImageSet, captions: dict[str, str]) -> dict | None:
    from .alignment import text_image_alignment

    keys = [k for k in images.tiles if Path(k).name in captions]
    if len(keys) < 2:
        return None
    return text_image_alignment(aligner, _as_batch([images.tiles[k] for k in keys]),
                                [captions[Path(k).name] for k in keys])


def read_captions_table(path: str | Path) -> dict[str, str]:
    """Image name (file stem) -> caption, from a CSV with a `caption` column and the image in
    `name`, `image` or `key` (`mupad synth-pairs`' pairs.csv works as it is)."""
    import csv

    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    column = next((c for c in ("name", "image", "key") if rows and c in rows[0]), None)
    if not rows or column is None or "caption" not in rows[0]:
        raise ValueError(f"{path}: needs a caption column and the image in a name, image or key column")
    return {Path(row[column]).stem if row[column].lower().endswith(IMAGE_SUFFIXES) else Path(row[column]).name:
            row["caption"] for row in rows}


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

    if any(st["paired"] for st in sets):
        _marker_plots(sets, reference.channels or prediction.channels, out_dir)
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
                  f"| set | tiles | PSNR (dB) | SSIM | pixel PCC | 8-px patch PCC | cosine ({results['features']}) |",
                  "|---|---|---|---|---|---|---|"]
        for s in paired:
            p = s["paired"]
            cosine = f"{p['cosine']['mean']:.3f}" if "cosine" in p else "–"
            lines.append(f"| {s['name']} | {p['tiles']} | {p['psnr']['mean']:.2f} | {p['ssim']['mean']:.3f} | "
                         f"{p['pcc']['mean']:.3f} | {p['patch_pcc']['mean']:.3f} | {cosine} |")
    if "ihc" in results["reference"]:
        lines += ["", "IHC positivity: DAB H-score over the nuclei found by the offline segmenter; AUC of per-cell "
                  "stain against the labelled cells.", "",
                  "| set | nuclei | H-score | positive fraction | labelled cells | AUC |", "|---|---|---|---|---|---|"]
        for name, m in [(results["reference"]["name"], results["reference"]["ihc"])] + [(s["name"], s["ihc"])
                                                                                       for s in sets]:
            lines.append(f"| {name} | {m.get('nuclei', '–')} | {m.get('hscore', '–')} | "
                         f"{m.get('positive_fraction', '–')} | {m.get('labelled_cells', '–')} | {m.get('auc', '–')} |")
    if any(s.get("alignment") for s in sets):
        a0 = next(s["alignment"] for s in sets if s.get("alignment"))
        lines += ["", f"Text-image alignment in {a0['encoder']}: cosine of each image with its caption, with the "
                  "captions shuffled (this encoder's chance level), and top-1 caption retrieval.", "",
                  "| set | pairs | cosine | shuffled | top-1 retrieval |", "|---|---|---|---|---|"]
        ref_alignment = results["reference"].get("alignment")
        for name, a in [(results["reference"]["name"], ref_alignment)] + [(s["name"], s.get("alignment")) for s in sets]:
            if a:
                lines.append(f"| {name} | {a['pairs']} | {a['cosine']:.3f} | {a['cosine_shuffled']:.3f} | "
                             f"{a['top1_retrieval']:.2f} |")
    if any("cells" in s for s in sets):
        lines += ["", "Cell composition against the reference (size classes by the reference's area tertiles; "
                  "distances in reference standard deviations):", "",
                  "| set | nuclei (ref) | per mm² (ref) | small / medium / large | class W1 | DAB+ difference | "
                  "W1 area | W1 haematoxylin | W1 DAB |", "|---|---|---|---|---|---|---|---|---|"]
        for s in sets:
            c = s["cells"]
            g, r, w = c["generated"], c["reference"], c["feature_wasserstein_sd"]
            fr = " / ".join(f"{v:.2f}" for v in g["size_fractions"].values())
            lines.append(f"| {s['name']} | {g['nuclei']} ({r['nuclei']}) | {g['per_mm2']} ({r['per_mm2']}) | {fr} | "
                         f"{c['class_wasserstein']} | {c['dab_positive_difference']:+.3f} | {w['area']} | "
                         f"{w['hematoxylin']} | {w['dab']} |")
    if paired:
        names = reference.channels or prediction.channels or [f"channel {i}" for i in
                                                               range(len(paired[0]["paired"]["patch_pcc"]["per_channel"]))]
        lines += ["", "Per channel (8-px patch PCC, 95% interval over tiles; slide-level PCC of tile means):", "",
                  "| set | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for st in paired:
            pp = st["paired"]["patch_pcc"]
            cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(pp["per_channel"], pp["low"], pp["high"])]
            lines.append(f"| {st['name']} | " + " | ".join(cells) + " |")
            if st["paired"].get("slide_pcc"):
                lines.append(f"| {st['name']} (slide-level) | " +
                             " | ".join(f"{v:.3f}" for v in st["paired"]["slide_pcc"]) + " |")
        lines += ["", "![per-channel patch PCC with 95% intervals](markers.png)", "",
                  "![tile means, prediction against reference, per channel](scatter.png)"]
    lines += ["", "![FID and KID with intervals](distribution.png)", ""]
    if grid is not None:
        lines += [f"![tiles: {' | '.join([reference.name, prediction.name, *[b.name for b in baselines]])}](grid.png)",
                  ""]
    lines.append("Generated images are hypothesis-generating, not for diagnosis.")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _marker_plots(sets: list[dict], channels: list[str] | None, out_dir: Path) -> None:
    """markers.png: per-channel patch PCC bars with intervals; scatter.png: tile means per channel."""
    import matplotlib.pyplot as plt

    paired = [st for st in sets if st["paired"]]
    count = len(paired[0]["paired"]["patch_pcc"]["per_channel"])
    names = channels or [f"channel {i}" for i in range(count)]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * count * len(paired)), 3.2))
    width = 0.8 / len(paired)
    for k, st in enumerate(paired):
        pp = st["paired"]["patch_pcc"]
        values = np.array(pp["per_channel"])
        errors = np.array([values - np.array(pp["low"]), np.array(pp["high"]) - values]).clip(min=0)
        ax.bar(np.arange(count) + k * width, values, width, yerr=errors, capsize=3, label=st["name"])
    ax.set_xticks(np.arange(count) + width * (len(paired) - 1) / 2, names)
    ax.set_ylabel("8-px patch PCC")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "markers.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, count, figsize=(3 * count, 3), squeeze=False)
    for c in range(count):
        ax = axes[0, c]
        for st in paired:
            means = st["paired"]["tile_means"]
            ax.scatter(np.array(means["reference"])[:, c], np.array(means["prediction"])[:, c], s=10, label=st["name"])
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.5)
        ax.set_title(names[c], fontsize=9)
        ax.set_xlabel("reference tile mean")
        if c == 0:
            ax.set_ylabel("prediction tile mean")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "scatter.png", dpi=110)
    plt.close(fig)


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
