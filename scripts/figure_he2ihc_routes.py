"""The two H&E -> IHC routes side by side on the held-out BIRL part: the template model
(configs/demo-he2ihc-birl.yaml) and the embedding-space flow pair (configs/demo-ihc-generator.yaml,
then configs/demo-he2ihc-flow.yaml), both at 4.6 µm/px. Neither is bundled any more (the bundled
demo-he2ihc is the Ki67 model); train them first, e.g.
`python scripts/build_demo_models.py --only demo-he2ihc-flow`, then:

    python scripts/figure_he2ihc_routes.py --template runs/demo-he2ihc-birl/model \
        --flow runs/demo-he2ihc-flow/model [--out docs/images/he2ihc-routes.png] [--steps 20]

Prints each route's held-out numbers (the model cards' evaluation) and writes one figure:
held-out H&E | template route | embedding route | the registered IHC section.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from mupad_core.evaluate.heldout import evaluate_heldout

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "runs" / "demo-data" / "birl" / "manifest.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "he2ihc-routes.png")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--template", default=str(REPO / "runs" / "demo-he2ihc-birl" / "model"))
    parser.add_argument("--flow", default=str(REPO / "runs" / "demo-he2ihc-flow" / "model"))
    args = parser.parse_args()
    routes = {"template (BIRL)": args.template, "embedding flow (BIRL)": args.flow}
    if not MANIFEST.is_file():
        raise SystemExit(f"{MANIFEST} not found: run `python -m mupad_core.demo_data --out runs/demo-data` first")
    panels = [np.asarray(Image.open(MANIFEST.parent / "val_source.png").convert("RGB"))]
    with tempfile.TemporaryDirectory() as scratch:
        for label, model in routes.items():
            keep = Path(scratch) / model
            summary = evaluate_heldout(model, MANIFEST, "he2ihc", 4.6, steps=args.steps, keep=keep)
            print(label, json.dumps({k: summary[k] for k in ("psnr_mean", "pcc_mean", "patch_pcc_mean")}))
            panels.append(zarr.open_group(str(keep / "val_0.ome.zarr"), mode="r")["0"][:].transpose(1, 2, 0))
    panels.append(np.asarray(Image.open(MANIFEST.parent / "val_target.png").convert("RGB")))
    height = min(p.shape[0] for p in panels)
    gap = np.full((height, 8, 3), 255, np.uint8)
    row = np.concatenate([x for p in panels for x in (p[:height], gap)][:-1], axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(row)
    if image.height > 400:  # a docs picture, not the data: the held-out numbers above are full size
        image = image.resize((round(image.width * 400 / image.height), 400), Image.Resampling.LANCZOS)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} (held-out H&E | {' | '.join(routes)} | registered IHC)")


if __name__ == "__main__":
    main()
