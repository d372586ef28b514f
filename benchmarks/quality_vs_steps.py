"""Held-out quality against network passes per tile: how few sampling steps are enough.

    python benchmarks/quality_vs_steps.py [--model demo-he2ihc] [--steps 1 2 4 8 16 32 64 250]
    python benchmarks/quality_vs_steps.py --student runs/distill-he2ihc/model --steps 1 2 4 8 250 --methods euler

Runs a bundled restaining model over its held-out data (BIRL for demo-he2ihc, DeepLIIF for
demo-he2mif; prepared by `python -m mupad_core.demo_data --shared ../shared/data --out
runs/demo-data`) through the whole-slide engine with Euler (one pass per step) and SDE
sampling at each step count, and prints PSNR, pixel PCC, 8-px patch PCC and seconds. The last
line is the headline `patch_pcc_8_over_250: R` (Euler, 8 passes per tile against 250).
With `--student` (a model distilled from it by `mupad train`'s `distill:`), the student runs
beside the teacher at each step count (Euler) and the headline becomes
`student_1_pass_over_teacher_250: R`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from mupad_core.evaluate.heldout import evaluate_heldout

REPO = Path(__file__).resolve().parents[1]
# Held-out data of the model's task: (manifest, µm/px).
DATA = {"he2ihc": ("runs/demo-data/ki67_ihc/manifest.csv", 0.5),
        "he2mif": ("runs/demo-data/deepliif/manifest.csv", 0.25)}


def plot_curve(rows: list[tuple[str, int, float]], path: Path, title: str) -> None:
    """8-px patch PCC against passes per tile (log axis), one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for method in dict.fromkeys(m for m, _, _ in rows):
        points = sorted((steps, value) for m, steps, value in rows if m == method)
        ax.plot([s for s, _ in points], [v for _, v in points], "-o", label=method)
    best = max(v for m, s, v in rows if m == "euler" and s == max(x for mm, x, _ in rows if mm == "euler"))
    ax.axhline(0.95 * best, color="grey", ls=":", label="95 % of Euler at the most steps")
    ax.axvline(8, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("network passes per tile")
    ax.set_ylabel("held-out 8-px patch PCC")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Network passes per sampler step: Heun evaluates the velocity twice (predictor, corrector).
PASSES_PER_STEP = {"euler": 1, "sde": 1, "heun": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-he2ihc",
                        help=f"a bundled id or model folder, for one of the tasks {', '.join(sorted(DATA))}")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 250])
    parser.add_argument("--methods", nargs="+", default=["euler", "sde"])
    parser.add_argument("--plot", default=str(REPO / "docs" / "images" / "quality-vs-steps.png"))
    parser.add_argument("--student", help="a distilled student of --model, measured beside it (Euler)")
    args = parser.parse_args()
    from mupad_core.generate.config import model_defaults

    task = model_defaults(args.model).get("task")
    if task not in DATA:
        raise SystemExit(f"{args.model}: task {task!r} has no held-out data here; choose a model for "
                         f"{', '.join(sorted(DATA))}")
    manifest, mpp = DATA[task]
    manifest = REPO / manifest
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no held-out data; run python -m mupad_core.demo_data first")
    print(f"# {args.model} held-out, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| sampler | passes per tile | PSNR (dB) | pixel PCC | 8-px patch PCC | seconds |")
    print("|---|---|---|---|---|---|")
    found = {}
    for method in args.methods:
        for steps in args.steps:
            start = time.perf_counter()
            result = evaluate_heldout(args.model, manifest, task, mpp, steps=steps, method=method)
            seconds = time.perf_counter() - start
            found[(method, steps)] = result
            passes = steps * PASSES_PER_STEP.get(method, 1)
            print(f"| {method} | {passes} | {result['psnr_mean']:.2f} | {result['pcc_mean']:.3f} | "
                  f"{result['patch_pcc_mean']:.3f} | {seconds:.1f} |", flush=True)
    if args.student:
        for steps in args.steps:
            if steps > 16:
                continue  # a few-step student: its many-step runs add nothing
            start = time.perf_counter()
            result = evaluate_heldout(args.student, manifest, task, mpp, steps=steps, method="euler")
            seconds = time.perf_counter() - start
            found[("student euler", steps)] = result
            print(f"| student euler | {steps} | {result['psnr_mean']:.2f} | {result['pcc_mean']:.3f} | "
                  f"{result['patch_pcc_mean']:.3f} | {seconds:.1f} |", flush=True)
    plot_curve([(m, n * PASSES_PER_STEP.get(m, 1), r["patch_pcc_mean"]) for (m, n), r in found.items()], Path(args.plot),
               f"{args.model} on its held-out data")
    low, high = found.get(("euler", 8)), found.get(("euler", max(args.steps)))
    one = found.get(("student euler", 1))
    if one and high:
        print(f"student_1_pass_over_teacher_{max(args.steps)}: {one['patch_pcc_mean'] / high['patch_pcc_mean']:.3f}")
    elif low and high:
        print(f"patch_pcc_8_over_{max(args.steps)}: {low['patch_pcc_mean'] / high['patch_pcc_mean']:.3f}")


if __name__ == "__main__":
    main()
