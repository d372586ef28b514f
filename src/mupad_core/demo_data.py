"""Training data for the bundled demo models, cut from the shared real data.

The shared files' licences do not all allow copying them into the package, so the demo
models' configs point at a folder this module prepares from `../shared/data`
(`python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data`).
Each set is a `ManifestDataset` folder: source/target images, a held-out part kept out of
training, and `manifest.csv`.

- `deepliif/`: DeepLIIF's Lung1 tile (Ki67 IHC with co-registered multiplex IF). Source:
  the brightfield IHC panel; target: DAPI, Lap2β and Ki67 immunofluorescence as the three
  channels of one image. The right quarter of the tile is held out.
- `birl/`: BIRL's mouse-lung H&E and proSPC IHC consecutive sections (5 % scale), the IHC
  registered onto the H&E by the affine transform fitted to the 78 manual landmark pairs.
  The right 30 % is held out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

MIF_MARKERS = ("DAPI", "Lap2beta", "Ki67")
MIF_COLORS = ("0000FF", "00FF00", "FF0000")
DEEPLIIF_MPP = 0.25  # 40x; DeepLIIF's README gives 512-px tiles at 40x
BIRL_MPP = 4.6  # 5 % of the ANHIR scans (~0.23 µm/px)


def prepare_deepliif(shared: Path, out: Path) -> Path:
    tile = np.asarray(Image.open(shared / "mif" / "deepliif" / "Lung1.png").convert("RGB"))
    panel = lambda k: tile[:, 512 * k : 512 * (k + 1)]  # noqa: E731
    source = panel(0)  # Ki67 IHC (DAB + haematoxylin)
    target = np.stack([panel(2)[..., 0], panel(3)[..., 1], panel(4)[..., 0]], axis=-1)  # DAPI, Lap2b, Ki67
    return _write_split(out / "deepliif", source, target, held_out_from=384)


def prepare_birl(shared: Path, out: Path) -> Path:
    from skimage.transform import AffineTransform, warp

    folder = shared / "paired_he_ihc" / "birl-lung-lesion"
    he = np.asarray(Image.open(folder / "Izd2-29-041-w35_HE.jpg").convert("RGB"))
    ihc = np.asarray(Image.open(folder / "Izd2-29-041-w35_proSPC.jpg").convert("RGB"))
    he_points = np.loadtxt(folder / "Izd2-29-041-w35_HE.csv", delimiter=",", skiprows=1)[:, 1:]
    ihc_points = np.loadtxt(folder / "Izd2-29-041-w35_proSPC.csv", delimiter=",", skiprows=1)[:, 1:]
    transform = AffineTransform.from_estimate(he_points, ihc_points)  # H&E px -> IHC px, as warp wants
    if not transform:
        raise RuntimeError(f"{folder}: cannot fit an affine transform to the landmarks ({transform})")
    registered = warp(ihc, transform, output_shape=he.shape[:2], mode="constant", cval=1.0)
    registered = (registered * 255).round().astype(np.uint8)
    residual = np.linalg.norm(transform(he_points) - ihc_points, axis=1)
    out_dir = _write_split(out / "birl", he, registered, held_out_from=int(he.shape[1] * 0.7))
    (out_dir / "registration.txt").write_text(
        f"affine from {len(he_points)} landmark pairs; residual median {np.median(residual):.1f} px, "
        f"max {residual.max():.1f} px\n"
    )
    return out_dir


def _write_split(folder: Path, source: np.ndarray, target: np.ndarray, held_out_from: int) -> Path:
    """Columns [0, held_out_from) train, the rest held out; images + manifest.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, cols in (("train", slice(0, held_out_from)), ("val", slice(held_out_from, None))):
        for name, image in (("source", source), ("target", target)):
            Image.fromarray(np.ascontiguousarray(image[:, cols])).save(folder / f"{split}_{name}.png")
        rows.append({"source": f"{split}_source.png", "target": f"{split}_target.png", "split": split})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "target", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="prepare the demo models' training data from ../shared/data")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="runs/demo-data")
    args = parser.parse_args(argv)
    shared, out = Path(args.shared), Path(args.out)
    if not (shared / "mif" / "deepliif" / "Lung1.png").is_file():
        raise SystemExit(f"{shared}: not the shared data folder (no mif/deepliif/Lung1.png)")
    for prepare in (prepare_deepliif, prepare_birl):
        print(prepare(shared, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
