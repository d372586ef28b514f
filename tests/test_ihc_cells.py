"""IHC positivity (DAB -> H-score, per-cell AUC) and cell composition, on real labelled cells."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree
from skimage.color import hed2rgb, rgb2hed
from skimage.measure import regionprops

from mupad_core.evaluate.cells import composition_distance, segment_nuclei
from mupad_core.evaluate.ihc import cell_means, dab_density, deepliif_cells, hscore, positivity_auc


@pytest.fixture(scope="module")
def lung1(shared_data):
    """DeepLIIF Lung1: Ki67 IHC, haematoxylin, DAPI panels and the labelled cell mask."""
    image = np.asarray(Image.open(shared_data / "mif" / "deepliif" / "Lung1.png").convert("RGB"))
    labels, positive = deepliif_cells(image[:, 2560:3072])
    return {"ihc": image[:, :512], "hema": image[:, 512:1024], "mask": image[:, 2560:3072], "labels": labels,
            "positive": positive}


def with_dab(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The same image with its DAB optical density scaled (0 removes the stain)."""
    hed = rgb2hed(rgb)
    hed[..., 2] *= factor
    return (hed2rgb(hed).clip(0, 1) * 255).round().astype(np.uint8)


def test_auc_known_answers():
    assert positivity_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert positivity_auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert positivity_auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    assert positivity_auc([0.1, 0.3, 0.2, 0.4], [False, False, True, True]) == 0.75
    with pytest.raises(ValueError, match="0 positive"):
        positivity_auc([0.1, 0.2], [False, False])


def test_hscore_bins_cells_of_known_dab():
    """Four cells painted with DAB densities in each bin: H-score = 1*25 + 2*25 + 3*25."""
    hed = np.zeros((40, 160, 3))
    labels = np.zeros((40, 160), dtype=np.int32)
    for k, dab in enumerate((0.005, 0.03, 0.05, 0.08)):
        hed[10:30, 40 * k + 10 : 40 * k + 30, 2] = dab
        labels[10:30, 40 * k + 10 : 40 * k + 30] = k + 1
    rgb = (hed2rgb(hed).clip(0, 1) * 255).round().astype(np.uint8)
    score = hscore(rgb, labels)
    assert score.units == 4 and score.fractions == (0.25, 0.25, 0.25, 0.25)
    assert score.hscore == pytest.approx(150.0)
    assert np.allclose(cell_means(dab_density(rgb), labels), (0.005, 0.03, 0.05, 0.08), atol=0.004)


def test_dab_separates_real_ki67_cells(lung1):
    """Per-cell DAB on the real Ki67 IHC ranks DeepLIIF's positive cells above the negative ones."""
    labels, positive = lung1["labels"], lung1["positive"]
    assert labels.max() == 61 and positive.sum() == 11
    scores = cell_means(dab_density(lung1["ihc"]), labels)
    assert positivity_auc(scores, positive) > 0.97  # 0.996 when written
    real = hscore(lung1["ihc"], labels)
    assert 0.1 < real.positive_fraction < 0.35  # 11 of 61 labelled positive = 0.18
    assert hscore(with_dab(lung1["ihc"], 0.0), labels).hscore < 5  # stain removed: nothing positive
    assert hscore(with_dab(lung1["ihc"], 2.0), labels).hscore > real.hscore + 20


def test_nuclei_segmenter_finds_the_annotated_cells(lung1):
    centroids = np.array([r.centroid for r in regionprops(lung1["labels"])])
    for panel, floor in (("ihc", 0.5), ("hema", 0.72)):  # F1 0.58 and 0.81 when written
        found = np.array([r.centroid for r in regionprops(segment_nuclei(lung1[panel], mpp=0.35))])
        recall = (cKDTree(found).query(centroids)[0] < 8).mean()
        precision = (cKDTree(centroids).query(found)[0] < 8).mean()
        assert 2 * recall * precision / (recall + precision) > floor, (panel, recall, precision)


def test_composition_distance_grows_with_the_change():
    """scikit-image's bundled real IHC image (offline): itself 0; stain removed or nuclei blurred away, larger."""
    from skimage import data
    from skimage.filters import gaussian

    image = data.immunohistochemistry()
    tiles = [image[y : y + 256, x : x + 256] for y in (0, 256) for x in (0, 256)]
    same = composition_distance(tiles, tiles, mpp=0.5)
    assert same["class_wasserstein"] == 0 and all(v == 0 for v in same["feature_wasserstein_sd"].values())
    assert same["reference"]["nuclei"] > 50
    no_dab = composition_distance(tiles, [with_dab(t, 0.0) for t in tiles], mpp=0.5)
    assert no_dab["dab_positive_difference"] < -0.2
    assert no_dab["feature_wasserstein_sd"]["dab"] > 0.5
    blurred = [(gaussian(t, sigma=4, channel_axis=-1) * 255).astype(np.uint8) for t in tiles]
    smeared = composition_distance(tiles, blurred, mpp=0.5)
    assert smeared["class_wasserstein"] > 0.2  # 0.49 when written: the small nuclei merge or vanish
    assert smeared["generated"]["per_mm2"] < 0.5 * smeared["reference"]["per_mm2"]


def test_mupad_eval_reports_hscore_auc_and_composition(lung1, tmp_path, capsys):
    """`mupad eval --ihc --labels --cells` on real Ki67 IHC: a copy matches the reference, a destained copy does not."""
    import json

    from mupad_core.cli import main

    folders = {name: tmp_path / name for name in ("ref", "copy", "destained", "labels")}
    for folder in folders.values():
        folder.mkdir()
    destained = with_dab(lung1["ihc"], 0.0)
    for y in (0, 256):
        for x in (0, 256):
            name = f"y{y}-x{x}.png"
            Image.fromarray(lung1["ihc"][y : y + 256, x : x + 256]).save(folders["ref"] / name)
            Image.fromarray(lung1["ihc"][y : y + 256, x : x + 256]).save(folders["copy"] / name)
            Image.fromarray(destained[y : y + 256, x : x + 256]).save(folders["destained"] / name)
            Image.fromarray(lung1["mask"][y : y + 256, x : x + 256]).save(folders["labels"] / name)
    code = main(["eval", "--pred", str(folders["destained"]), "--ref", str(folders["ref"]),
                 "--baseline", f"copy={folders['copy']}", "-o", str(tmp_path / "report"), "--ihc", "--cells",
                 "--labels", str(folders["labels"]), "--mpp", "0.35", "--resamples", "20"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "report" / "report.json").read_text())
    ref = results["reference"]["ihc"]
    destained_, copy = results["sets"]
    assert ref["auc"] > 0.95 and copy["ihc"] == ref
    assert destained_["ihc"]["hscore"] < 5 < ref["hscore"] and destained_["ihc"]["auc"] < ref["auc"] - 0.2
    assert copy["cells"]["class_wasserstein"] == 0 and destained_["cells"]["dab_positive_difference"] < -0.1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "H-score" in report and "Cell composition" in report
