"""The pix2pix-style baseline: trained by `mupad train`, run by the whole-slide engine in one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from mupad_core.demo import sample_slide_path
from mupad_core.train.config import ConfigError, load_config
from mupad_core.train.run import train

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "configs" / "baseline-he2ihc-pix2pix.yaml").read_text())
    config.update(name="p2p", out_dir=str(tmp_path / "runs"), task="he2he",
                  model={"kind": "pix2pix", "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4},
                  data={"kind": "slides", "slides": [str(sample_slide_path())], "patch_px": 32, "mpp": 1.0,
                        "length": 64})
    config["train"].update(steps=8, batch_size=4, lr=2.0e-3, warmup_steps=0, checkpoint_every=4, log_every=1)
    config.update(changes)
    path = tmp_path / "p2p.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pix2pix_trains_and_the_engine_returns_its_one_pass_prediction(tmp_path):
    from mupad_core.generate.engine import StainConfig, run_stain
    from mupad_core.generate.handles import OnePassHandle, load_handle
    from mupad_core.models.baselines import predict
    from mupad_core.models.vae import PixelUnshuffleCodec
    from mupad_core.slide.readers import open_slide

    result = train(load_config(_config(tmp_path)), progress_bar=False, log=lambda m: None)
    losses = [r["loss_l1"] for r in result.history]
    assert len(losses) == 8 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    handle = load_handle(str(result.model_dir), "he2he")
    assert isinstance(handle, OnePassHandle)

    roi = (1200, 1760, 64, 64)
    with open_slide(sample_slide_path()) as reader:
        out = run_stain(reader, handle, tmp_path / "p2p.ome.zarr",
                        StainConfig(task="he2he", roi=roi, steps=3, window_px=64, overlap_px=0, margin_px=0,
                                    block_px=64, chunk_px=64, skip_background=False))
        source = torch.from_numpy(reader.read_region(0, *roi)).permute(2, 0, 1).float()[None] / 255
    codec = PixelUnshuffleCodec(1)
    with torch.no_grad():
        direct = codec.decode(predict(handle.model, codec.encode(source)))[0].clamp(0, 1)
    expected = (direct * 255).round().byte().permute(1, 2, 0).numpy()
    written = zarr.open_group(str(out), mode="r")["0"][:].transpose(1, 2, 0)
    assert np.abs(written.astype(int) - expected).max() <= 1  # Euler steps land on the one-pass prediction
    provenance = zarr.open_group(str(out), mode="r").attrs["mupad"]
    assert provenance["model_id"] == str(result.model_dir)


def test_pix2pix_without_a_source_template_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pix2pix maps the source to the target"):
        load_config(_config(tmp_path, template=None))


def test_cyclegan_trains_unpaired_and_exports_its_translator(tmp_path):
    """CycleGAN-style baseline: every loss term logged, discriminators never moved by the generator loss,
    the exported source->target U-Net run by the engine like pix2pix."""
    from mupad_core.generate.handles import OnePassHandle, load_handle
    from mupad_core.models.baselines import build_cyclegan, cyclegan_loss

    # One backward of the summed loss: generator terms move only the generators, the
    # discriminator term only the discriminators.
    net = build_cyclegan({"block_out_channels": [8, 16], "norm_num_groups": 4, "disc_width": 8}, 3, 3, seed=0)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    terms = cyclegan_loss(net, a, b)
    generator_loss = terms.adversarial + 10 * terms.cycle + 5 * terms.identity
    grads = torch.autograd.grad(generator_loss, list(net.d_a.parameters()) + list(net.d_b.parameters()),
                                allow_unused=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(terms.discriminator, list(net.g_ab.parameters()), allow_unused=True)
    assert all(g is None for g in grads)

    path = _config(tmp_path, model={"kind": "cyclegan", "block_out_channels": [8, 16], "layers_per_block": 1,
                                    "norm_num_groups": 4, "disc_width": 8})
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    rows = result.history
    assert {"loss_adversarial", "loss_cycle", "loss_identity", "loss_discriminator"} <= set(rows[0])
    assert rows[-1]["loss_cycle"] < rows[0]["loss_cycle"]  # the round trip is learnt first
    handle = load_handle(str(result.model_dir), "he2he")
    assert isinstance(handle, OnePassHandle) and type(handle.model).__name__ == "UNet2DModel"
    assert sum(p.numel() for p in handle.model.parameters()) < sum(p.numel() for p in net.parameters())


@pytest.mark.slow
def test_the_demo_report_puts_mupad_beside_both_baselines_at_test_size(shared_data, tmp_path, capsys):
    """scripts/report_demo_he2ihc.py end to end on the real held-out Ki67 IHC, with baselines trained
    for a few steps by their committed configs: one report, three rows, figures written where asked."""
    import importlib.util
    import json

    from mupad_core.demo_data import prepare_ki67_ihc

    from PIL import Image

    data = prepare_ki67_ihc(shared_data, tmp_path / "demo-data", copies=1)
    held_out = data / "roi127.png"  # a 384-px corner of it (9 tiles) keeps the test short
    Image.open(held_out).crop((0, 0, 384, 384)).save(held_out)
    folders = {}
    for kind in ("pix2pix", "cyclegan"):
        config = yaml.safe_load((REPO / "configs" / f"baseline-he2ihc-ki67-{kind}.yaml").read_text())
        config.update(out_dir=str(tmp_path / "runs"))
        config["model"].update(block_out_channels=[8, 16], norm_num_groups=4)
        config["data"]["manifest"] = str(data / "manifest.csv")
        config["train"].update(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=2, log_every=1)
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(config))
        folders[kind] = train(load_config(path), progress_bar=False, log=lambda m: None).model_dir
    spec = importlib.util.spec_from_file_location("report_demo_he2ihc", REPO / "scripts" / "report_demo_he2ihc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--data", str(data), "--baseline", str(folders["pix2pix"]), "--cyclegan",
                           str(folders["cyclegan"]), "--steps", "2", "--tile", "128", "--out", str(tmp_path / "report"),
                           "--figures", str(tmp_path / "figures"), "--resamples", "10"])
    names = [entry["name"] for entry in results["sets"]]
    assert names == ["MUPAD demo-he2ihc", "pix2pix baseline", "CycleGAN baseline"]
    assert all(entry["paired"]["tiles"] == results["reference"]["tiles"] >= 4 for entry in results["sets"])
    assert results["reference"]["ihc"]["hscore"] > 0 and all("ihc" in entry for entry in results["sets"])  # DAB scored
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in names)
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == results
    assert (tmp_path / "figures" / "eval-demo-he2ihc-grid.png").is_file()
