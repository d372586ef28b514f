"""Which windows a whole-slide run samples, and which it steers to glass, on a real slide.

    python scripts/figure_glass_windows.py [--slide SLIDE] [--out docs/images/glass-windows.png]

Runs the real engine (`run_stain`) over the slide with a tiny random-weight SiT in the
paper's geometry (0.5 µm/px, 256-px windows, 64-px overlap, 1024-px blocks, 8x latents),
one step, and records every window it meets: sampled by the network, or steered to glass
(`engine.Glass`). Draws them over the slide: blocks without tissue grey, sampled windows'
centres green, glass windows' centres red. Prints the counts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mupad_core.demo import sample_slide_path
from mupad_core.generate import engine
from mupad_core.generate.engine import StainConfig, run_stain
from mupad_core.generate.handles import SiTImageToImageHandle
from mupad_core.models.sit import MupadSiT
from mupad_core.models.vae import PixelUnshuffleCodec
from mupad_core.slide.readers import open_slide

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="default: the bundled CMU-1-Small-Region crop")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "glass-windows.png")
    parser.add_argument("--width", type=int, default=900, help="figure width in px")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MupadSiT(in_channels=192, concat_channels=192, hidden_size=64, depth=1, num_heads=2)
    handle = SiTImageToImageHandle(model, PixelUnshuffleCodec(8), "tiny-random", "0" * 64)
    decided: dict[tuple[int, int], bool] = {}  # global latent (y, x) of a window -> glass?
    wrap = engine.glass_windows

    def recording(*a, **k):
        glass = wrap(*a, **k)
        decide = glass.is_glass

        def is_glass(window, origin):
            decided[(origin[0] + window.y, origin[1] + window.x)] = result = decide(window, origin)
            return result

        glass.is_glass = is_glass
        return glass

    engine.glass_windows = recording
    slide = args.slide or sample_slide_path()
    config = StainConfig(task="he2ihc", steps=1, window_px=256, overlap_px=64, block_px=1024, margin_px=256)
    with open_slide(slide) as reader, tempfile.TemporaryDirectory() as scratch:
        blocks = {}
        base = engine.blocks_with_tissue

        def keep_blocks(*a, **k):
            blocks["kept"] = base(*a, **k)
            return blocks["kept"]

        engine.blocks_with_tissue = keep_blocks
        run_stain(reader, handle, Path(scratch) / "out.ome.zarr", config)
        width, height = reader.dimensions
        mpp = reader.level_mpp(0)[0]
        level = len(reader.levels) - 1
        thumb = reader.read_region(level, 0, 0, *reversed(reader.levels[level].shape[:2]))
    scale = args.width / width  # figure px per output px (output at the slide's own pixel size here)
    image = Image.fromarray(np.ascontiguousarray(thumb[..., :3])).resize((args.width, round(height * scale)))
    shade = Image.new("RGBA", image.size)
    draw = ImageDraw.Draw(shade)
    b = config.block_px
    for row in range((height + b - 1) // b):
        for col in range((width + b - 1) // b):
            if (row, col) not in blocks["kept"]:
                draw.rectangle([col * b * scale, row * b * scale, (col + 1) * b * scale, (row + 1) * b * scale],
                               fill=(90, 90, 90, 110))
    d, win = handle.downscale, config.window_px
    for (ly, lx), glass in decided.items():
        cx, cy = (lx * d + win / 2) * scale, (ly * d + win / 2) * scale
        if not (0 <= cx < image.width and 0 <= cy < image.height):
            continue
        colour = (220, 30, 30, 255) if glass else (20, 160, 60, 255)
        draw.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], fill=colour, outline=(255, 255, 255, 255), width=2)
    image = Image.alpha_composite(image.convert("RGBA"), shade).convert("RGB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    sampled = sum(1 for g in decided.values() if not g)
    print(f"{slide.name} at {mpp:.3f} µm/px: {len(blocks['kept'])} blocks with tissue; windows met: {len(decided)}, "
          f"sampled {sampled}, steered to glass {len(decided) - sampled} -> {args.out}")


if __name__ == "__main__":
    main()
