"""A model's numbers on the held-out rows of a manifest, through the real whole-slide path.

Each held-out source image is opened as a slide (at the pixel size the data was made
at), stained by `run_stain` exactly as `mupad stain` would, and compared with its
registered target: PSNR, pixel PCC and 8-px patch PCC per output channel.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr

from ..generate.engine import StainConfig, run_stain
from ..generate.handles import load_handle
from ..slide.readers import open_slide
from ..train.datasets import ManifestDataset, read_image
from .metrics import patch_pearson, pearson, psnr


def evaluate_heldout(model: str | Path, manifest: str | Path, task: str, mpp: float, *, split: str = "val",
                     steps: int = 20, seed: int = 0, window_px: int | None = None, keep: Path | None = None,
                     method: str = "euler", samples: int = 1) -> dict:
    """Mean metrics over the `split` rows of `manifest`, per channel and overall; windows of
    the size the model was trained on unless `window_px` says otherwise; `samples` > 1 scores
    the mean of that many samples (`mupad stain --samples`)."""
    from ..models.checkpoint import read_pipeline
    from ..zoo import resolve_model

    handle = load_handle(str(model), task)
    window_px = window_px or int(read_pipeline(resolve_model(str(model))).get("window_px", 128))
    overlap_px = window_px // 4
    names = getattr(handle, "channel_names", None) or [f"channel {i}" for i in range(handle.out_channels)]
    rows = ManifestDataset(manifest, split=split).rows
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(keep) if keep else Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        for n, row in enumerate(rows):
            source_path = Path(manifest).parent / row["source"]
            reference = (read_image(Path(manifest).parent / row["target"], "native") * 255).round()
            with open_slide(source_path, mpp=mpp) as reader:
                config = StainConfig(task=task, steps=steps, seed=seed, method=method, window_px=window_px,
                                     overlap_px=overlap_px,
                                     margin_px=window_px, block_px=1024, skip_background=False, overwrite=True,
                                     samples=samples)
                store = run_stain(reader, handle, out_dir / f"{split}_{n}.ome.zarr", config)
            generated = zarr.open_group(str(store), mode="r")["0"][:].transpose(1, 2, 0).astype(np.float64)
            results.append({"psnr": psnr(generated, reference), "pcc": pearson(generated, reference),
                            "patch_pcc": patch_pearson(generated, reference)})
    summary = {"split": split, "images": len(results), "steps": steps, "seed": seed, "channels": names}
    if samples > 1:
        summary["samples"] = samples
    if method != "euler":
        summary["method"] = method
    for key in ("psnr", "pcc", "patch_pcc"):
        per_channel = np.nanmean(np.stack([r[key] for r in results]), axis=0)
        summary[key] = {name: round(float(v), 4) for name, v in zip(names, per_channel)}
        summary[f"{key}_mean"] = round(float(np.nanmean(per_channel)), 4)
    return summary


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="held-out metrics of a model on a manifest's split")
    parser.add_argument("model")
    parser.add_argument("manifest")
    parser.add_argument("--task", required=True)
    parser.add_argument("--mpp", type=float, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_heldout(args.model, args.manifest, args.task, args.mpp, split=args.split,
                                      steps=args.steps), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _teacher_of(model, device):
    from ..models.checkpoint import CHECKPOINT_FILES, read_pipeline
    from ..models.teachers import load_teacher
    from ..zoo import resolve_model

    spec = read_pipeline(resolve_model(str(model), CHECKPOINT_FILES)).get("teacher")
    if not spec:
        raise ValueError(f"{model}: a CLS model without its teacher recorded in mupad_pipeline.json")
    return load_teacher(spec["encoder"], layer=spec.get("layer"), input_size=spec.get("input_size"),
                        source=spec.get("source")).to(device)


@torch.no_grad()
def heldout_denoising_loss(model: str | Path, manifest: str | Path, *, split: str = "val", crop_px: int | None = None,
                           times: int = 8, seeds: int = 4) -> dict:
    """Velocity loss on held-out images with their conditions, and with every condition
    stream switched off: how much the conditions (a caption, a reference image) tell the model about
    images it never saw. Same times and noise for both, so the difference is the signal."""
    from ..generate.roi import load_generator
    from ..transport import path as flow

    gen = load_generator(str(model), allow_template=True)
    size = crop_px or gen.window_px
    dataset = ManifestDataset(manifest, split=split, crop_size=size, crop="center")
    template = bool(gen.model.config.concat_channels)
    teacher = _teacher_of(model, gen.device) if gen.model.config.cls_dim else None
    totals = {"conditional": 0.0, "unconditional": 0.0}
    count = 0
    for index in range(len(dataset)):
        item = dataset[index]
        clean = item["target"] if template and item.get("target") is not None else item["source"]
        latents = gen.codec.encode(clean[None].to(gen.device))
        concat = gen.codec.encode(item["source"][None].to(gen.device)) if template else None
        image = item["source"][None] if "image" in gen.modalities else None  # a variations model's reference
        conditions = gen.conditions(text=(item["caption"] or None) if "text" in gen.modalities else None, image=image)
        unconditional = conditions.without(*conditions.tokens)
        cls_clean = None
        if teacher is not None:  # a CLS model is measured as trained: on its teacher's noised embedding
            from ..models.teachers import cls_target

            cls_clean = cls_target(teacher(clean[None].to(gen.device)).pooled)
        for t_value in np.linspace(0.05, 0.95, times):
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                noise = torch.randn(latents.shape, generator=g).to(latents)
                t = torch.full((1,), float(t_value), device=latents.device)
                x_t = flow.interpolate(latents, noise, t)
                target = flow.velocity_target(latents, noise)
                cls_t = None
                if cls_clean is not None:
                    cls_t = flow.interpolate(cls_clean, torch.randn(cls_clean.shape, generator=g).to(cls_clean), t)
                for key, cond in (("conditional", conditions), ("unconditional", unconditional)):
                    velocity = gen.model(x_t, t, cond, cls=cls_t, concat=concat).velocity
                    totals[key] += float(((velocity - target) ** 2).mean())
                count += 1
    out = {key: round(value / count, 5) for key, value in totals.items()}
    out.update(split=split, images=len(dataset), crop_px=size, times=times, seeds=seeds)
    return out
