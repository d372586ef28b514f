"""The `mupad` command: demo end to end on the bundled slide, one-line errors."""

import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from mupad_core.cli import main
from mupad_core.demo import sample_slide_path


def test_every_subcommand_has_working_help(capsys):
    import argparse

    import pytest

    from mupad_core.cli import build_parser
    from mupad_core.tasks import SLIDE_TASKS

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for argv in [["--help"]] + [[name, "--help"] for name in commands]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0, argv
        text = capsys.readouterr().out
        assert "usage: mupad" in text
        if argv[0] == "stain":
            help_text = " ".join(text.split())
            assert all(task in help_text for task in SLIDE_TASKS), "--task lists the tasks it accepts"


def test_bundled_sample_slide_is_real_and_opens():
    import openslide

    slide = openslide.OpenSlide(str(sample_slide_path()))
    assert slide.dimensions == (2220, 2967)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.499
    slide.close()


# Measured 2026-12-07 at the test's 2 steps and 384 px: 0.888 (a model that ignored its input: about 0).
MIN_KI67_DAB_PCC = 0.7


def _dab_at(result: dict, shape: tuple) -> np.ndarray:
    """DAB (colour deconvolution) of the demo's input region, at the output's size."""
    from skimage.color import rgb2hed
    from skimage.transform import resize

    from mupad_core.slide import open_slide

    with open_slide(result["source"]) as reader:
        x, y, w, h = result["roi_level0"]
        rgb = reader.read_region(0, x, y, w, h)
    return resize(rgb2hed(rgb[..., :3])[..., 2], shape, anti_aliasing=True)


def _box_pcc(a: np.ndarray, b: np.ndarray, box: int = 8) -> float:
    def boxes(x):
        h, w = x.shape[0] // box * box, x.shape[1] // box * box
        return x[:h, :w].astype(float).reshape(h // box, box, w // box, box).mean((1, 3)).ravel()

    return float(np.corrcoef(boxes(a), boxes(b))[0, 1])


def test_demo_stains_the_bundled_slide_with_every_bundled_model(tmp_path, capsys):
    from mupad_core.store import validate_omezarr
    from mupad_core.zoo import bundled_models

    entries = bundled_models()
    assert {"he2mif", "he2ihc"} <= {task for e in entries for task in e.tasks}, "demo models are bundled"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-gui", "--steps", "2", "--max-output-px", "384"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["results"]] == [e.id for e in entries]
    for result in summary["results"]:
        validate_omezarr(result["output"])
        group = zarr.open_group(result["output"], mode="r")
        assert group.attrs["mupad"]["model_id"] == result["model"] and group.attrs["mupad"]["generated"] is True
        level0 = group["0"][:]
        assert level0.std() > 1  # the model drew something, not a constant
        if result["task"] == "he2mif":  # it learnt from IHC brightfield: it is given an IHC image
            assert result["channels"] == ["DAPI", "Lap2beta", "Ki67"]
            assert result["source"].endswith("OS-2-Ki67-crop.ome.tif")
            assert group.attrs["mupad"]["kind"] == "fluorescence"
            # Its Ki67 channel lies where the input's DAB does (the Ki67-positive nuclei).
            ki67_follows_dab = _box_pcc(level0[2], _dab_at(result, level0.shape[1:]))
            print(f"demo-he2mif Ki67 vs input DAB, 8-px box PCC: {ki67_follows_dab:.3f}")
            assert ki67_follows_dab > MIN_KI67_DAB_PCC
    preview = np.asarray(Image.open(out / "preview.png"))
    assert preview.shape[0] == 256 * len(entries)
    assert preview[:, : preview.shape[1] // 4].std() > 20  # the real tissue panel
    assert "not for diagnosis" in summary["note"]


def test_models_lists_the_bundled_models_with_their_tasks(capsys):
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    bundled = [m for m in listed if m["source"] == "bundled"]
    assert bundled and all(m["tasks"] and Path(m["path"], "README.md").is_file() for m in bundled)
    assert sum(m["size_mb"] for m in bundled) < 50  # the budget for weights in the repository


def test_errors_are_one_line_without_traceback(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should go")
    proc = subprocess.run([sys.executable, "-m", "mupad_core.cli", "demo", "--out", str(blocker)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupad: error:") and "not-a-folder" in lines[0]
    assert "Traceback" not in proc.stderr
