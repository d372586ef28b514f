"""H&E variations on held-out tissue: KID/FID to real held-out crops, and whether a variation follows its reference.

    python scripts/heldout_he2he.py --model demo-he2he [--model OTHER] [--references 48] \
        [--steps 20 [2 ...]] [--figure docs/images/he2he-heldout.png] [--plot PNG]

The held-out set is the `val` split of `runs/demo-data/he_atlas` (whole MoNuSeg slides and
whole GlaS patients no model trained on), 256-px crops at 0.5 µm/px. Each model draws one
variation of each of `--references` held-out crops (evenly spaced through the split), the crop
given as its reference image, and the script reports in FID's InceptionV3 features:

- KID and FID of the variations to the real held-out crops, with 95 % bootstrap intervals;
  beside them real *training* crops (the floor any generator of this data can reach) and the
  held-out crops blurred to 8x smaller and back (colour without texture);
- reference following: for each variation, the rank of its own reference among all references
  by feature distance (top-1 and top-5 retrieval; chance is 1/N and 5/N). A model that ignores
  the reference draws the same kind of tissue for every one and scores at chance.

`--figure` writes the references on the first row and one row of variations per model (the
first step count). Several `--steps` score every model at each; `--plot` then draws KID against
network passes per tile, per model.
Needs the demo data: python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from heldout_text2he import DATA, SIZE, heldout_and_floors, load_crops, plot_kid_vs_passes


def retrieval(drawn: np.ndarray, references: np.ndarray) -> tuple[float, float]:
    """Top-1 / top-5 rate at which a variation's nearest references include its own."""
    d = ((drawn[:, None, :] - references[None, :, :]) ** 2).sum(-1)
    rank = (d < d[np.arange(len(d)), np.arange(len(d))][:, None]).sum(1)
    return float((rank < 1).mean()), float((rank < 5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--references", type=int, default=48)
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--figure")
    parser.add_argument("--plot", help="KID against network passes per tile, per model (PNG)")
    args = parser.parse_args()
    from mupad_core.evaluate.distribution import fid, kid
    from mupad_core.evaluate.features import load_extractor
    from mupad_core.generate.roi import load_generator

    torch.set_grad_enabled(False)
    if not (DATA / "manifest.csv").is_file():
        raise SystemExit(f"{DATA}: no demo data; run python -m mupad_core.demo_data first")
    features = load_extractor("inception")
    val, _, real_val, floors = heldout_and_floors(features)
    picks = np.linspace(0, len(val) - 1, min(args.references, len(val))).round().astype(int)
    references = load_crops([val[i] for i in picks])
    reference_features = real_val[picks]
    results = {label: (feats, False) for label, feats in floors.items()}
    sheets, curves = {}, {}
    for model in args.model:
        gen = load_generator(model)
        for steps in args.steps:
            drawn = []
            for i, reference in enumerate(references):
                image = (reference.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                conditions = gen.conditions(image=image)
                drawn.append(gen.generate(SIZE, SIZE, conditions, steps=steps, guidance=args.guidance, seed=i))
            pixels = torch.stack(drawn)
            label = f"{model} ({steps} steps" + (f", guidance {args.guidance})" if args.guidance else ")")
            feats = features(pixels).numpy()
            results[label] = (feats, True)
            curves.setdefault(model, []).append((steps * (2 if args.guidance else 1),
                                                 kid(feats, real_val, resamples=100)))
            sheets.setdefault(model, pixels)

    n = len(picks)
    print(f"Held-out: {len(val)} real 256-px crops at 0.5 µm/px (whole slides/patients never trained on); one "
          f"variation of each of {n} of them, given as the reference; InceptionV3 (FID) features.\n")
    print(f"| images | n | KID x1000 [95 % CI] | FID [95 % CI] | own reference top-1 / top-5 (chance "
          f"{1 / n:.2f} / {5 / n:.2f}) |")
    print("|---|---|---|---|---|")
    for label, (feats, paired) in results.items():
        k = kid(feats, real_val, resamples=100)
        f = fid(feats, real_val, resamples=100)
        follow = "—"
        if paired:
            top1, top5 = retrieval(feats, reference_features)
            follow = f"{top1:.2f} / {top5:.2f}"
        print(f"| {label} | {len(feats)} | {k.value * 1e3:.1f} [{k.low * 1e3:.1f}, {k.high * 1e3:.1f}] | "
              f"{f.value:.0f} [{f.low:.0f}, {f.high:.0f}] | {follow} |")

    if args.figure and sheets:
        from PIL import Image

        columns = np.linspace(0, n - 1, 5).round().astype(int)

        def row(images: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.cat([images[c], torch.ones(3, SIZE, 6)], dim=2) for c in columns], dim=2)

        rows = [row(references)] + [row(pixels) for pixels in sheets.values()]
        sheet = torch.cat([torch.cat([r, torch.ones(3, 6, r.shape[-1])], dim=1) for r in rows], dim=1)
        Image.fromarray((sheet.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.figure)
        print(f"wrote {args.figure}: rows: held-out references, then {', '.join(sheets)} "
              f"({args.steps[0]} steps, one variation each)")
    if args.plot and curves:
        floors_kid = {label: kid(feats, real_val, resamples=100) for label, (feats, _) in results.items()
                      if label in floors}
        plot_kid_vs_passes(curves, floors_kid, args.plot,
                           f"H&E variations, held out: one variation of each of {n} references")


if __name__ == "__main__":
    main()
