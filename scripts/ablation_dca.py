"""Ablation: Decoupled vs shared cross-attention, at demo scale, from one command.

    python scripts/ablation_dca.py [--steps 400] [--every 100] [--out runs/ablation-dca]

Trains the demo text->H&E config (configs/demo-text2he.yaml: real captioned H&E tiles, 3
held out) with a second condition stream, the tile's own image tokens (builtin CNN, as
demo-he2he), twice: identical but for `model.cross_attention` (decoupled: one attention
stream per modality; shared: one attention over the concatenated caption and image tokens,
the paper's baseline). With one modality the two are the same network, so two are needed.
Every checkpoint is measured on the held-out tiles: the denoising loss with both conditions,
without them, and the gap (how much the conditions tell the model about unseen tiles). Prints a Markdown
table and, last, `shared_minus_decoupled_heldout_loss: X` at the final step (positive: DCA
better). Needs the demo data: python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def variant(out: Path, kind: str, steps: int, every: int) -> Path:
    config = yaml.safe_load((REPO / "configs" / "demo-text2he.yaml").read_text())
    config["name"] = f"text-image-{kind}"
    config["conditions"]["image"] = {"encoder": "builtin", "from": "source", "trainable": True, "token_dim": 64,
                                     "width": 32, "depth": 2}
    config["out_dir"] = str(out)
    config["data"]["manifest"] = str((REPO / "configs" / config["data"]["manifest"]).resolve())
    config["model"]["cross_attention"] = kind
    config["train"].update(steps=steps, checkpoint_every=every, keep_checkpoints=steps // every + 1)
    path = out / f"text-image-{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluate_checkpoints(run_dir: Path, manifest: str) -> list[dict]:
    """Held-out losses of every checkpoint (its live weights) and of the exported EMA model."""
    from mupad_core.evaluate.heldout import heldout_denoising_loss

    pipeline = run_dir / "model" / "mupad_pipeline.json"
    rows = []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*")):
        model = checkpoint / "model"
        shutil.copy(pipeline, model / pipeline.name)  # same codec and encoders; only the weights differ
        # The trainable image encoder's weights of that step live in the trainer state.
        state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state["extra_modules"][0].items()},
                  str(model / "image_encoder.safetensors"))
        losses = heldout_denoising_loss(model, manifest, crop_px=64)
        rows.append({"step": int(checkpoint.name.split("_")[1]), "weights": "live", **losses})
    losses = heldout_denoising_loss(run_dir / "model", manifest, crop_px=64)
    rows.append({"step": rows[-1]["step"] if rows else 0, "weights": "EMA", **losses})
    return rows


def plot(results: dict, path: Path) -> None:
    """Held-out loss against training steps, with and without the conditions, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for (kind, result), color in zip(results.items(), ("#1f77b4", "#d62728")):
        rows = [r for r in result["rows"] if r["weights"] == "live"]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["conditional"] for r in rows], "-o", color=color, label=f"{kind}: with conditions")
        ax.plot(steps, [r["unconditional"] for r in rows], "--", color=color, alpha=0.6, label=f"{kind}: without")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out velocity loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Decoupled vs shared cross-attention (demo scale)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "runs" / "ablation-dca"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "images" / "ablation-dca.png"))
    args = parser.parse_args()
    from mupad_core.models.checkpoint import load_model
    from mupad_core.train.config import load_config
    from mupad_core.train.run import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in ("decoupled", "shared"):
        config = load_config(variant(out, kind, args.steps, args.every))
        result = train(config, resume=(config.run_dir / "checkpoints").is_dir(), progress_bar=False, log=print)
        params = sum(p.numel() for p in load_model(result.model_dir).parameters())
        results[kind] = {"params": params, "rows": evaluate_checkpoints(config.run_dir, config.data.manifest)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| cross-attention | parameters | step | weights | held-out loss with caption + image | without | gap |")
    print("|---|---|---|---|---|---|---|")
    for kind, result in results.items():
        for row in result["rows"]:
            gap = row["unconditional"] - row["conditional"]
            print(f"| {kind} | {result['params'] / 1e6:.2f} M | {row['step']} | {row['weights']} | "
                  f"{row['conditional']:.4f} | {row['unconditional']:.4f} | {gap:+.4f} |")
    plot(results, Path(args.plot))
    final = {kind: result["rows"][-1]["conditional"] for kind, result in results.items()}
    print(f"shared_minus_decoupled_heldout_loss: {final['shared'] - final['decoupled']:+.4f}")


if __name__ == "__main__":
    main()
