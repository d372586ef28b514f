"""fresh frozen -> FFPE on held-out MoNuSeg slides: does the output look FFPE, and keep the cells?

    python scripts/heldout_ff2ffpe.py --model demo-text2he [--steps 30] [--guidance 2] \
        [--inject 0.6] [--stain-model runs/ff2ffpe-cyclegan/model] [--figure docs/images/ff2ffpe-heldout.png]

Held out: the frozen and FFPE MoNuSeg slides of the `val` split of runs/demo-data/he_atlas
(whole TCGA slides no model trained on; 256-px crops at 0.5 µm/px). Each frozen crop is
inverted under its own caption ("H&E frozen section of <cancer>") and sampled under the same
caption with "FFPE" (`generate.translate`, self-attention maps injected for the first
`--inject` of the steps). Reported, in FID's InceptionV3 features, to the real held-out FFPE
crops: KID and FID of the frozen inputs (where translation starts) and of the translations
(the AI-FFPE criterion: translated closer to FFPE than the input), and the luminance SSIM of
each translation to its input (structure kept). Few crops: read the intervals.

`--stain-model` (repeatable) adds a model that restains a slide (`mupad stain --task ff2ffpe`,
e.g. the unpaired CycleGAN of configs/ff2ffpe-cyclegan.yaml), run through the whole-slide
engine over each frozen crop; `--model none` leaves the text-inversion route out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-text2he")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--inject", type=float, default=0.6)
    parser.add_argument("--stain-model", action="append", default=[])
    parser.add_argument("--figure")
    args = parser.parse_args()
    from skimage.metrics import structural_similarity

    from mupad_core.evaluate.distribution import fid, kid
    from mupad_core.evaluate.features import load_extractor
    from mupad_core.generate.roi import load_generator
    from mupad_core.generate.translate import TranslateSettings, translate_region

    sys.path.insert(0, str(REPO / "scripts"))  # the held-out crops are read as heldout_text2he reads them
    from heldout_text2he import load_crops, read_rows

    torch.set_grad_enabled(False)
    val = [r for r in read_rows("val") if r["source"].startswith("monuseg_")]
    frozen = [r for r in val if " frozen " in r["caption"]]
    ffpe = [r for r in val if " FFPE " in r["caption"]]
    features = load_extractor("inception")
    real_ffpe = features(load_crops(ffpe)).numpy()
    inputs = load_crops(frozen)
    grey = lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).numpy()  # noqa: E731
    rows = {"frozen inputs (untranslated)": (inputs, None)}
    if args.model != "none":
        gen = load_generator(args.model)
        outputs = []
        for row, image in zip(frozen, inputs):
            settings = TranslateSettings(source_prompt=row["caption"],
                                         target_prompt=row["caption"].replace(" frozen ", " FFPE "),
                                         steps=args.steps, guidance=args.guidance, inject_steps=args.inject)
            outputs.append(translate_region(gen, image, settings).pixels)
        rows[f"{args.model}: text inversion, {args.steps} steps, guidance {args.guidance}, "
             f"maps injected {args.inject:.0%}"] = (torch.stack(outputs), None)
    for model in args.stain_model:
        rows[f"{model}: mupad stain --task ff2ffpe"] = (stain_crops(model, frozen), None)
    for label, (pixels, _) in rows.items():
        if pixels is not inputs:
            rows[label] = (pixels, [structural_similarity(grey(a), grey(b), data_range=1.0)
                                    for a, b in zip(inputs, pixels)])
    print(f"Held-out MoNuSeg: {len(frozen)} frozen crops -> FFPE, against {len(ffpe)} real FFPE crops "
          f"(whole slides never trained on); InceptionV3 features.\n")
    print("| images | KID x1000 to held-out FFPE [95 % CI] | FID to held-out FFPE [95 % CI] | luminance SSIM to input |")
    print("|---|---|---|---|")
    for label, (pixels, ssim) in rows.items():
        f_ = features(pixels).numpy()
        k, f = kid(f_, real_ffpe, resamples=100), fid(f_, real_ffpe, resamples=100)
        print(f"| {label} | {k.value * 1e3:.1f} [{k.low * 1e3:.1f}, {k.high * 1e3:.1f}] | {f.value:.0f} "
              f"[{f.low:.0f}, {f.high:.0f}] | " + (f"{np.mean(ssim):.3f}" if ssim else "1") + " |")
    if args.figure:
        from PIL import Image

        picks = range(0, len(frozen), max(1, len(frozen) // 4))[:4]
        pad = torch.ones(3, 256, 6)
        strips = [torch.cat([torch.cat([pixels[i], pad], 2) for i in picks], 2) for pixels, _ in rows.values()]
        sheet = torch.cat([torch.cat([strip, torch.ones(3, 6, strip.shape[-1])], 1) for strip in strips], 1)
        Image.fromarray((sheet.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.figure)
        print(f"\nwrote {args.figure}: rows " + " | ".join(rows))


def stain_crops(model: str, frozen: list[dict]) -> torch.Tensor:
    """Each frozen crop restained by `model` through the whole-slide engine, in `frozen`'s order."""
    import csv
    import tempfile

    import zarr

    from mupad_core.evaluate.heldout import evaluate_heldout
    from heldout_text2he import DATA

    with tempfile.TemporaryDirectory() as scratch:
        manifest = DATA / f".heldout-ff2ffpe-{Path(scratch).name}.csv"  # beside the crops: their paths resolve
        try:
            with manifest.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["source", "target", "split"])
                writer.writeheader()
                writer.writerows({"source": r["source"], "target": r["source"], "split": "val"} for r in frozen)
            evaluate_heldout(model, manifest, "ff2ffpe", 0.5, keep=Path(scratch),
                             window_px=256 if model == "identity" else None)  # identity: no pipeline file
        finally:
            manifest.unlink(missing_ok=True)
        outputs = [zarr.open_group(str(Path(scratch) / f"val_{n}.ome.zarr"), mode="r")["0"][:]
                   for n in range(len(frozen))]
    return torch.from_numpy(np.stack(outputs)).float() / 255


if __name__ == "__main__":
    main()
