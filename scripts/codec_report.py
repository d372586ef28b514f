"""The bundled TAEF2 codec on real histology: reconstruction per stain, latent statistics, cost.

    python scripts/codec_report.py [--shared ../shared/data] [--write-stats] [--figure]

Crops 256-px squares from the shared real images of each stain (H&E: MoNuSeg 40x and GlaS
20x; IHC: DeepLIIF Ki67 regions and OpenSlide's OS-2 Ki67; mIF: DeepLIIF Lung1's DAPI,
Lap2β and Ki67 as one three-marker group, as `MarkerGroupCodec` encodes them), encodes and
decodes them, and prints PSNR / SSIM per stain as a Markdown table with the pixel-unshuffle
codec's cost beside it. `--write-stats` measures the per-channel latent mean/std over all
crops and writes them to the bundled `latent_stats.json` (the normalisation every TAEF2
model uses). `--figure` writes docs/images/codec-taef2.png (input | reconstruction per stain).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CROP = 256


def _grid_crops(image: np.ndarray, per_image: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = image.shape[:2]
    out = []
    for _ in range(per_image):
        y, x = rng.integers(0, h - CROP + 1), rng.integers(0, w - CROP + 1)
        out.append(image[y : y + CROP, x : x + CROP])
    return out


def stain_crops(shared: Path, seed: int = 0) -> dict[str, list[np.ndarray]]:
    import tifffile

    rng = np.random.default_rng(seed)
    rgb = lambda p: np.asarray(Image.open(p).convert("RGB"))  # noqa: E731
    he = [c for p in sorted((shared / "he_tiles" / "monuseg").glob("*.png"))[::3] for c in _grid_crops(rgb(p), 2, rng)]
    he += [c for p in sorted((shared / "he_tiles" / "glas").glob("*.jpg"))[::12] for c in _grid_crops(rgb(p), 1, rng)]
    ihc = [c for p in sorted((shared / "ihc" / "deepliif-large-tissues").glob("*.png")) for c in _grid_crops(rgb(p), 6, rng)]
    ihc += _grid_crops(tifffile.imread(shared / "ihc" / "OS-2-ndpi.ome.tif"), 8, rng)
    lung = rgb(shared / "mif" / "deepliif" / "Lung1.png")
    panel = lambda k: lung[:, 512 * k : 512 * (k + 1)]  # noqa: E731
    mif = np.stack([panel(2)[..., 0], panel(3)[..., 1], panel(4)[..., 0]], axis=-1)
    return {"H&E": he, "IHC": ihc, "mIF (3 markers)": _grid_crops(mif, 12, rng)}


def to_tensor(crops: list[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--write-stats", action="store_true")
    parser.add_argument("--figure", action="store_true")
    args = parser.parse_args()
    import torch
    from skimage.metrics import structural_similarity

    from mupad_core.models.tiny_autoencoder import STATS_FILE, bundled_folder
    from mupad_core.models.vae import load_vae

    torch.set_grad_enabled(False)
    crops = stain_crops(Path(args.shared))
    codec = load_vae("taef2")
    if args.write_stats:
        codec.mean.zero_()
        codec.std.fill_(1.0)
        raw = torch.cat([codec.encode(to_tensor(c)) for c in crops.values()])
        stats = {
            "mean": [round(float(v), 5) for v in raw.mean((0, 2, 3))],
            "std": [round(float(v), 5) for v in raw.std((0, 2, 3))],
            "measured_on": {name: f"{len(c)} crops of {CROP} px" for name, c in crops.items()},
            "command": "python scripts/codec_report.py --write-stats",
        }
        (bundled_folder() / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
        print(f"wrote {bundled_folder() / STATS_FILE}: raw latent mean {float(raw.mean()):.3f}, "
              f"per-channel std {min(stats['std']):.2f}-{max(stats['std']):.2f}")
        codec = load_vae("taef2")

    print(f"TAEF2 on real {CROP}-px crops ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {date.today()})\n")
    print("| stain | crops | PSNR dB | SSIM | latent std after normalisation |")
    print("|---|---|---|---|---|")
    pairs = {}
    for name, c in crops.items():
        x = to_tensor(c)
        z = codec.encode(x)
        y = codec.decode(z)
        mse = ((y - x) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
        psnr = float((10 * torch.log10(1 / mse)).mean())
        ssim = float(np.mean([structural_similarity(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(),
                                                    channel_axis=2, data_range=1.0) for i in range(len(x))]))
        print(f"| {name} | {len(c)} | {psnr:.2f} | {ssim:.3f} | {float(z.std()):.2f} |")
        pairs[name] = (x[:2], y[:2])

    x = to_tensor(crops["H&E"][:8])
    timings = {}
    for label, fn, arg in (("encode", codec.encode, x), ("decode", codec.decode, codec.encode(x))):
        fn(arg[:1])  # warm-up
        start = time.perf_counter()
        fn(arg)
        timings[label] = (time.perf_counter() - start) / len(arg)
    print(f"\nCost per {CROP}-px tile on this CPU (batch 8): encode {timings['encode'] * 1e3:.0f} ms, "
          f"decode {timings['decode'] * 1e3:.0f} ms")

    if args.figure:
        rows = []
        for name, (xi, yi) in pairs.items():
            for a, b in zip(xi, yi):
                rows.append(np.concatenate([a.permute(1, 2, 0).numpy(), np.ones((CROP, 8, 3)),
                                            b.permute(1, 2, 0).numpy()], axis=1))
        sheet = np.concatenate([np.concatenate([r, np.ones((8, r.shape[1], 3))]) for r in rows])
        out = REPO / "docs" / "images" / "codec-taef2.png"
        Image.fromarray((sheet * 255).round().astype(np.uint8)).save(out)
        print(f"wrote {out} (rows: H&E, H&E, IHC, IHC, mIF, mIF; left real, right TAEF2 reconstruction)")


if __name__ == "__main__":
    main()
