"""Train, evaluate and bundle the demo models, from the committed configs and ../shared/data.

    python scripts/build_demo_models.py                 # everything (resumes finished/unfinished runs)
    python scripts/build_demo_models.py --only demo-he2ihc --skip-train
    python scripts/build_demo_models.py --only demo-he2ihc-flow     # not built by default (OPTIONAL)
    python scripts/build_demo_models.py --only demo-text2he --steps 50000   # on a GPU (train.device: auto)

Each model is trained by `mupad train configs/<config>.yaml`, measured on its held-out
part, and copied with a model card (data, steps, hardware, held-out numbers) into
src/mupad_core/data/models/<name>/, where `mupad models` and `mupad demo` find it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "mupad_core" / "data" / "models"

# name -> (config, what the held-out evaluation measures)
DEMO_MODELS = {
    "demo-he2mif": ("configs/demo-he2mif-deepliif.yaml", "stain"),
    "demo-he2ihc": ("configs/distill-he2ihc.yaml", "stain"),  # a 2-step student of TEACHERS' model
    "demo-text2he": ("configs/demo-text2he.yaml", "denoising"),
    "demo-he2he": ("configs/demo-he2he.yaml", "denoising"),
    "demo-he2ihc-flow": ("configs/demo-he2ihc-flow.yaml", "stain"),
}

# Built only when named (--only): the embedding-flow pair at BIRL's 4.6 µm/px draws fog, not
# cells, and with it the bundled weights would pass the 50 MB budget.
OPTIONAL = {"demo-he2ihc-flow"}

# A few-step student and the config of the teacher it is distilled from, trained first into
# its run folder (the student's config names that folder) and not bundled itself.
TEACHERS = {
    "demo-he2ihc": "configs/demo-he2ihc-ki67.yaml",
}

# A model that needs another trained first, bundled inside it: name -> (config, subfolder).
# The embedding flow's IHC generator ships in the flow's folder, so the pair is one model.
PARTS = {
    "demo-he2ihc-flow": ("configs/demo-ihc-generator.yaml", "generator"),
}

DATA_NOTES = {
    "demo-he2mif": "DeepLIIF's Lung1 tile (nadeemlab/DeepLIIF, Datasets/Sample_Dataset/train/Lung1.png; Apache 2.0 "
                   "with Commons Clause, so it may not be sold; MSKCC IHC/mpIF data, Zenodo 4751737): Ki67 IHC "
                   "brightfield as source, co-registered DAPI, Lap2beta and Ki67 immunofluorescence as target, 40x "
                   "(0.25 um/px). 480 random 128-px crops of columns 0-383 train (latents cached once, one frozen "
                   "flip/turn each); columns 384-511 are held out.",
    "demo-he2ihc": "Real Ki67 IHC (DAB + haematoxylin) only, resampled to 0.5 um/px: DeepLIIF's large-tissue regions "
                   "ROI_1 and ROI_7 and the IHC panel of Lung1 (nadeemlab/DeepLIIF; Apache 2.0 with Commons Clause, "
                   "so it may not be sold; MSKCC data, Zenodo 4751737) and OpenSlide's OS-2 Ki67 crop scanned on a "
                   "Hamamatsu and an Olympus scanner (petebankhead/2022-qupath-cell-detection; OpenSlide test data, "
                   "free to use and distribute). 128-px crops, each listed three times (the latent cache freezes "
                   "three flips/turns and stain jitters of it). Each crop is its own target; the source the model "
                   "sees is the crop's haematoxylin alone (colour deconvolution, source_view: haematoxylin), which "
                   "is what it is given of an H&E at inference. DeepLIIF's ROI_127 is held out whole.",
    "demo-text2he": "256-px crops at 0.5 um/px (20x) of real H&E: MoNuSeg's 40 TCGA tiles (ten organs, 17 frozen "
                    "and 23 FFPE sections, 40x, resampled; Kumar et al., CC BY-NC-SA 4.0: non-commercial, share "
                    "alike) and GlaS's 145 graded colon images (20x; Warwick-QU, research use only, non-commercial). "
                    "Captions from the TCGA barcode (frozen/FFPE, cancer type) and the GlaS grades. Held out: every "
                    "fifth MoNuSeg slide of each preparation and every fifth GlaS patient, whole (189 crops). "
                    "Because the training data are non-commercial, so are these weights.",
    "demo-he2ihc-flow": "BIRL's mouse-lung lesion pair (Borda/BIRL, data-images/lesions_/scale-5pc; BSD-3-Clause; "
                        "CIMA/ANHIR data; configs/demo-he2ihc-birl.yaml's data): H&E and the consecutive proSPC IHC "
                        "section at ~4.6 um/px, the IHC registered by an affine fit to the 78 manual landmarks; left "
                        "70 % trains, right 30 % held out. First an IHC generator learns "
                        "to draw IHC tiles from their own token embeddings (configs/demo-ihc-generator.yaml; bundled "
                        "in generator/), then the flow learns to carry each place's H&E tokens to its IHC tokens in "
                        "that generator's frozen token space.",
    "demo-he2he": "The real H&E of demo-text2he, each crop its own reference image: 256-px crops at 0.5 um/px (20x) "
                  "of MoNuSeg's 40 TCGA tiles (ten organs, frozen and FFPE, 40x resampled; Kumar et al., CC BY-NC-SA "
                  "4.0: non-commercial, share alike) and GlaS's 145 colon images (Warwick-QU, research use only, "
                  "non-commercial). Held out: every fifth MoNuSeg slide of each preparation and every fifth GlaS "
                  "patient, whole (189 crops). Because the training data are non-commercial, so are these weights.",
}


LIMITS = {
    "demo-text2he": "a 6 M-parameter model trained from about 1,000 real crops (steps and hardware above; ten "
                    "organs, mostly colon). In the latent space of the pretrained TAEF2 codec it draws H&E colour "
                    "and texture (stroma fibres, dark nuclear blobs), not yet tissue a pathologist would take for "
                    "real (docs/evaluation.md: held-out KID x1000 223 vs 26 for real crops, 475 for the previous "
                    "pixel-codec model); the caption barely steers it (held-out denoising loss above: with vs "
                    "without the caption) and does not separate benign from malignant colon. More training, on "
                    "a GPU, is the next step. Judge nothing clinical by it.",
    "demo-he2ihc": "it has never seen an H&E and an IHC of the same cells: it learnt IHC from the haematoxylin "
                   "of real IHC, so on an H&E it keeps the nuclei and counterstain and guesses which nuclei are "
                   "Ki67-positive from their look alone (size, darkness, texture). It cannot know a marker's true "
                   "status, and its held-out DAB scores are measured on the haematoxylin of real IHC, which carries "
                   "a faint trace of DAB (colour deconvolution leaks some into the haematoxylin of a positive "
                   "nucleus) that an H&E does not: on H&E its positivity is a guess. Ki67 only, two tissues (lung "
                   "and OS-2), four scanners. A 2-step student: held out it is within 5 % of its teacher at 250 "
                   "steps on every measure (docs/benchmarks.md). docs/evaluation.md compares it with pix2pix, "
                   "CycleGAN and arithmetic floors on the held-out region: at 2 steps KID x1000 79 vs 121 (pix2pix) "
                   "and 221 (CycleGAN); DAB box PCC 0.62 for one sample and 0.79 for the mean of 4 (`--samples 4`) "
                   "vs 0.73 and 0.84. Judge nothing clinical by it.",
    "demo-he2he": "a 6 M-parameter model trained on about 1,000 real crops on a CPU. The reference reaches it as a "
                  "4x4 grid of tokens from its TAEF2 latent: a variation keeps the reference's colour, layout and "
                  "kind of tissue, not its cells, and its texture is still coarser than real H&E (held-out KID x1000 "
                  "263 vs 570 for the previous model, 26 for real crops; docs/evaluation.md). Synthetic data made "
                  "with it are for experiments on the pipeline; judge nothing clinical by it.",
    "demo-he2mif": "one 512-px training panel (three quarters of it) from one lung sample: the model has seen "
                   "one tissue, one scanner and one IHC stain as its input. Marker maps are predicted from the "
                   "brightfield (Ki67 IHC) image's texture and colour; a membrane marker (Lap2beta) is the hard "
                   "one. Compare with the colour-deconvolution floor in docs/evaluation.md before trusting any "
                   "marker. Judge nothing clinical by it.",
}


def _default_limits(config) -> str:
    if str(config.vae).startswith("pixel-unshuffle"):
        return ("a 4 M-parameter model trained for minutes on a CPU from one or a few images; it shows the tool "
                "end to end. It works in a lossless pixel-space codec, one token per 8x8 pixels, so its outputs "
                "show 8-px blocks. Judge nothing clinical by it.")
    return "a small model trained on a CPU from a few real images; it shows the tool end to end. Judge nothing clinical by it."


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def training_seconds(config_path: Path) -> float | None:
    import csv

    from mupad_core.train.config import load_config

    metrics = load_config(config_path).run_dir / "metrics.csv"
    with metrics.open() as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[-1]["elapsed_s"]) if rows and rows[-1].get("elapsed_s") else None


def evaluate(model: Path, config_path: Path, kind: str) -> dict:
    """Held-out numbers of the bundled copy itself (the half-precision weights that ship)."""
    from mupad_core.evaluate.heldout import evaluate_heldout, heldout_denoising_loss
    from mupad_core.train.config import load_config

    config = load_config(config_path)
    manifest = config.resolve(config.data.manifest)
    if kind == "stain":  # at the steps the model is made for (a few-step student records its own)
        from mupad_core.generate.config import model_defaults

        return evaluate_heldout(model, manifest, config.task, config.data.mpp,
                                steps=model_defaults(str(model)).get("steps", 20))
    # Large held-out sets (he_atlas: 189 crops) need fewer noise draws per image for a stable mean.
    large = len(manifest.read_text().splitlines()) > 500
    return heldout_denoising_loss(model, manifest, crop_px=config.data.crop_px,
                                  **({"times": 4, "seeds": 2} if large else {}))


def store_half_precision(folder: Path) -> None:
    """Store the floating-point weights as float16: half the bytes in the repository (all demo
    models together stay under 50 MB). Loading copies them into the float32 model."""
    from safetensors.torch import load_file, save_file

    for path in folder.rglob("*.safetensors"):
        state = load_file(str(path))
        save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()}, str(path))


def _model_line(name: str, config) -> str:
    if config.model.get("kind") != "embedding-flow":
        return f"MupadSiT {config.model}"
    from mupad_core.train.config import load_config

    generator = load_config(REPO / PARTS[name][0])
    return (f"EmbeddingFlow (an MLP of depth {config.model.get('depth')}, width {config.model.get('hidden_size')}) "
            f"on the token embeddings of its IHC generator, bundled in `{PARTS[name][1]}/` "
            f"(MupadSiT {generator.model}, image stream {generator.conditions['image']})")


def _distill_line(name: str, config) -> str:
    from mupad_core.train.config import load_config

    teacher = load_config(REPO / TEACHERS[name])
    record = json.loads((teacher.run_dir / "config.json").read_text())
    trained = json.loads((teacher.run_dir / "model" / "mupad_pipeline.json").read_text())["trained_steps"]
    d = config.distill
    return (f"- **Distilled** (reflow): the teacher is trained first by `{TEACHERS[name]}` ({trained} steps, batch "
            f"{teacher.train.batch_size}, fingerprint {record['fingerprint']}; not bundled). Each training pair is the "
            f"teacher's {d.teacher_steps}-step Euler sample from one noise draw; the student, started from the "
            f"teacher's weights, learns the straight path between them, so it samples in {d.student_steps} steps "
            "(its recorded default; `--steps` overrides it).")


def card(name: str, config_path: Path, metrics: dict, seconds: float | None) -> str:
    from mupad_core.train.config import load_config

    config = load_config(config_path)
    rows = json.loads((config.run_dir / "config.json").read_text())
    steps = json.loads((config.run_dir / "model" / "mupad_pipeline.json").read_text())["trained_steps"]
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"
    lines = [
        f"# {name}",
        "",
        f"Demo weights for `{config.task}`, trained by napari-mupad's `mupad train` — generated images are "
        "not for diagnosis.",
        "",
        f"- **Data**: {DATA_NOTES[name]}",
        f"- **Model**: {_model_line(name, config)}, codec `{config.vae}`"
        + (", source latent as spatial template" if config.template and name not in PARTS else "")
        + (f", condition streams: {', '.join(config.conditions)}" if config.conditions else "") + ".",
        f"- **Training**: {steps} steps, global batch {config.train.batch_size}, {config.data.crop_px or config.data.patch_px}-px "
        f"crops, AdamW lr {config.train.lr} ({config.train.lr_schedule}), EMA {config.train.ema_decay}; "
        f"config `{config_path.relative_to(REPO)}` (fingerprint {rows['fingerprint']}).",
        *([_distill_line(name, config)] if config.distill.teacher else []),
        f"- **Hardware**: {hardware}" + (f"; {seconds / 60:.0f} min" if seconds else "")
        + (" (teacher included)" if seconds and name in TEACHERS else " (both parts)" if seconds and name in PARTS
           else "") + ".",
        f"- **Held-out** ({metrics.get('split', 'val')}):",
        "",
        "```json",
        json.dumps(metrics, indent=2),
        "```",
        "",
        "Reproduce: `python -m mupad_core.demo_data --shared ../shared/data --out runs/demo-data`, then "
        f"`python scripts/build_demo_models.py --only {name}` (same config and seed give the same weights on the "
        "same hardware and thread count).",
        "",
        "Weights are stored as float16 (the model runs in float32); the held-out numbers above are "
        "those of these stored weights.",
        "",
        "Limits: " + LIMITS.get(name, _default_limits(config)),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(DEMO_MODELS))
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--steps", type=int, help="train this many steps instead of the configs' (a GPU affords "
                        "20-50x the CPU budget: e.g. --steps 50000 for demo-text2he on one H100)")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    run([sys.executable, "-m", "mupad_core.demo_data", "--shared", args.shared, "--out", "runs/demo-data"])
    for name in args.only or [n for n in DEMO_MODELS if n not in OPTIONAL]:
        config_path, kind = DEMO_MODELS[name]
        config_path = REPO / config_path
        from mupad_core.train.config import load_config

        part = PARTS.get(name)
        if not args.skip_train:
            if name in TEACHERS:
                run([sys.executable, "-m", "mupad_core.cli", "train", str(REPO / TEACHERS[name]), "--resume", "--quiet"])
            if part:
                run([sys.executable, "-m", "mupad_core.cli", "train", str(REPO / part[0]), "--resume", "--quiet"])
            run([sys.executable, "-m", "mupad_core.cli", "train", str(config_path), "--resume", "--quiet",
                 *(["--steps", str(args.steps)] if args.steps else [])])
        seconds = training_seconds(config_path)
        for first in ([part[0]] if part else []) + ([TEACHERS[name]] if name in TEACHERS else []):
            seconds = (seconds or 0) + (training_seconds(REPO / first) or 0) or None

        source = load_config(config_path).run_dir / "model"
        target = BUNDLED / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        if part:  # the part travels inside; the flow records it by its folder name
            shutil.copytree(load_config(REPO / part[0]).run_dir / "model", target / part[1])
            pipeline_path = target / "mupad_pipeline.json"
            pipeline = json.loads(pipeline_path.read_text())
            pipeline["generator"] = part[1]
            pipeline_path.write_text(json.dumps(pipeline, indent=2))
        store_half_precision(target)
        metrics = evaluate(target, config_path, kind)
        print(json.dumps(metrics, indent=2))
        (target / "README.md").write_text(card(name, config_path, metrics, seconds))
        (target / "heldout.json").write_text(json.dumps(metrics, indent=2))
        print(f"bundled {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
