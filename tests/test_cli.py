"""The `mupad` command: demo end to end on the bundled slide, one-line errors."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from mupad_core.cli import main
from mupad_core.demo import sample_slide_path
from mupad_core.models.checkpoint import load_model


def test_bundled_sample_slide_is_real_and_opens():
    import openslide

    slide = openslide.OpenSlide(str(sample_slide_path()))
    assert slide.dimensions == (2220, 2967)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.499
    slide.close()


def test_demo_writes_preview_summary_and_loadable_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seconds", "4"]) == 0
    preview = np.asarray(Image.open(out / "preview.png"))
    assert preview.shape == (3 * 256, 8 * 256, 3)  # rows: real, seed 1, seed 2; 8 tiles
    real, seed1, seed2 = np.split(preview.astype(float), 3, axis=0)
    assert real.std() > 20  # real tissue, not a blank image
    assert not np.array_equal(seed1, seed2)  # two seeds, two variations
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] >= 1 and "not for diagnosis" in summary["note"]
    model = load_model(out / "model")
    assert model.config.condition_dims == {"image": 64}
    assert "preview.png" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should go")
    proc = subprocess.run([sys.executable, "-m", "mupad_core.cli", "demo", "--out", str(blocker)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mupad: error:") and "not-a-folder" in lines[0]
    assert "Traceback" not in proc.stderr
