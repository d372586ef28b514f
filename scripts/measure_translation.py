"""How much self-attention injection keeps a section's structure under another prompt.

    python scripts/measure_translation.py [--model demo-text2he] [--steps 20]

Translates a 128-px crop of the bundled slide from one prompt to another (inversion under
the source prompt, sampling under the target prompt) with injection off and on, and prints
SSIM and mean absolute error to the input, plus the same-prompt round trip (the inversion's
exactness). The last line is the headline `ssim_gain_with_injection: X` (SSIM with full
map injection minus without, guidance 0).
"""

from __future__ import annotations

import argparse

import numpy as np
from skimage.metrics import structural_similarity

from mupad_core.demo import sample_slide_path
from mupad_core.generate.roi import load_generator
from mupad_core.generate.translate import TranslateSettings, translate_region
from mupad_core.slide.readers import open_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-text2he")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--source", default="H&E squamous epithelium")
    parser.add_argument("--target", default="H&E dense tumour with high nuclear density")
    args = parser.parse_args()
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
        for inject, steps in (("maps", 0.0), ("maps", 0.5), ("maps", 1.0), ("features", 1.0)):
            ssim, error, passes = run(args.source, args.target, inject_steps=steps, inject=inject, guidance=guidance)
            label = "off" if steps == 0 else f"{inject}, {steps:.0%} of steps"
            print(f"| {guidance:g} | {label} | {ssim:.4f} | {error:.2f} | {passes} |")
            gains[(guidance, inject, steps)] = ssim
    print(f"ssim_gain_with_injection: {gains[(0.0, 'maps', 1.0)] - gains[(0.0, 'maps', 0.0)]:+.4f}")


if __name__ == "__main__":
    main()
