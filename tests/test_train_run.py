"""`mupad train`: a tiny config on the bundled slide; exact resume; one process vs torchrun."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mupad_core.cli import main
from mupad_core.demo import sample_slide_path
from mupad_core.train.config import ConfigError, load_config
from mupad_core.train.run import train

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, name: str = "run", **overrides) -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny-he2he.yaml").read_text())
    config["name"] = name
    config["out_dir"] = str(tmp_path / "runs")
    config["data"]["slides"] = [str(sample_slide_path())]
    config["data"]["patch_px"] = 32
    config["train"].update(steps=8, checkpoint_every=3, log_every=1)
    for section, values in overrides.items():
        if isinstance(values, dict) and section != "conditions":  # conditions are replaced whole
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def weights(run_dir: Path, what: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / what / "diffusion_pytorch_model.safetensors"))


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_the_committed_tiny_config_parses():
    config = load_config(REPO / "configs" / "tiny-he2he.yaml")
    assert config.task == "he2he" and config.conditions["image"]["encoder"] == "builtin"
    assert Path(config.resolve(config.data.slides[0])).is_file()


def test_tiny_config_trains_and_the_loss_falls(tmp_path):
    config = load_config(write_config(tmp_path, train={"steps": 30, "log_every": 1, "checkpoint_every": 30}))
    result = train(config, progress_bar=False, log=lambda m: None)
    losses = [r["loss_total"] for r in result.history]
    assert len(losses) == 30
    assert sum(losses[-10:]) / 10 < 0.95 * sum(losses[:5]) / 5, losses  # 1.22 -> 1.11 when written
    model_dir = result.model_dir
    assert (model_dir / "config.json").is_file() and (model_dir / "mupad_pipeline.json").is_file()
    assert (model_dir / "image_encoder.safetensors").is_file()
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    from mupad_core.models.checkpoint import load_model

    assert load_model(model_dir).config.condition_dims == {"image": 32}


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    whole = train(load_config(write_config(tmp_path, "whole")), progress_bar=False, log=lambda m: None)
    path = write_config(tmp_path, "split")
    first = train(load_config(path), stop_after=5, progress_bar=False, log=lambda m: None)
    assert first.model_dir is None and not (first.run_dir / "model").exists()  # nothing looks finished
    # Step 5 is past the step-3 checkpoint: the resume redoes steps 4-5 and drops their log rows.
    second = train(load_config(path), resume=True, progress_bar=False, log=lambda m: None)
    assert second.resumed_from == 3
    a, b = weights(whole.run_dir), weights(second.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    cols = ("step", "loss_total", "grad_norm", "lr")
    assert [[r[c] for c in cols] for r in metrics(whole.run_dir)] == [[r[c] for c in cols] for r in metrics(second.run_dir)]


def test_resume_refuses_a_changed_config_and_a_run_is_not_overwritten(tmp_path):
    path = write_config(tmp_path, "r")
    train(load_config(path), stop_after=3, progress_bar=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="already here; pass --resume"):
        train(load_config(path), progress_bar=False, log=lambda m: None)
    changed = load_config(path)
    changed.train.lr = 0.5
    with pytest.raises(ConfigError, match="config changed"):
        train(changed, resume=True, progress_bar=False, log=lambda m: None)


def test_config_mistakes_name_the_file_and_key(tmp_path, capsys):
    path = write_config(tmp_path, "bad", train={"stepz": 3})
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mupad: error:") and "bad.yaml: train: unknown key(s) stepz" in err and "\n" not in err
    path = write_config(tmp_path, "bad2", task="he2xyz")
    assert main(["train", str(path)]) == 1
    assert "bad2.yaml: task: 'he2xyz' is not one of" in capsys.readouterr().err


def test_torchrun_two_processes_match_one_process(tmp_path):
    """gloo on CPU: 2 processes x 4 items = 1 process x 8 items, up to float summation order."""
    path = write_config(tmp_path, "ddp", train={"steps": 3, "checkpoint_every": 3, "ema_decay": None})
    single = train(load_config(write_config(tmp_path, "single", train={"steps": 3, "checkpoint_every": 3,
                                                                       "ema_decay": None})),
                   progress_bar=False, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "mupad_core.cli", "train", str(path), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = weights(single.run_dir), weights(tmp_path / "runs" / "ddp")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - weights(single.run_dir, "checkpoints/step_00000003/model")[k]).abs().max()) for k in a)
    assert moved == 0  # the exported model is the last checkpoint's
    assert worst < 1e-5, worst
    rows_a, rows_b = metrics(single.run_dir), metrics(tmp_path / "runs" / "ddp")
    for ra, rb in zip(rows_a, rows_b):
        assert abs(float(ra["loss_total"]) - float(rb["loss_total"])) < 1e-5


def test_rna_and_text_conditioned_config_trains(tmp_path, shared_data):
    """RNA pathway tokens from the real TCGA table and MiniLM captions feed their own streams."""
    import pandas as pd

    table = shared_data / "expression" / "tcga_blca_xena_rna_clean_first24.csv"
    sample = str(pd.read_csv(table, usecols=[0]).iloc[3, 0])
    path = write_config(
        tmp_path, "rna",
        task="rna2he",
        conditions={"rna": {"table": str(table)}, "text": {"encoder": "minilm"}},
        data={"rna_ids": [sample], "captions": ["H&E, squamous epithelium"]},
        train={"steps": 2, "checkpoint_every": 2},
    )
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    from mupad_core.models.checkpoint import load_model

    model = load_model(result.model_dir)
    assert set(model.config.condition_dims) == {"rna", "text"}
    assert model.config.condition_tokens["rna"] == 331
    assert all(torch.isfinite(torch.tensor(r["loss_total"])) for r in result.history)


def test_unknown_rna_id_names_the_table(tmp_path, shared_data):
    table = shared_data / "expression" / "tcga_blca_xena_rna_clean_first24.csv"
    path = write_config(tmp_path, "rna_bad", task="rna2he", conditions={"rna": {"table": str(table)}},
                        data={"rna_ids": ["NOT-A-PATIENT"]}, train={"steps": 1})
    with pytest.raises(ConfigError, match="tcga_blca_xena_rna_clean_first24.csv: RNA id"):
        train(load_config(path), progress_bar=False, log=lambda m: None)


def test_teacher_feeds_the_alignment_and_cls_losses(tmp_path):
    """`teacher:` (the offline FID InceptionV3) drives REPA-style alignment and REG's CLS loss."""
    path = write_config(tmp_path, "teach", template="source", conditions={},
                        teacher={"encoder": "inception", "input_size": 75, "layer": "mixed_2"},
                        loss={"cls_weight": 0.1, "align_weight": 0.5},
                        train={"steps": 25, "batch_size": 4, "checkpoint_every": 25})
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    rows = metrics(result.run_dir)
    assert {"loss_cls", "loss_align", "loss_velocity"} <= set(rows[0])
    align = [float(r["loss_align"]) for r in rows]
    cls = [float(r["loss_cls"]) for r in rows]
    # The projector learns to point at the teacher's patch features (cosine from ~0 towards 1),
    # and the CLS velocity is learnt: both fall.
    assert sum(align[-5:]) / 5 < sum(align[:3]) / 3 - 0.05, align
    assert sum(cls[-5:]) / 5 < sum(cls[:3]) / 3, cls
    for r in rows:
        total = float(r["loss_velocity"]) + 0.1 * float(r["loss_cls"]) + 0.5 * float(r["loss_align"])
        assert abs(float(r["loss_total"]) - total) < 1e-4

    from mupad_core.generate.engine import StainConfig, run_stain
    from mupad_core.generate.handles import load_handle
    from mupad_core.models.checkpoint import load_model, read_pipeline
    from mupad_core.slide import open_slide

    model = load_model(result.model_dir)
    assert model.config.cls_dim == 2048 and model.config.align_dim == 288 and model.config.align_depth == 1
    assert read_pipeline(result.model_dir)["teacher"]["encoder"] == "inception"
    # The engine generates each window's CLS token with it; splitting the region into
    # blocks leaves every pixel unchanged (each window keeps one CLS trajectory).
    handle = load_handle(str(result.model_dir), "he2he")
    outputs = []
    for block in (128, 64):
        out = tmp_path / f"cls-{block}.ome.zarr"
        config = StainConfig(task="he2he", roi=(600, 600, 256, 256), target_mpp=1.0, steps=3, seed=1,
                             window_px=32, overlap_px=16, block_px=block, chunk_px=64, margin_px=32,
                             skip_background=False)
        with open_slide(sample_slide_path()) as reader:
            run_stain(reader, handle, out, config)
        import zarr

        outputs.append(zarr.open_group(out, mode="r")["0"][:])
    assert min(outputs[0].shape[-2:]) > 100 and outputs[0].std() > 0
    assert (outputs[0] == outputs[1]).all()


