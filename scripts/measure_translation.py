"""How much self-attention injection keeps a section's structure under another prompt.

    python scripts/measure_translation.py [--model demo-text2he] [--steps 20]
    python scripts/measure_translation.py --domains runs/demo-data/stain_domains \
        --model runs/stain-domains/model [--steps 20]

Default mode: translates a 128-px crop of the bundled slide from one prompt to another
(inversion under the source prompt, sampling under the target prompt) with injection off
and on, and prints SSIM and mean absolute error to the input, plus the same-prompt round
trip (the inversion's exactness).

`--domains`: the FF->FFPE stand-in. A model trained on two stain domains
(configs/proxy-stain-domains.yaml) translates the held-out tiles' crops from "as scanned" to
"pale staining"; each crop's true pale version exists (same cells), so besides structure
kept (SSIM of the luminance to the input) it prints how far the result lands from the truth
(SSIM to it, mean CIELAB ΔE to it), and, crop by crop, injection's gain in structure kept
with a 95 % bootstrap interval over crops. `--grid` takes every non-overlapping crop with at
least `--min-tissue` tissue instead of `--per-tile` crops along each tile's diagonal.

The last line is the headline `ssim_gain_with_injection: X` (SSIM to the input with map
injection on all steps minus without, guidance 0; luminance SSIM averaged over crops in
`--domains` mode).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.color import rgb2gray, rgb2lab
from skimage.metrics import structural_similarity

from mupad_core.demo import sample_slide_path
from mupad_core.generate.roi import load_generator
from mupad_core.generate.translate import TranslateSettings, translate_region
from mupad_core.slide.readers import open_slide
from mupad_core.slide.tissue import brightfield_tissue_mask

INJECTIONS = (("maps", 0.0), ("maps", 0.5), ("maps", 1.0), ("features", 1.0))


def _label(inject: str, steps: float) -> str:
    return "off" if steps == 0 else f"{inject}, {steps:.0%} of steps"


def slide_crop(args) -> None:
    gen = load_generator(args.model)
    with open_slide(sample_slide_path()) as reader:
        image = reader.read_region(0, 1200, 1760, 128, 128)
    reference = image.astype(float) / 255

    def run(source, target, **kw):
        result = translate_region(gen, image, TranslateSettings(source, target, steps=args.steps, **kw))
        out = result.pixels.permute(1, 2, 0).numpy().astype(float)
        return (structural_similarity(reference, out, channel_axis=2, data_range=1.0),
                np.abs(out - reference).mean() * 255, result.network_passes)

    _, error, _ = run(args.source, args.source, inject_steps=0.0)
    print(f"same prompt both ways, guidance 0: mean |error| {error:.3f} grey levels")
    print("| guidance | injection | SSIM to input | mean abs error (grey) | network passes |")
    print("|---|---|---|---|---|")
    gains = {}
    for guidance in (0.0, 2.0):
        for inject, steps in INJECTIONS:
            ssim, error, passes = run(args.source, args.target, inject_steps=steps, inject=inject, guidance=guidance)
            print(f"| {guidance:g} | {_label(inject, steps)} | {ssim:.4f} | {error:.2f} | {passes} |")
            gains[(guidance, inject, steps)] = ssim
    print(f"ssim_gain_with_injection: {gains[(0.0, 'maps', 1.0)] - gains[(0.0, 'maps', 0.0)]:+.4f}")


def domain_pairs(folder: Path, crop: int, per_tile: int, grid: bool = False,
                 min_tissue: float = 0.5) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, scanned crop, its true pale crop) from the held-out rows of the manifest.

    `grid`: every non-overlapping crop with at least `min_tissue` tissue (independent crops
    for the paired interval; glass-only crops would add zeros that say nothing about
    structure), instead of `per_tile` crops along the diagonal."""
    with (folder / "manifest.csv").open() as fh:
        scanned = [r["source"] for r in csv.DictReader(fh) if r["split"] == "val" and r["source"].endswith("_scanned.png")]
    pairs = []
    for name in scanned:
        a = np.asarray(Image.open(folder / name).convert("RGB"))
        b = np.asarray(Image.open(folder / name.replace("_scanned", "_pale")).convert("RGB"))
        h, w = a.shape[:2]
        if grid:
            mask = brightfield_tissue_mask(a)
            for y in range(0, h - crop + 1, crop):
                for x in range(0, w - crop + 1, crop):
                    if mask[y : y + crop, x : x + crop].mean() >= min_tissue:
                        pairs.append((f"{name}@{x},{y}", a[y : y + crop, x : x + crop], b[y : y + crop, x : x + crop]))
            continue
        for k in range(per_tile):  # crops along the diagonal, tissue-rich first
            y, x = (h - crop) * (k + 1) // (per_tile + 1), (w - crop) * (k + 1) // (per_tile + 1)
            pairs.append((f"{name}@{x},{y}", a[y : y + crop, x : x + crop], b[y : y + crop, x : x + crop]))
    if not pairs:
        raise SystemExit(f"{folder}: no held-out *_scanned.png rows in manifest.csv")
    return pairs


