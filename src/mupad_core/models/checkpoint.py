"""MUPAD checkpoints: a folder with `config.json` + safetensors weights.

The layout is diffusers' (ModelMixin/ConfigMixin `save_pretrained`), so a checkpoint
can live on a model hub and be loaded by id. Loading never unpickles and never runs
remote code; every way a checkpoint can be wrong ends in a `CheckpointError` that
names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .sit import MupadSiT

def _unet():
    from diffusers import UNet2DModel

    return UNet2DModel


def _embedding_flow():
    from .embedding_flow import EmbeddingFlow

    return EmbeddingFlow


# Classes a MUPAD checkpoint folder may hold: the denoiser, the one-pass baselines (a
# U-Net), and the embedding-space H&E->IHC flow. None: imported on first use.
MODEL_CLASSES = {"MupadSiT": MupadSiT, "UNet2DModel": None, "EmbeddingFlow": None}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a hub download of a MUPAD checkpoint fetches: never pickles, never the whole repo.
CHECKPOINT_FILES = ("config.json", "*.safetensors", "mupad_pipeline.json", "README.md")


class CheckpointError(ValueError):
    pass


PIPELINE_FILE = "mupad_pipeline.json"


def save_model(model: MupadSiT, folder: str | Path, *, card: str | None = None, pipeline: dict | None = None) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (+ README.md card).

    `pipeline` records what the denoiser needs around it to run (its latent codec, e.g.
    {"vae": "pixel-unshuffle:2"}, and the tasks it was trained for) in mupad_pipeline.json.
    """
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if card is not None:
        (folder / "README.md").write_text(card)
    if pipeline is not None:
        (folder / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2))
    return folder


def read_pipeline(folder: str | Path) -> dict:
    path = Path(folder) / PIPELINE_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(folder)}: no {PIPELINE_FILE} — cannot tell which VAE this model was trained with")
    try:
        pipeline = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if "vae" not in pipeline:
        raise CheckpointError(f"{path}: no 'vae' entry")
    return pipeline


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise CheckpointError(
            f"{folder}: only pickled weights ({', '.join(pickled)}); MUPAD loads safetensors only "
            "(convert with safetensors.torch.save_file on a machine you trust)"
        )
    raise CheckpointError(f"{folder}: no weights file (expected {' or '.join(WEIGHT_NAMES)})")


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json — not a MUPAD checkpoint folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return config


def load_model(path_or_id: str | Path, *, device=None, dtype=None) -> MupadSiT:
    """Load a MUPAD denoiser from a local folder or a hub id (cached under MUPAD_HOME)."""
    from ..hub import resolve_pretrained

    folder = Path(resolve_pretrained(str(path_or_id), CHECKPOINT_FILES))
    config = read_config(folder)
    class_name = config.get("_class_name", "MupadSiT")
    if class_name not in MODEL_CLASSES:
        raise CheckpointError(
            f"{folder / 'config.json'}: model class {class_name!r} is not a MUPAD model "
            f"(known: {', '.join(MODEL_CLASSES)})"
        )
    cls = MODEL_CLASSES[class_name] or (_embedding_flow() if class_name == "EmbeddingFlow" else _unet())
    try:
        model = cls.from_config(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: invalid model config ({exc})") from exc
    wfile = weights_file(folder)
    try:
        state = load_file(wfile)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{wfile}: damaged or truncated safetensors file ({exc})") from exc
    check_state_dict(model, state, wfile)
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def state_dict_problems(model: torch.nn.Module, state: dict) -> list[str]:
    """What keeps `state` from loading strictly into `model`: missing, unexpected and misshapen tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {'; '.join(mismatched[:3])}")
    return problems


def check_state_dict(model: torch.nn.Module, state: dict, source: Path) -> None:
    problems = state_dict_problems(model, state)
    if problems:
        raise CheckpointError(f"{source}: weights do not match config.json — " + "; ".join(problems))


def weights_sha256(path_or_folder: str | Path) -> str:
    """Hash of the weights file, for provenance in generated outputs."""
    p = Path(path_or_folder)
    p = weights_file(p) if p.is_dir() else p
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
