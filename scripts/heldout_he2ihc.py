"""H&E -> Ki67 IHC on held-out real IHC: models against floors and baselines, side by side.

    python scripts/heldout_he2ihc.py --model demo-he2ihc \
        --model runs/ki67/baseline-he2ihc-ki67-pix2pix/model \
        --model runs/ki67/baseline-he2ihc-ki67-cyclegan/model [--steps 20] [--samples 4] \
        [--figure docs/images/heldout-he2ihc.png]

The held-out region is DeepLIIF's ROI_127 (Ki67 IHC, resampled to 0.5 µm/px), never trained
on. Every model is given what it is given at inference on an H&E: the haematoxylin of its
input (`source_view: haematoxylin`), here the IHC's own; it has to put the DAB back. Scored
against the real IHC, in one run:

- KID / FID (Inception, FID's network) of 128-px tiles (stride 64) to the real held-out tiles;
- DAB placement: 8-px box PCC of the DAB density to the real one, and the ROC AUC of each
  nucleus's mean DAB against its real positivity (nuclei segmented in the real IHC; positive
  where the real mean DAB reaches the H-score's 1+ edge, 0.02);
- DAB amount: the nucleus H-score and positive fraction beside the real ones;
- counterstain kept: 8-px box PCC of the output's haematoxylin to the input's.

Floors in the same run: the input view itself (no DAB), and a two-parameter linear fit of
DAB on haematoxylin over the training crops (darker nuclei browner) — arithmetic a model has
to beat. A caveat the numbers carry: colour deconvolution leaks a little DAB into the
haematoxylin of a positive nucleus, so the view of a real IHC holds a hint an H&E does not.
Needs the demo data: python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "demo-data" / "ki67_ihc"
MPP = 0.5
TILE, STRIDE = 128, 64
POSITIVE_DAB = 0.02  # the H-score's 1+ edge (evaluate/ihc.py)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255


def to_rgb(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def linear_dab_floor(training: list[np.ndarray]):
    """DAB ~ a * haematoxylin + b, least squares over the training crops' pixels; returns
    the function that renders an IHC from a view with it."""
    from mupad_core.slide.stains import hed_to_rgb, rgb_to_hed

    h, d = [], []
    for crop in training:
        hed = rgb_to_hed(to_tensor(crop))
        h.append(hed[0].clamp_min(0).ravel())
        d.append(hed[2].clamp_min(0).ravel())
    h, d = torch.cat(h).double(), torch.cat(d).double()
    a, b = np.polyfit(h.numpy(), d.numpy(), 1)

    def render(view: np.ndarray) -> np.ndarray:
        hed = rgb_to_hed(to_tensor(view))
        stains = torch.zeros_like(hed)
        stains[0] = hed[0].clamp_min(0)
        stains[2] = (a * stains[0] + b).clamp_min(0)
        return to_rgb(hed_to_rgb(stains))

    return render, (float(a), float(b))


def tiles(rgb: np.ndarray) -> torch.Tensor:
    h, w = rgb.shape[:2]
    crops = [rgb[y : y + TILE, x : x + TILE] for y in range(0, h - TILE + 1, STRIDE)
             for x in range(0, w - TILE + 1, STRIDE)]
    return torch.stack([to_tensor(c) for c in crops])


def score(output: np.ndarray, real: np.ndarray, view: np.ndarray, cells: np.ndarray, positive: np.ndarray,
          extractor, real_features: np.ndarray) -> dict:
    from skimage.color import rgb2hed

    from mupad_core.evaluate.distribution import fid, kid
    from mupad_core.evaluate.ihc import cell_means, hscore, positivity_auc
    from mupad_core.evaluate.metrics import patch_pearson

    hed_out, hed_real, hed_view = rgb2hed(output), rgb2hed(real), rgb2hed(view)
    features = extractor(tiles(output)).numpy()
    cell_dab = cell_means(hed_out[..., 2], cells)
    score_out = hscore(output, cells)
    return {
        "kid": kid(features, real_features, resamples=100, subset_size=min(len(features), 50)).as_dict(),
        "fid": fid(features, real_features, resamples=50).as_dict(),
        "dab_box_pcc": float(patch_pearson(hed_out[..., 2:3], hed_real[..., 2:3])[0]),
        "dab_cell_auc": positivity_auc(cell_dab, positive),
        "hscore": score_out.hscore,
        "positive_fraction": score_out.positive_fraction,
        "haematoxylin_box_pcc": float(patch_pearson(hed_out[..., :1], hed_view[..., :1])[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a model name or folder (repeatable)")
    parser.add_argument("--steps", type=int, nargs="+",
                        help="sampling steps (network passes per tile); several: each model at each count "
                             "(default: each model's own count, else 20)")
    parser.add_argument("--samples", type=int, default=1,
                        help="also score a diffusion model's mean of this many samples (mupad stain --samples)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--figure", help="write a picture: real | input view | each row's output")
    args = parser.parse_args()
    from PIL import Image

    from mupad_core.evaluate.cells import segment_nuclei
    from mupad_core.evaluate.features import load_extractor
    from mupad_core.evaluate.heldout import evaluate_heldout
    from mupad_core.evaluate.ihc import cell_means, hscore
    from mupad_core.generate.config import model_pipeline
    from mupad_core.slide.stains import haematoxylin_view

    manifest = DATA / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no demo data; run python -m mupad_core.demo_data first")
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    held_out = [r for r in rows if r["split"] == "val"][0]
    real = np.asarray(Image.open(DATA / held_out["target"]).convert("RGB"))
    view = to_rgb(haematoxylin_view(to_tensor(real)))
    training = [np.asarray(Image.open(DATA / f).convert("RGB")) for f in sorted({r["source"] for r in rows
                                                                              if r["split"] == "train"})]
    from skimage.color import rgb2hed

    cells = segment_nuclei(real, MPP)
    positive = cell_means(rgb2hed(real)[..., 2], cells) >= POSITIVE_DAB
    extractor = load_extractor("inception")
    real_features = extractor(tiles(real)).numpy()
    real_score = hscore(real, cells)
    floor, (a, b) = linear_dab_floor(training)
    outputs = {"input view: haematoxylin only (floor)": view,
               f"linear DAB = {a:.2f}·H {b:+.3f} (floor, fit on training)": floor(view)}
    for model in args.model:
        one_pass = model_pipeline(model).get("kind") in ("pix2pix", "cyclegan")
        counts = args.steps or [int(model_pipeline(model).get("steps") or 20)]
        runs = [(1, 1)] if one_pass else [(steps, samples) for steps in counts
                                          for samples in ([1] if args.samples < 2 else [1, args.samples])]
        for steps, samples in runs:
            with tempfile.TemporaryDirectory() as keep:
                evaluate_heldout(model, manifest, "he2ihc", MPP, steps=steps, keep=Path(keep), samples=samples)
                output = zarr.open_group(str(Path(keep) / "val_0.ome.zarr"), mode="r")["0"][:].transpose(1, 2, 0)
            label = "one pass" if one_pass else f"{steps} steps" + (f", mean of {samples}" if samples > 1 else "")
            outputs[f"{model} ({label})"] = np.asarray(output)
    results = {label: score(out, real, view, cells, positive, extractor, real_features)
               for label, out in outputs.items()}

    print(f"Held-out: DeepLIIF ROI_127, {real.shape[1]} x {real.shape[0]} px at {MPP} µm/px, never trained on; "
          f"{len(positive)} nuclei, {int(positive.sum())} Ki67-positive by the real DAB; "
          f"real nucleus H-score {real_score.hscore:.0f}, positive fraction {real_score.positive_fraction:.3f}.\n")
    print("| output | KID ×10³ [95 % CI] ↓ | FID ↓ | DAB box PCC ↑ | nucleus DAB AUC ↑ | H-score (real "
          f"{real_score.hscore:.0f}) | positive fraction (real {real_score.positive_fraction:.3f}) | "
          "haematoxylin kept (box PCC) ↑ |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        kid = r["kid"]
        print(f"| {label} | {1e3 * kid['value']:.1f} [{1e3 * kid['low']:.1f}, {1e3 * kid['high']:.1f}] | "
              f"{r['fid']['value']:.0f} | "
              f"{r['dab_box_pcc']:.3f} | {r['dab_cell_auc']:.3f} | {r['hscore']:.0f} | {r['positive_fraction']:.3f} | "
              f"{r['haematoxylin_box_pcc']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"real": real_score.as_dict(), "rows": results}, indent=1))
    if args.figure:
        write_figure(Path(args.figure), {"real Ki67 IHC (held out)": real, **outputs})


def write_figure(path: Path, images: dict[str, np.ndarray], size: int = 256) -> None:
    """One crop of the held-out region per row label, side by side, labelled."""
    from PIL import Image, ImageDraw

    panels = []
    for label, image in images.items():
        crop = Image.fromarray(np.asarray(image)[100 : 100 + size, 200 : 200 + size])
        canvas = Image.new("RGB", (size, size + 28), "white")
        canvas.paste(crop, (0, 28))
        text = label[:42] + ("\n" + label[42:84] if len(label) > 42 else "")
        ImageDraw.Draw(canvas).text((4, 2), text, fill="black")
        panels.append(np.asarray(canvas))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


if __name__ == "__main__":
    main()
