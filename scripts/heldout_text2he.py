"""text -> H&E on held-out tissue: KID/FID to real held-out crops, and whether captions separate.

    python scripts/heldout_text2he.py --model demo-text2he [--model OTHER] [--per-caption 4] \
        [--steps 20 [2 ...]] [--guidance W] [--figure docs/images/text2he-heldout.png] [--plot PNG]

The held-out set is the `val` split of `runs/demo-data/he_atlas` (whole MoNuSeg slides and
whole GlaS patients no model trained on), 256-px crops at 0.5 µm/px. Each model draws
`--per-caption` samples of 256 px under every held-out caption (seeds 0..), and the script
reports, in FID's InceptionV3 features:

- KID and FID of the samples to the real held-out crops, with 95 % bootstrap intervals;
- the same for real *training* crops (the floor any generator of this data can reach) and
  for the held-out crops blurred to 8x smaller and back (what "colour without texture" scores);
- caption separation: a logistic regression fitted on real training crops' features (GlaS
  benign vs malignant) classifies each model's samples drawn under benign vs malignant captions;
  the balanced accuracy says whether the text stream steers what is drawn (0.5: it does not).

`--figure` writes one row per model: a sample under each of four captions (the first step
count). Several `--steps` score every model at each; `--plot` then draws KID against network
passes per tile (two per step under guidance), per model (`plot_kid_vs_passes`).
Needs the demo data: python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "demo-data" / "he_atlas"
SIZE = 256


def read_rows(split: str) -> list[dict]:
    with (DATA / "manifest.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    unique, seen = [], set()
    for r in rows:  # train crops are listed several times (frozen augmentations); once is enough here
        if r["source"] not in seen:
            seen.add(r["source"])
            unique.append(r)
    return unique


def load_crops(rows: list[dict]) -> torch.Tensor:
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(DATA / r["source"]).convert("RGB")) for r in rows])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def heldout_and_floors(features) -> tuple[list[dict], list[dict], np.ndarray, dict[str, np.ndarray]]:
    """The held-out rows, 400 training rows (seeded), the held-out crops' features, and the
    features of the two floors every generator is read against: real training crops (what
    real tissue scores) and the held-out crops blurred 8x (colour without texture)."""
    val, train = read_rows("val"), read_rows("train")
    rng = np.random.default_rng(0)
    train = [train[i] for i in sorted(rng.choice(len(train), size=min(400, len(train)), replace=False))]
    held_out = load_crops(val)
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(held_out, 8), scale_factor=8,
                                              mode="bilinear", align_corners=False)
    floors = {"real training crops (floor)": features(load_crops(train)).numpy(),
              "held-out crops blurred 8x": features(blurred).numpy()}
    return val, train, features(held_out).numpy(), floors


def malignant(caption: str) -> bool | None:
    if "malignant" in caption:
        return True
    return False if "benign" in caption else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--per-caption", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--guidance", type=float, default=None,
                        help="default: the model's own (0 for a guidance-distilled student), else 2")
    parser.add_argument("--figure")
    parser.add_argument("--plot", help="KID against network passes per tile, per model (PNG)")
    parser.add_argument("--curves", help="JSON of KID-against-passes points: models already in it are drawn "
                                         "from it on the plot; this run's are added to it")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    from mupad_core.evaluate.distribution import fid, kid
    from mupad_core.evaluate.features import load_extractor
    from mupad_core.generate.config import model_pipeline
    from mupad_core.generate.roi import load_generator

    torch.set_grad_enabled(False)
    if not (DATA / "manifest.csv").is_file():
        raise SystemExit(f"{DATA}: no demo data; run python -m mupad_core.demo_data first")
    features = load_extractor("inception")
    val, train, real_val, floors = heldout_and_floors(features)
    real_train = floors["real training crops (floor)"]
    labels = [malignant(r["caption"]) for r in train]
    keep = [i for i, v in enumerate(labels) if v is not None]
    classifier = LogisticRegression(max_iter=2000, C=0.1).fit(real_train[keep], np.array([labels[i] for i in keep]))

    captions = sorted({r["caption"] for r in val})
    results = {label: (feats, None) for label, feats in floors.items()}
    sheets = {}
    curves = {}
    for model in args.model:
        gen = load_generator(model)
        guidance = args.guidance if args.guidance is not None else float(model_pipeline(model).get("guidance", 2.0))
        for steps in args.steps:
            drawn, drawn_captions = [], []
            for caption in captions:
                conditions = gen.conditions(text=caption)
                for seed in range(args.per_caption):
                    drawn.append(gen.generate(SIZE, SIZE, conditions, steps=steps, guidance=guidance, seed=seed))
                    drawn_captions.append(caption)
            pixels = torch.stack(drawn)
            feats = features(pixels).numpy()
            results[f"{model} ({steps} steps, guidance {guidance})"] = (feats, drawn_captions)
            passes = steps * (2 if guidance else 1)
            curves.setdefault(model, []).append((passes, kid(feats, real_val, resamples=100)))
            sheets.setdefault(model, (pixels, drawn_captions))

    print(f"Held-out: {len(val)} real 256-px crops at 0.5 µm/px ({len(captions)} captions; whole slides/patients "
          f"never trained on); {args.per_caption} samples per caption; InceptionV3 (FID) features.\n")
    print("| images | n | KID x1000 [95 % CI] | FID [95 % CI] | benign/malignant caption separation (balanced acc.) |")
    print("|---|---|---|---|---|")
    for label, (feats, drawn_captions) in results.items():
        k = kid(feats, real_val, resamples=100)
        f = fid(feats, real_val, resamples=100)
        separation = "—"
        if drawn_captions is not None:
            truth = [malignant(c) for c in drawn_captions]
            idx = [i for i, v in enumerate(truth) if v is not None]
            predicted = classifier.predict(feats[idx])
            t = np.array([truth[i] for i in idx])
            separation = f"{0.5 * ((predicted[t] == 1).mean() + (predicted[~t] == 0).mean()):.2f} (n={len(idx)})"
        print(f"| {label} | {len(feats)} | {k.value * 1e3:.1f} [{k.low * 1e3:.1f}, {k.high * 1e3:.1f}] | "
              f"{f.value:.0f} [{f.low:.0f}, {f.high:.0f}] | {separation} |")
    truth_train = np.array([labels[i] for i in keep])
    print(f"\n(the classifier on real training crops: {classifier.score(real_train[keep], truth_train):.2f} accuracy)")

    if args.figure and sheets:
        from PIL import Image

        picks = [c for c in captions if "malignant" in c][:2] + [c for c in captions if "benign" in c][:1] + \
                [c for c in captions if "frozen" in c][:1]
        rows = []
        for model, (pixels, drawn_captions) in sheets.items():
            tiles = [pixels[drawn_captions.index(c)] for c in picks]
            rows.append(torch.cat([torch.cat([t, torch.ones(3, SIZE, 6)], dim=2) for t in tiles], dim=2))
        real = [load_crops([next(r for r in val if r["caption"] == c)])[0] for c in picks]
        rows.append(torch.cat([torch.cat([t, torch.ones(3, SIZE, 6)], dim=2) for t in real], dim=2))
        sheet = torch.cat([torch.cat([r, torch.ones(3, 6, r.shape[-1])], dim=1) for r in rows], dim=1)
        Image.fromarray((sheet.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.figure)
        print(f"wrote {args.figure}: rows {', '.join(sheets)}, real held-out; columns: " + " | ".join(picks))
    curves = merge_curves(args.curves, curves)
    if args.plot and curves:
        floors_kid = {label: kid(feats, real_val, resamples=100) for label, feats in floors.items()}
        plot_kid_vs_passes(curves, floors_kid, args.plot,
                           f"text → H&E, held out: {args.per_caption} samples × {len(captions)} captions "
                           "(guided models: two passes a step)")


def merge_curves(path: str | None, curves: dict) -> dict:
    """This run's points added to those saved in `path` (a model measured again replaces its own),
    so models scored in separate runs of the same script, seeds and data share one plot."""
    from types import SimpleNamespace

    if not path:
        return curves
    import json

    saved = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    for model, points in curves.items():
        saved[model] = [[p, k.value, k.low, k.high] for p, k in points]
    Path(path).write_text(json.dumps(saved, indent=1))
    return {model: [(p, SimpleNamespace(value=v, low=lo, high=hi)) for p, v, lo, hi in points]
            for model, points in saved.items()}


def plot_kid_vs_passes(curves: dict, floors: dict, path: str, title: str) -> None:
    """KID (with its 95 % interval) against network passes per tile, one line per model; the
    floors as horizontal lines, and a 5 % band around each model's most-pass value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def name(model: str) -> str:  # a run's `.../<run>/model` folder by its run
        return Path(model).parent.name if Path(model).name == "model" else Path(model).name

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (model, points), colour in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        points = sorted(points, key=lambda p: p[0])
        passes = [p for p, _ in points]
        values = np.array([[k.value, k.low, k.high] for _, k in points]) * 1e3
        ax.errorbar(passes, values[:, 0], yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]],
                    marker="o", capsize=3, color=colour, label=name(model))
        if passes[-1] >= 100:  # a many-pass reference: the band a few-pass result must reach
            reference = values[-1, 0]
            ax.axhspan(reference * 0.95, reference * 1.05, color=colour, alpha=0.12,
                       label=f"±5 % of {name(model)} at {passes[-1]} passes")
    for (label, k), style in zip(floors.items(), (":", "--")):
        ax.axhline(k.value * 1e3, color="grey", linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("network passes per tile")
    ax.set_ylabel("KID ×10³ to real held-out crops (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
