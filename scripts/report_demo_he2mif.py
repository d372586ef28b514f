"""The demo brightfield -> mIF model on its held-out DeepLIIF quarter, per marker: one command.

    python scripts/report_demo_he2mif.py [--steps 20] [--tile 32]

Stains the held-out right quarter of DeepLIIF Lung1 (Ki67 IHC) with the bundled `demo-he2mif`
through the whole-slide engine, then runs `mupad eval` against the real DAPI / Lap2β / Ki67
immunofluorescence: per-marker patch PCC with 95% intervals over tiles (bars), tile means of
prediction against reference (scatter; slide-level PCC), FID/KID. Writes the report to
runs/reports/demo-he2mif/ and copies its figures to docs/images/. Needs the demo data:
python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "demo-data" / "deepliif"
MPP = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "runs" / "reports" / "demo-he2mif"))
    parser.add_argument("--tile", type=int, default=32)
    args = parser.parse_args()
    from mupad_core.evaluate.heldout import evaluate_heldout
    from mupad_core.evaluate.report import evaluate_sets, load_set, write_report

    out = Path(args.out)
    manifest = DATA / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no demo data; run python -m mupad_core.demo_data first")
    keep = out / "stores" / "mupad"
    summary = evaluate_heldout("demo-he2mif", manifest, "he2mif", MPP, steps=args.steps, keep=keep)
    print(f"demo-he2mif: patch PCC {summary['patch_pcc']} (whole held-out region)")
    prediction = load_set(keep / "val_0.ome.zarr", "MUPAD demo-he2mif", tile=args.tile)
    reference = load_set(DATA / "val_target.png", "real mIF", tile=args.tile)
    reference.channels = prediction.channels  # the PNG holds DAPI, Lap2beta, Ki67 as its three planes
    prediction.tiles = {k: v for k, v in prediction.tiles.items() if k in reference.tiles}
    results = evaluate_sets(prediction, reference, resamples=200)
    report = write_report(results, out, prediction, reference)
    images = REPO / "docs" / "images"
    for name in ("markers", "scatter", "grid"):
        shutil.copy(out / f"{name}.png", images / f"eval-demo-he2mif-{name}.png")
    print(report.read_text())


if __name__ == "__main__":
    main()
