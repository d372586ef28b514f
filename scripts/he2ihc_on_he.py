"""Does an H&E -> IHC model keep the nuclei of a real H&E? Haematoxylin in, haematoxylin out.

    python scripts/he2ihc_on_he.py [--model demo-he2ihc] [--roi 717 1939 1026 1026] [--steps N]

No IHC of the bundled H&E slide exists, so DAB placement cannot be scored on it (that is
scripts/heldout_he2ihc.py's job, on real IHC). What can be scored on an H&E is the counterstain:
the 8-px box PCC of the output's haematoxylin (colour deconvolution) to the input H&E's, over a
region of the bundled CC0 slide CMU-1-Small-Region stained as `mupad stain` stains it (default:
the region `mupad demo` shows). Also printed: the share of output pixels with DAB above the
H-score's 1+ edge (0.02), i.e. how much brown the model draws on this tissue.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def box_means(channel: np.ndarray, box: int = 8) -> np.ndarray:
    h, w = channel.shape[0] // box * box, channel.shape[1] // box * box
    return channel[:h, :w].reshape(h // box, box, w // box, box).mean((1, 3)).ravel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-he2ihc")
    parser.add_argument("--roi", type=int, nargs=4, default=(717, 1939, 1026, 1026), metavar=("X", "Y", "W", "H"))
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's own, else 20)")
    args = parser.parse_args()
    import zarr
    from PIL import Image
    from skimage.color import rgb2hed

    from mupad_core.demo import sample_slide_path
    from mupad_core.generate.config import StainConfig
    from mupad_core.generate.engine import run_stain
    from mupad_core.generate.handles import load_handle
    from mupad_core.slide import open_slide

    config = StainConfig.for_model(args.model, roi=tuple(args.roi), steps=args.steps, overwrite=True)
    handle = load_handle(args.model, config.task)
    with tempfile.TemporaryDirectory() as scratch, open_slide(sample_slide_path()) as reader:
        store = run_stain(reader, handle, Path(scratch) / "out.ome.zarr", config)
        output = zarr.open_group(str(store), mode="r")["0"][:].transpose(1, 2, 0)
        source = reader.read_region(0, *args.roi)[..., :3]
    source = np.asarray(Image.fromarray(source).resize((output.shape[1], output.shape[0]), Image.BILINEAR))
    kept = np.corrcoef(box_means(rgb2hed(source)[..., 0]), box_means(rgb2hed(output)[..., 0]))[0, 1]
    brown = (rgb2hed(output)[..., 2] > 0.02).mean()
    print(f"{args.model} over CMU-1-Small-Region ROI {tuple(args.roi)} at {config.target_mpp} µm/px, "
          f"{config.steps} steps: haematoxylin kept (8-px box PCC to the input H&E's) {kept:.3f}; "
          f"output pixels with DAB > 0.02: {brown:.3f}")


if __name__ == "__main__":
    main()
