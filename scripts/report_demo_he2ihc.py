"""The demo H&E -> IHC model beside its two baselines on held-out real Ki67 IHC: one `mupad eval` report.

    python scripts/report_demo_he2ihc.py [--baseline runs/ki67/baseline-he2ihc-ki67-pix2pix/model]
                                         [--cyclegan runs/ki67/baseline-he2ihc-ki67-cyclegan/model] [--steps 20]

Stains the held-out region (DeepLIIF's ROI_127 at 0.5 µm/px; every model is given its
haematoxylin, as it is given an H&E's) with the bundled `demo-he2ihc`, the pix2pix baseline
(`mupad train configs/baseline-he2ihc-ki67-pix2pix.yaml`) and the CycleGAN baseline (`mupad
train configs/baseline-he2ihc-ki67-cyclegan.yaml`), all trained on the same data and budget,
through the whole-slide engine, then runs `mupad eval` on the three results against the real
IHC: FID/KID with 95% intervals, paired PSNR/SSIM/PCC/patch PCC/cosine and the DAB H-score over
128-px tiles. Writes the report to runs/reports/demo-he2ihc/ and copies its figures to
docs/images/. A baseline whose model folder is missing is left out with a message.
scripts/heldout_he2ihc.py adds the per-nucleus measures and the arithmetic floors.
Needs the demo data: python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "demo-data" / "ki67_ihc"
MPP = 0.5


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=str(REPO / "runs" / "ki67" / "baseline-he2ihc-ki67-pix2pix" / "model"))
    parser.add_argument("--cyclegan", default=str(REPO / "runs" / "ki67" / "baseline-he2ihc-ki67-cyclegan" / "model"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "runs" / "reports" / "demo-he2ihc"))
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--data", default=str(DATA), help="prepared Ki67 IHC demo data (manifest.csv, roi127.png)")
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
    held_out = [line.split(",")[1] for line in manifest.read_text().splitlines()[1:] if line.endswith(",val")]
    reference = load_set(data / held_out[0], "real Ki67 IHC (held out)", tile=args.tile)
    # Every tile of the outputs, then the reference's tissue tiles in all three (its glass test decides).
    prediction = load_set(stores["MUPAD demo-he2ihc"], "MUPAD demo-he2ihc", tile=args.tile, background=256)
    baselines = [load_set(stores[name], name, tile=args.tile, background=256) for name, _ in models[1:]]
    for images in (prediction, *baselines):
        images.tiles = {k: v for k, v in images.tiles.items() if k in reference.tiles}
    results = evaluate_sets(prediction, reference, baselines, resamples=args.resamples, ihc=True, mpp=MPP)
    report = write_report(results, out, prediction, reference, baselines)
    images = Path(args.figures)
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "distribution.png", images / "eval-demo-he2ihc-distribution.png")
    shutil.copy(out / "grid.png", images / "eval-demo-he2ihc-grid.png")
    print(report.read_text())
    return results


if __name__ == "__main__":
    main()
