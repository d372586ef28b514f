"""H&E->mIF with more than three markers: markers grouped by three through one RGB codec,
the N-channel result written with its marker names and opened as N coloured layers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from PIL import Image

from mupad_core.models.vae import MarkerGroupCodec, PixelUnshuffleCodec, codec_for

MARKERS = ["DAPI", "Lap2beta", "Ki67", "Hematoxylin"]


def test_marker_groups_round_trip_any_channel_count():
    codec = MarkerGroupCodec(PixelUnshuffleCodec(2), 5)
    assert codec.groups == 2 and codec.latent_channels == 24 and codec.latent_channels_for(3) == 12
    markers = torch.rand(2, 5, 16, 16)
    latent = codec.encode(markers)
    assert latent.shape == (2, 24, 8, 8)
    assert torch.allclose(codec.decode(latent), markers, atol=1e-6)  # the padding channel is dropped
    rgb = torch.rand(1, 3, 16, 16)
    assert codec.encode(rgb).shape == (1, 12, 8, 8)  # a brightfield source is one group
    assert isinstance(codec_for("pixel-unshuffle:2", MARKERS), MarkerGroupCodec)
    assert isinstance(codec_for("pixel-unshuffle:2", MARKERS[:3]), PixelUnshuffleCodec)  # three: as before


@pytest.fixture(scope="module")
def four_marker_data(shared_data, tmp_path_factory):
    """DeepLIIF Lung1: Ki67 IHC source; DAPI, Lap2beta, Ki67 mIF and the haematoxylin panel as 4 markers."""
    root = tmp_path_factory.mktemp("mif4")
    panels = np.asarray(Image.open(shared_data / "mif" / "deepliif" / "Lung1.png").convert("RGB"))
    source = panels[:, :512]
    markers = np.stack([panels[:, 1024:1536].mean(-1), panels[:, 1536:2048, 1], panels[:, 2048:2560].mean(-1),
                        255 - panels[:, 512:1024].mean(-1)]).astype(np.uint8)  # (4, H, W)
    Image.fromarray(source[:, :384]).save(root / "train_source.png")
    tifffile.imwrite(root / "train_target.tif", markers[:, :, :384], metadata={"axes": "CYX"})
    Image.fromarray(source[:, 384:]).save(root / "val_source.png")
    (root / "manifest.csv").write_text("source,target,split\ntrain_source.png,train_target.tif,train\n"
                                       "val_source.png,,val\n")
    return root


def test_four_marker_model_trains_and_writes_named_channels(four_marker_data, tmp_path):
    from mupad_core.generate.engine import StainConfig, run_stain
    from mupad_core.generate.handles import load_handle
    from mupad_core.slide import open_slide
    from mupad_core.train.config import load_config
    from mupad_core.train.run import train
    from napari_mupad._reader import read_slide

    config = {
        "name": "mif4", "out_dir": str(tmp_path / "runs"), "task": "he2mif", "vae": "pixel-unshuffle:2",
        "template": "source", "model": {"hidden_size": 64, "depth": 1, "num_heads": 4},
        "channels": MARKERS, "channel_colors": ["0000FF", "00FF00", "FF0000", "FFFFFF"],
        "data": {"kind": "manifest", "manifest": str(four_marker_data / "manifest.csv"), "mpp": 0.25, "crop_px": 32,
                 "target_channels": "native"},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 6, "log_every": 1},
    }
    path = tmp_path / "mif4.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    from mupad_core.models.checkpoint import load_model

    model = load_model(result.model_dir)
    assert model.config.in_channels == 24 and model.config.concat_channels == 12  # 2 marker groups; RGB source
    assert result.history[-1]["loss_total"] < result.history[0]["loss_total"]

    handle = load_handle(str(result.model_dir), "he2mif")
    assert handle.out_channels == 4 and handle.channel_names == MARKERS
    out = tmp_path / "mif4.ome.zarr"
    with open_slide(four_marker_data / "val_source.png", mpp=0.25) as reader:
        run_stain(reader, handle, out, StainConfig(task="he2mif", roi=(0, 0, 64, 64), steps=2, window_px=32,
                                                   overlap_px=8, block_px=64, chunk_px=64, margin_px=32,
                                                   skip_background=False))
    group = zarr.open_group(out, mode="r")
    assert group["0"].shape[0] == 4
    omero = group.attrs["omero"]["channels"]
    assert [c["label"] for c in omero] == MARKERS
    layers = read_slide(str(out))
    names = [meta["name"] for _, meta, _ in layers]
    assert len(layers) == 4 and all(any(m in n for n in names) for m in MARKERS)
    assert all(meta.get("blending") == "additive" for _, meta, _ in layers)
