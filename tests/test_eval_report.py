"""`mupad eval` end to end on real H&E crops: a blurred "prediction", an exact copy as a
"baseline", references from a folder and from an OME-Zarr store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mupad_core.cli import main
from mupad_core.demo import sample_slide_path

TILE = 64
REGION = (1100, 1700, 256, 192)  # x, y, w, h on the bundled slide: 4 x 3 tiles of tissue


@pytest.fixture(scope="module")
def region():
    from mupad_core.slide.readers import open_slide

    with open_slide(sample_slide_path()) as reader:
        return reader.read_region(0, *REGION)


def _tiles(image: np.ndarray) -> dict[str, np.ndarray]:
    return {f"y{y}-x{x}": image[y : y + TILE, x : x + TILE]
            for y in range(0, image.shape[0], TILE) for x in range(0, image.shape[1], TILE)}


def _write(folder, tiles):
    folder.mkdir(parents=True)
    for name, tile in tiles.items():
        Image.fromarray(tile).save(folder / f"{name}.png")


def test_eval_writes_a_report_that_ranks_a_copy_above_a_blur(region, tmp_path, capsys):
    from skimage.filters import gaussian

    from mupad_core.store import PyramidWriter

    reference = _tiles(region)
    blurred = {k: (gaussian(v, sigma=2, channel_axis=2, preserve_range=True)).round().astype(np.uint8)
               for k, v in reference.items()}
    _write(tmp_path / "pred", blurred)
    _write(tmp_path / "copy", reference)
    # The references as an OME-Zarr (what `mupad stain` writes): cut into tiles of the same names.
    writer = PyramidWriter(tmp_path / "ref.ome.zarr", region.shape[:2], 3, mpp=(0.5, 0.5), chunk=64, generated=False)
    writer.write_tile(0, 0, region)
    writer.finalize()

    code = main(["eval", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref.ome.zarr"),
                 "--baseline", f"copy={tmp_path / 'copy'}", "--pred-name", "blurred", "--ref-name", "real",
                 "-o", str(tmp_path / "report"), "--tile", str(TILE), "--resamples", "20", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.strip().endswith("report.md") and "blurred: FID" in printed
    results = json.loads((tmp_path / "report" / "report.json").read_text())
    assert results["features"] == "inception-v3-fid" and results["reference"]["tiles"] == 12
    blur, copy = results["sets"]
    assert copy["fid"]["value"] == pytest.approx(0, abs=1e-2) and blur["fid"]["value"] > 1
    assert blur["kid"]["value"] > copy["kid"]["value"]
    assert copy["paired"]["tiles"] == 12 and copy["paired"]["ssim"]["mean"] == pytest.approx(1.0)
    assert 15 < blur["paired"]["psnr"]["mean"] < copy["paired"]["psnr"]["mean"]
    assert blur["paired"]["patch_pcc"]["mean"] > blur["paired"]["pcc"]["mean"]  # 8-px boxes forgive the blur
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| blurred | 12 |" in report and "| copy | 12 |" in report and "grid.png" in report
    grid = np.asarray(Image.open(tmp_path / "report" / "grid.png"))
    assert grid.shape == (4 * TILE, 3 * TILE, 3)  # 4 rows: real | blurred | copy
    assert (tmp_path / "report" / "distribution.png").stat().st_size > 5000
    # Per channel: intervals over tiles around the mean, slide-level PCC of tile means, plots.
    for entry in (blur, copy):
        pp = entry["paired"]["patch_pcc"]
        assert all(lo <= v <= hi for v, lo, hi in zip(pp["per_channel"], pp["low"], pp["high"]))
    assert copy["paired"]["slide_pcc"] == pytest.approx([1.0, 1.0, 1.0])
    assert copy["paired"]["cosine"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert blur["paired"]["cosine"]["mean"] < copy["paired"]["cosine"]["mean"]
    assert blur["paired"]["slide_pcc"][0] > 0.9  # a blur keeps tile means
    assert (tmp_path / "report" / "markers.png").is_file() and (tmp_path / "report" / "scatter.png").is_file()


def test_eval_input_mistakes_name_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--pred", str(tmp_path / "empty"), "--ref", str(tmp_path / "empty"),
                 "-o", str(tmp_path / "r")]) == 1
    assert "empty: no images" in capsys.readouterr().err
