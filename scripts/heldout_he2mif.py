"""brightfield -> mIF on the held-out DeepLIIF quarter: models against the floor, side by side.

    python scripts/heldout_he2mif.py --model demo-he2mif --model runs/baseline-he2mif-pix2pix/final \
        [--samples 4] [--steps 20]

Every model stains the held-out right quarter of DeepLIIF Lung1 (Ki67 IHC, 40x) through the
whole-slide engine (`evaluate_heldout`), and is scored against the real DAPI / Lap2β / Ki67
immunofluorescence by 8-px box PCC (GigaTIME's patch PCC) and pixel PCC, per marker. In the
same run the colour-deconvolution floor is scored the same way: scikit-image's `rgb2hed` of
the input, haematoxylin for the nuclear markers DAPI and Lap2β, DAB for Ki67 — arithmetic a
model has to beat. Prints a Markdown table (docs/evaluation.md keeps the latest).
Needs the demo data: python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "demo-data" / "deepliif"
MPP = 0.25
MARKERS = ("DAPI", "Lap2beta", "Ki67")


def deconvolution_floor(source: np.ndarray) -> np.ndarray:
    """(H, W, 3) optical densities: haematoxylin, haematoxylin, DAB — one per marker."""
    from skimage.color import rgb2hed

    hed = rgb2hed(source[..., :3])
    return np.stack([hed[..., 0], hed[..., 0], hed[..., 2]], axis=-1)


def tile_mean_box_pcc(prediction: np.ndarray, reference: np.ndarray, tile: int = 32) -> np.ndarray:
    """GigaTIME's averaging: box PCC within each `tile`-px tile, then the mean over tiles
    (tiles where a channel is flat are skipped for that channel), per marker."""
    from mupad_core.evaluate.metrics import patch_pearson

    h, w = reference.shape[:2]
    values = [patch_pearson(prediction[y : y + tile, x : x + tile], reference[y : y + tile, x : x + tile])
              for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    return np.nanmean(np.stack(values), axis=0)


def codec_rows(codec_name: str, source: np.ndarray, target: np.ndarray) -> dict:
    """The codec's ceiling (the real mIF after a round trip) and what copying the floor through it
    scores (the `h_dab` source view after a round trip)."""
    import torch

    from mupad_core.evaluate.metrics import patch_pearson, pearson
    from mupad_core.models.vae import load_vae
    from mupad_core.slide.stains import h_dab_view

    codec = load_vae(codec_name)

    def round_trip(image: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return codec.decode(codec.encode(image[None])).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()

    def to_tensor(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 255

    rows = {}
    for label, image in ((f"real mIF through {codec_name} (codec ceiling)", to_tensor(target)),
                         (f"h_dab view of the input through {codec_name}", h_dab_view(to_tensor(source)))):
        out = round_trip(image)
        rows[label] = {"patch_pcc": patch_pearson(out, target).tolist(), "tile_pcc": tile_mean_box_pcc(out, target).tolist(),
                       "pcc": pearson(out, target).tolist()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a model name or folder (repeatable)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1, help="score the mean of this many samples")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--codec", help="also score what this codec keeps: the real mIF and the h_dab view of the "
                                        "input, each encoded and decoded (e.g. taef2)")
    args = parser.parse_args()
    from PIL import Image

    from mupad_core.evaluate.heldout import evaluate_heldout
    from mupad_core.evaluate.metrics import patch_pearson, pearson

    manifest = DATA / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no demo data; run python -m mupad_core.demo_data first")
    source = np.asarray(Image.open(DATA / "val_source.png").convert("RGB"))
    target = np.asarray(Image.open(DATA / "val_target.png").convert("RGB")).astype(np.float64)
    floor = deconvolution_floor(source)
    rows = {"colour deconvolution (floor)": {"patch_pcc": patch_pearson(floor, target).tolist(),
                                             "tile_pcc": tile_mean_box_pcc(floor, target).tolist(),
                                             "pcc": pearson(floor, target).tolist()}}
    if args.codec:
        rows.update(codec_rows(args.codec, source, target))
    from mupad_core.generate.config import model_pipeline

    for model in args.model:
        one_pass = model_pipeline(model).get("kind") in ("pix2pix", "cyclegan")  # deterministic: one sample
        samples = 1 if one_pass else args.samples
        with tempfile.TemporaryDirectory() as keep:
            summary = evaluate_heldout(model, manifest, "he2mif", MPP, steps=args.steps, samples=samples,
                                       keep=Path(keep))
            prediction = zarr.open_group(str(Path(keep) / "val_0.ome.zarr"), mode="r")["0"][:].transpose(1, 2, 0)
        label = f"{model} (one pass)" if one_pass else \
            f"{model} ({args.steps} steps" + (f", mean of {samples}" if samples > 1 else "") + ")"
        rows[label] = {"patch_pcc": [summary["patch_pcc"][m] for m in summary["channels"]],
                       "tile_pcc": tile_mean_box_pcc(prediction.astype(np.float64), target).tolist(),
                       "pcc": [summary["pcc"][m] for m in summary["channels"]]}

    print(f"Held-out: right quarter of DeepLIIF Lung1 (512 x 128 px at {MPP} µm/px), never trained on.\n")
    print("8-px box PCC over the whole held-out region, and (in brackets) the mean over its 32-px tiles of the "
          "box PCC within each tile (GigaTIME's per-patch averaging).\n")
    print("| model | " + " | ".join(f"{m}" for m in MARKERS) + " | mean over markers | mean pixel PCC |")
    print("|---|" + "---|" * (len(MARKERS) + 2))
    for label, r in rows.items():
        cells = " | ".join(f"{v:.3f} ({t:.3f})" for v, t in zip(r["patch_pcc"], r["tile_pcc"]))
        print(f"| {label} | {cells} | {np.mean(r['patch_pcc']):.3f} ({np.mean(r['tile_pcc']):.3f}) | "
              f"{np.mean(r['pcc']):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
