"""The embedding-space H&E->IHC flow (paper eq. 6): a 6-layer MLP between token embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
import zarr

from mupad_core.demo import sample_slide_path
from mupad_core.models.embedding_flow import EmbeddingFlow, embedding_flow_loss


def test_flow_starts_as_identity_and_learns_a_known_translation():
    torch.manual_seed(0)
    flow = EmbeddingFlow(embed_dim=8, hidden_size=64, depth=6)
    assert sum(isinstance(m, torch.nn.Linear) for m in [flow.inp, *flow.hidden, flow.out]) == 6
    tokens = torch.randn(4, 5, 8)
    assert torch.equal(flow.translate(tokens), tokens)  # zero-initialised output layer
    shift = torch.linspace(-1, 1, 8)
    # A well-posed translation (stain-like: each feature rescaled and shifted; a map through
    # a singular point mid-way, such as a reflection, has no straight-line flow).
    mix = torch.eye(8) * torch.linspace(0.5, 1.5, 8) + 0.1 * torch.randn(8, 8)
    optimizer = torch.optim.AdamW(flow.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        he = torch.randn(32, 4, 8, generator=generator)
        ihc = he @ mix.T + shift
        loss = embedding_flow_loss(flow, he, ihc, generator).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    he = torch.randn(64, 4, 8, generator=generator)
    error = (flow.translate(he, steps=16) - (he @ mix.T + shift)).pow(2).mean()
    assert error < 0.1 * (he - (he @ mix.T + shift)).pow(2).mean(), float(error)


def test_mupad_train_fits_a_flow_for_a_generator_and_the_engine_runs_the_pair(tmp_path):
    from mupad_core.generate.engine import StainConfig, run_stain
    from mupad_core.generate.handles import load_handle
    from mupad_core.models.checkpoint import load_model, read_pipeline
    from mupad_core.slide import open_slide
    from mupad_core.train.config import ConfigError, load_config
    from mupad_core.train.run import train

    slide = str(sample_slide_path())
    config = {"name": "flow", "out_dir": str(tmp_path / "runs"), "task": "he2ihc", "template": "source",
              "model": {"kind": "embedding-flow", "generator": "demo-he2he", "hidden_size": 64, "depth": 6},
              "data": {"kind": "slides", "slides": [slide], "targets": [slide], "patch_px": 64, "mpp": 0.5,
                       "length": 32, "hed_scale": 0.05, "hed_shift": 0.01},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1}}
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    pipeline = read_pipeline(result.model_dir)
    assert pipeline["kind"] == "embedding-flow" and pipeline["generator"] == "demo-he2he"
    flow = load_model(result.model_dir)
    assert type(flow).__name__ == "EmbeddingFlow" and flow.config.embed_dim == 64  # the generator's token size

    roi = (1000, 1400, 128, 128)

    def run(handle, name):
        stain = StainConfig(task="he2ihc", roi=roi, target_mpp=0.5, steps=3, seed=1, window_px=64, overlap_px=16,
                            block_px=128, chunk_px=64, margin_px=0, skip_background=False)
        with open_slide(slide) as reader:
            out = run_stain(reader, handle, tmp_path / f"{name}.ome.zarr", stain)
        return zarr.open_group(out, mode="r")["0"][:].astype(int), zarr.open_group(out, mode="r").attrs["mupad"]

    translated, provenance = run(load_handle(str(result.model_dir), "he2ihc"), "translated")
    assert provenance["model_id"] == str(result.model_dir)
    # The same pair from the command line, as a user selects the flow: --model FLOW_FOLDER.
    from mupad_core.cli import main

    code = main(["stain", slide, "-o", str(tmp_path / "cli.ome.zarr"), "--task", "he2ihc", "--model",
                 str(result.model_dir), "--roi", *map(str, roi), "--target-mpp", "0.5", "--steps", "3", "--seed", "1",
                 "--window-px", "64", "--overlap-px", "16", "--quiet"])
    assert code == 0
    cli = zarr.open_group(str(tmp_path / "cli.ome.zarr"), mode="r")
    assert cli.attrs["mupad"]["model_id"] == str(result.model_dir) and cli["0"].shape == (3, 128, 128)
    plain, _ = run(load_handle("demo-he2he", "he2he"), "plain")
    assert np.abs(translated - plain).mean() > 0  # the tokens went through the trained flow
    # A flow with a zeroed output layer is the identity: the pair then equals the generator alone.
    handle = load_handle(str(result.model_dir), "he2ihc")
    identity = EmbeddingFlow(**{k: v for k, v in flow.config.items() if not k.startswith("_")})
    handle.token_map = lambda tokens: identity.translate(tokens)
    assert np.array_equal(run(handle, "identity")[0], plain)

    bad = dict(config, model={"kind": "embedding-flow"})
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="model.generator"):
        load_config(path)