def test_teacher_mistakes_are_named(tmp_path, capsys):
    path = write_config(tmp_path, "bad", teacher={"encoder": "inception", "layer": "mixed_99"})
    with pytest.raises(ConfigError, match="teacher.*mixed_99"):
        train(load_config(path), progress_bar=False, log=lambda m: None)
    path = write_config(tmp_path, "nothing", teacher={"encoder": "inception", "align": False, "cls": False})
    with pytest.raises(ConfigError, match="teach nothing"):
        load_config(path)
    path = write_config(tmp_path, "orphan", model={"align_depth": 1})
    with pytest.raises(ConfigError, match="teacher"):
        load_config(path)


def test_latent_cache_feeds_training_and_refuses_another_teacher(tmp_path):
    """`data.cache`: latents and teacher features encoded once into zarr, then trained from."""
    cache = tmp_path / "cache.zarr"
    path = write_config(tmp_path, "cached", template="source", conditions={},
                        data={"cache": str(cache), "length": 16, "hed_scale": 0.0, "hed_shift": 0.0},
                        teacher={"encoder": "inception", "input_size": 75, "layer": "mixed_2"},
                        train={"steps": 12, "batch_size": 4, "checkpoint_every": 12})
    logs: list[str] = []
    result = train(load_config(path), progress_bar=False, log=logs.append)
    assert any("latent cache" in m for m in logs) and cache.is_dir()
    import zarr

    group = zarr.open_group(cache, mode="r")
    assert group["features"].shape == (16, 288, 7, 7) and group["features_pooled"].shape == (16, 2048)
    assert set(group["latents"].keys()) == {"latent", "source_latent"}
    rows = metrics(result.run_dir)
    assert len(rows) == 12 and all(float(r["loss_align"]) < 0.5 for r in rows)
    assert result.model_dir is not None

    from mupad_core.train.latent_cache import LatentCacheError

    other = write_config(tmp_path, "other", template="source", conditions={},
                         data={"cache": str(cache), "length": 16, "hed_scale": 0.0, "hed_shift": 0.0},
                         teacher={"encoder": "inception", "input_size": 75, "layer": "mixed_7"},
                         train={"steps": 2, "batch_size": 4})
    with pytest.raises(LatentCacheError, match="cache.zarr"):
        train(load_config(other), progress_bar=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(write_config(tmp_path, "img", data={"cache": str(cache)}))
