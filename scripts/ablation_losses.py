"""Ablation: the training objective — velocity only vs REPA-style MLP alignment vs CNN alignment + CLS.

    python scripts/ablation_losses.py [--steps 300] [--every 100] [--out runs/ablation-losses]

The paper's Fig. 7 at demo scale. Trains the demo H&E->IHC config (configs/demo-he2ihc-birl.yaml:
BIRL lung, landmark-registered, right 30 % held out) three times, identical but for the loss:

- `velocity`: the flow-matching velocity loss alone;
- `repa-mlp`: + alignment of block `align_depth`'s tokens through REPA's per-token MLP projector;
- `cnn-cls`: + alignment through the paper's CNN projector + the CLS loss (MUPAD's objective).

The teacher is the offline FID InceptionV3 (an ImageNet network; the paper uses a pathology
foundation model, which this machine cannot download). Every checkpoint is measured on the
held-out region through the whole-slide engine (Euler, `--sample-steps`): PSNR and the 8-px
patch PCC against the real IHC, plus the held-out velocity loss. Inception-based scores
(FID) are left out on purpose: two variants were trained to agree with that network.

Prints a Markdown table and, last, `cnn_cls_minus_velocity_patch_pcc: X` at the final step
(positive: the representation losses help). Needs the demo data:
python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEACHER = {"encoder": "inception", "input_size": 112, "layer": "mixed_2"}
VARIANTS = {
    "velocity": {},
    "repa-mlp": {"teacher": {**TEACHER, "cls": False}, "projector": "mlp"},
    "cnn-cls": {"teacher": {**TEACHER, "cls": True}, "projector": "cnn"},
}


def variant(out: Path, kind: str, steps: int, every: int) -> Path:
    config = yaml.safe_load((REPO / "configs" / "demo-he2ihc-birl.yaml").read_text())
    config["name"] = f"he2ihc-{kind}"
    config["out_dir"] = str(out)
    config["data"]["manifest"] = str((REPO / "configs" / config["data"]["manifest"]).resolve())
    config["train"].update(steps=steps, checkpoint_every=every, keep_checkpoints=steps // every + 1,
                           warmup_steps=min(100, steps // 5))
    spec = VARIANTS[kind]
    if spec:
        config["teacher"] = spec["teacher"]
        config["model"]["align_projector"] = spec["projector"]
        config["model"]["align_depth"] = 1
        config["loss"].update(align_weight=0.5, cls_weight=0.03)
    path = out / f"he2ihc-{kind}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluate_checkpoints(run_dir: Path, manifest: str, mpp: float, sample_steps: int) -> list[dict]:
    """Held-out metrics of every checkpoint's live weights and of the exported EMA model."""
    from mupad_core.evaluate.heldout import evaluate_heldout, heldout_denoising_loss

    pipeline = run_dir / "model" / "mupad_pipeline.json"
    folders = []
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*")):
        shutil.copy(pipeline, checkpoint / "model" / pipeline.name)  # same codec; only the weights differ
        folders.append((int(checkpoint.name.split("_")[1]), "live", checkpoint / "model"))
    folders.append((folders[-1][0], "EMA", run_dir / "model"))
    rows = []
    for step, weights, folder in folders:
        metrics = evaluate_heldout(folder, manifest, "he2ihc", mpp, steps=sample_steps)
        loss = heldout_denoising_loss(folder, manifest, crop_px=64, times=8, seeds=2)
        rows.append({"step": step, "weights": weights, "psnr": metrics["psnr_mean"],
                     "patch_pcc": metrics["patch_pcc_mean"], "pcc": metrics["pcc_mean"],
                     "heldout_loss": loss["conditional"]})
        print(f"  {run_dir.name} step {step} ({weights}): patch PCC {rows[-1]['patch_pcc']:.4f}, "
              f"PSNR {rows[-1]['psnr']:.2f}, held-out loss {rows[-1]['heldout_loss']:.4f}", flush=True)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (kind, result), color in zip(results.items(), ("#7f7f7f", "#1f77b4", "#d62728")):
        rows = [r for r in result["rows"] if r["weights"] == "live"]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["patch_pcc"] for r in rows], "-o", color=color, label=kind)
        axes[1].plot(steps, [r["heldout_loss"] for r in rows], "-o", color=color, label=kind)
    axes[0].set_ylabel("held-out 8-px patch PCC (higher is better)")
    axes[1].set_ylabel("held-out velocity loss (lower is better)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training objective ablation, H&E→IHC demo scale (teacher: FID InceptionV3)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "runs" / "ablation-losses"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "images" / "ablation-losses.png"))
    args = parser.parse_args()
    from mupad_core.train.config import load_config
    from mupad_core.train.run import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.variants:
        config = load_config(variant(out, kind, args.steps, args.every))
        result = train(config, resume=(config.run_dir / "checkpoints").is_dir(), progress_bar=False, log=print)
        seconds = result.history[-1].get("elapsed_s", float("nan")) if result.history else float("nan")
        results[kind] = {"train_seconds": seconds,
                         "rows": evaluate_checkpoints(config.run_dir, config.data.manifest, config.data.mpp,
                                                      args.sample_steps)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| objective | step | weights | held-out patch PCC | PSNR (dB) | pixel PCC | held-out velocity loss |")
    print("|---|---|---|---|---|---|---|")
    for kind, result in results.items():
        for row in result["rows"]:
            print(f"| {kind} | {row['step']} | {row['weights']} | {row['patch_pcc']:.4f} | {row['psnr']:.2f} | "
                  f"{row['pcc']:.4f} | {row['heldout_loss']:.4f} |")
    for kind, result in results.items():
        print(f"{kind}: training {result['train_seconds']:.0f} s")
    plot(results, Path(args.plot))
    if "velocity" in results and "cnn-cls" in results:
        delta = results["cnn-cls"]["rows"][-1]["patch_pcc"] - results["velocity"]["rows"][-1]["patch_pcc"]
        print(f"cnn_cls_minus_velocity_patch_pcc: {delta:+.4f}")


if __name__ == "__main__":
    main()