def domains(args) -> None:
    from mupad_core.demo_data import DOMAIN_PROMPTS

    gen = load_generator(args.model)
    source_prompt, target_prompt = DOMAIN_PROMPTS
    pairs = domain_pairs(Path(args.domains), args.crop, args.per_tile, args.grid, args.min_tissue)
    print(f"{len(pairs)} held-out crops of {args.crop} px: {source_prompt!r} -> {target_prompt!r}, {args.steps} steps")

    def scores(out, scanned, pale):
        grey = lambda im: rgb2gray(im.astype(float) / 255 if im.dtype == np.uint8 else im)  # noqa: E731
        return (structural_similarity(grey(scanned), grey(out), data_range=1.0),
                structural_similarity(pale.astype(float) / 255, out, channel_axis=2, data_range=1.0),
                float(np.linalg.norm(rgb2lab(out) - rgb2lab(pale), axis=-1).mean()))

    same = [translate_region(gen, s, TranslateSettings(source_prompt, source_prompt, steps=args.steps, inject_steps=0.0))
            for _, s, _ in pairs]
    error = np.mean([np.abs(r.pixels.permute(1, 2, 0).numpy() * 255 - s).mean() for r, (_, s, _) in zip(same, pairs)])
    print(f"same prompt both ways, guidance 0: mean |error| {error:.3f} grey levels")
    untranslated = np.mean([scores(s.astype(float) / 255, s, p)[1:] for _, s, p in pairs], axis=0)
    print(f"input itself vs the true pale version: SSIM {untranslated[0]:.4f}, ΔE {untranslated[1]:.2f}")
    print("| guidance | injection | SSIM (luminance) to input | SSIM to true pale | ΔE to true pale |")
    print("|---|---|---|---|---|")
    kept = {}
    injections = INJECTIONS if not args.paired_only else (("maps", 0.0), ("maps", 1.0))
    for guidance in args.guidance:
        for inject, steps in injections:
            settings = TranslateSettings(source_prompt, target_prompt, steps=args.steps, guidance=guidance,
                                         inject=inject, inject_steps=steps)
            rows = [scores(translate_region(gen, s, settings).pixels.permute(1, 2, 0).numpy().astype(float), s, p)
                    for _, s, p in pairs]
            mean = np.mean(rows, axis=0)
            print(f"| {guidance:g} | {_label(inject, steps)} | {mean[0]:.4f} | {mean[1]:.4f} | {mean[2]:.2f} |",
                  flush=True)
            kept[(guidance, inject, steps)] = np.asarray(rows)[:, 0]
    # Per crop, paired: injection's gain in structure kept, with a bootstrap interval over crops.
    print("| guidance | SSIM gain, maps on all steps − off (mean) | 95 % bootstrap interval | crops gaining |")
    print("|---|---|---|---|")
    for guidance in args.guidance:
        gain = kept[(guidance, "maps", 1.0)] - kept[(guidance, "maps", 0.0)]
        low, high = paired_interval(gain)
        print(f"| {guidance:g} | {gain.mean():+.5f} | [{low:+.5f}, {high:+.5f}] | {(gain > 0).sum()} of {gain.size} |")
    g = args.guidance[0]
    print(f"ssim_gain_with_injection: {(kept[(g, 'maps', 1.0)] - kept[(g, 'maps', 0.0)]).mean():+.4f}")


def paired_interval(gain: np.ndarray, rounds: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of per-crop differences."""
    rng = np.random.default_rng(seed)
    means = gain[rng.integers(0, gain.size, (rounds, gain.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-text2he")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--source", default="H&E squamous epithelium")
    parser.add_argument("--target", default="H&E dense tumour with high nuclear density")
    parser.add_argument("--domains", help="stain_domains folder of mupad_core.demo_data (the FF->FFPE stand-in)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--per-tile", type=int, default=3)
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 2.0],
                        help="--domains mode: guidance weights to run (the headline uses the first)")
    parser.add_argument("--grid", action="store_true",
                        help="--domains mode: every non-overlapping crop with enough tissue, not --per-tile diagonal crops")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="--grid: least tissue fraction of a crop")
    parser.add_argument("--paired-only", action="store_true",
                        help="--domains mode: only injection off and maps on all steps (the paired comparison)")
    args = parser.parse_args()
    domains(args) if args.domains else slide_crop(args)


if __name__ == "__main__":
    main()
