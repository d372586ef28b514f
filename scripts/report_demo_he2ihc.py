"""The demo H&E -> IHC model beside its two baselines on the held-out BIRL region: one command.

    python scripts/report_demo_he2ihc.py [--baseline runs/baseline-he2ihc-pix2pix/model]
                                         [--cyclegan runs/baseline-he2ihc-cyclegan/model] [--steps 20]

Stains the held-out H&E with the bundled `demo-he2ihc`, the pix2pix-style baseline (`mupad train
configs/baseline-he2ihc-pix2pix.yaml`) and the CycleGAN-style unpaired baseline (`mupad train
configs/baseline-he2ihc-cyclegan.yaml`), all trained on the same data, through the whole-slide
engine, then runs `mupad eval` on the three results against the registered IHC: FID/KID with 95%
intervals and paired PSNR/SSIM/PCC/patch PCC/cosine over 64-px tiles. Writes
the report to runs/reports/demo-he2ihc/ and copies its figures to docs/images/. A baseline whose
model folder is missing is left out with a message. Needs the demo data:
python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "demo-data" / "birl"
MPP = 4.6


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=str(REPO / "runs" / "baseline-he2ihc-pix2pix" / "model"))
    parser.add_argument("--cyclegan", default=str(REPO / "runs" / "baseline-he2ihc-cyclegan" / "model"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "runs" / "reports" / "demo-he2ihc"))
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--data", default=str(DATA), help="prepared BIRL demo data (manifest.csv, val_*.png)")
    parser.add_argument("--figures", default=str(REPO / "docs" / "images"), help="where the figures are copied")
    parser.add_argument("--resamples", type=int, default=200)
    args = parser.parse_args(argv)
    from mupad_core.evaluate.heldout import evaluate_heldout
    from mupad_core.evaluate.report import evaluate_sets, load_set, write_report

    out = Path(args.out)
    data = Path(args.data)
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no demo data; run python -m mupad_core.demo_data first")
    stores = {}
    models = [("MUPAD demo-he2ihc", "demo-he2ihc")]
    for name, folder in (("pix2pix baseline", args.baseline), ("CycleGAN baseline", args.cyclegan)):
        if Path(folder).is_dir():
            models.append((name, folder))
        else:
            print(f"{name}: no model at {folder} (train it with its config first); left out")
    for name, model in models:
        keep = out / "stores" / name.split()[0].lower()
        summary = evaluate_heldout(model, manifest, "he2ihc", MPP, steps=args.steps, keep=keep)
        print(f"{name}: PSNR {summary['psnr_mean']} dB, patch PCC {summary['patch_pcc_mean']} (whole region)")
        stores[name] = keep / "val_0.ome.zarr"
    reference = load_set(data / "val_target.png", "registered IHC", tile=args.tile)
    # Every tile of the outputs, then the reference's tissue tiles in all three (its glass test decides).
    prediction = load_set(stores["MUPAD demo-he2ihc"], "MUPAD demo-he2ihc", tile=args.tile, background=256)
    baselines = [load_set(stores[name], name, tile=args.tile, background=256) for name, _ in models[1:]]
    for images in (prediction, *baselines):
        images.tiles = {k: v for k, v in images.tiles.items() if k in reference.tiles}
    # (No cell composition: at 4.6 µm/px a nucleus is about two pixels wide.)
    results = evaluate_sets(prediction, reference, baselines, resamples=args.resamples)
    report = write_report(results, out, prediction, reference, baselines)
    images = Path(args.figures)
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "distribution.png", images / "eval-demo-he2ihc-distribution.png")
    shutil.copy(out / "grid.png", images / "eval-demo-he2ihc-grid.png")
    print(report.read_text())
    return results


if __name__ == "__main__":
    main()
