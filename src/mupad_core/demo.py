"""`mupad demo`: the generative core, end to end, on the bundled real slide.

Until trained demo models are bundled, the demo shows what the core does with nothing
but a CPU and a minute: it cuts real H&E tiles from the bundled CC0 slide, trains a
tiny MUPAD model (SiT + Decoupled Cross-Attention, image stream fed by the built-in
encoder) to generate each tile from its own embedding, then samples variations with
two seeds. The preview shows real | seed A | seed B. A model this small memorises the
tiles it saw; it is a smoke demo of the pipeline, not a useful generator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    return Path(str(resources.files("mupad_core") / "data" / SAMPLE_SLIDE))


@dataclass
class DemoConfig:
    tiles: int = 8
    tile_px: int = 256  # cut at level 0 (0.5 um/px)
    encoder_px: int = 128  # what the image encoder sees
    target_px: int = 32  # what the model generates (4 um/px); larger needs a bigger model and longer
    steps: int = 1200
    time_budget_s: float = 120.0
    sample_steps: int = 30
    seed: int = 0


def tissue_tiles(slide_path: Path, n: int, size: int, seed: int = 0) -> np.ndarray:
    """`n` tissue-rich tiles (N, size, size, 3) uint8 from level 0, chosen reproducibly."""
    import openslide
    from skimage.color import rgb2hsv

    slide = openslide.OpenSlide(str(slide_path))
    w, h = slide.dimensions
    candidates = []
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            tile = np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
            tissue = (rgb2hsv(tile)[..., 1] > 0.15).mean()
            if tissue > 0.6:
                candidates.append(tile)
    slide.close()
    if len(candidates) < n:
        raise RuntimeError(f"{slide_path}: only {len(candidates)} tissue tiles of {size} px, need {n}")
    pick = np.random.default_rng(seed).choice(len(candidates), size=n, replace=False)
    return np.stack([candidates[i] for i in sorted(pick)])


def run_demo(out_dir: Path, config: DemoConfig = DemoConfig(), log=print) -> dict:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from .models.checkpoint import save_model
    from .models.conditioning import BuiltinImageEncoder
    from .models.conditions import Conditions
    from .models.sit import MupadSiT
    from .models.vae import PixelUnshuffleCodec
    from .train.loop import Batch, TrainConfig, Trainer
    from .transport.loss import LossConfig
    from .transport.samplers import make_noise, sample

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    slide = sample_slide_path()
    log(f"reading {config.tiles} tissue tiles of {config.tile_px} px from {slide.name}")
    tiles = tissue_tiles(slide, config.tiles, config.tile_px, config.seed)
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    source = F.interpolate(images, size=config.encoder_px, mode="area")
    target = F.interpolate(images, size=config.target_px, mode="area")
    codec = PixelUnshuffleCodec(config.target_px // 16)  # 16 x 16 latent grid
    latents = codec.encode(target)
    encoder = BuiltinImageEncoder(token_dim=64, width=32, depth=1, seed=config.seed)
    model = MupadSiT(in_channels=latents.shape[1], hidden_size=128, depth=4, num_heads=4,
                     condition_dims={"image": encoder.token_dim})
    train_cfg = TrainConfig(steps=config.steps, lr=2e-3, ema_decay=None, seed=config.seed,
                            loss=LossConfig(time_sampling="uniform", condition_dropout=0.0))
    trainer = Trainer(model, train_cfg, extra_modules=[encoder])

    def make_batch(step, generator):
        return Batch(latents=latents, conditions=Conditions(tokens={"image": encoder(source)}))

    start = time.perf_counter()

    def progress(step, total, record):
        if step % 100 == 0 or step == 1:
            log(f"  step {step:5d}/{total}  loss {record['loss_total']:.4f}  ({time.perf_counter() - start:.0f} s)")

    log(f"training a tiny MUPAD model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) "
        f"for up to {config.steps} steps or {config.time_budget_s:.0f} s on CPU")
    history = trainer.fit(make_batch, progress=progress, time_budget_s=config.time_budget_s)
    model.eval()
    encoder.eval()
    rows = [target]
    with torch.no_grad():
        cond = Conditions(tokens={"image": encoder(source)})
        for seed in (1, 2):
            out = sample(model, make_noise(latents.shape, seed), cond, method="heun", steps=config.sample_steps)
            rows.append(codec.decode(out.x).clamp(0, 1))
    mse = (rows[1] - target).square().flatten(1).mean(1)
    psnr = (10 * torch.log10(1 / mse)).tolist()

    grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)  # rows: real, seed 1, seed 2
    preview = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    scale = max(1, 256 // config.target_px)
    Image.fromarray(preview).resize((preview.shape[1] * scale, preview.shape[0] * scale), Image.NEAREST).save(
        out_dir / "preview.png"
    )
    save_model(model, out_dir / "model", card=MODEL_CARD.format(steps=len(history)),
               pipeline={"vae": repr(codec), "tasks": ["he2he"], "conditions": ["image"]})
    summary = {
        "slide": str(slide),
        "tiles": config.tiles,
        "train_steps": len(history),
        "train_seconds": round(time.perf_counter() - start, 1),
        "loss_first": history[0]["loss_total"],
        "loss_last": float(np.mean([h["loss_total"] for h in history[-20:]])),
        "psnr_db_seed1": [round(p, 2) for p in psnr],
        "preview": str(out_dir / "preview.png"),
        "model": str(out_dir / "model"),
        "note": "tiny smoke-demo model trained in this run; generated images, not for diagnosis",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {out_dir / 'preview.png'} (rows: real, seed 1, seed 2) and {out_dir / 'model'}")
    log(f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}; PSNR of seed-1 samples vs real: "
        f"{min(psnr):.1f}-{max(psnr):.1f} dB")
    return summary


MODEL_CARD = """# mupad demo model (smoke test)

Trained by `mupad demo` for {steps} steps on CPU on 8 tiles of the bundled CC0 slide
CMU-1-Small-Region. A 2-M-parameter SiT with Decoupled Cross-Attention (image stream
only) in a pixel-unshuffle latent space. It memorises its training tiles and is not a
useful generator. Demo weights — generated images are not for diagnosis.
"""
