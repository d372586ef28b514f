"""Synthetic training data: `mupad augment` (few-shot class folders) and `mupad synth-pairs` (CLIP pairs).

The models are trained here for two steps by `mupad train` from the committed tiny config,
so the whole path (builtin image encoder weights, pipeline file, image size) is the real one.
The images are crops of the bundled CC0 slide.
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mupad_core.cli import main
from mupad_core.demo import sample_slide_path
from mupad_core.generate.synthetic import SETTINGS_FILE, AugmentSettings, SyntheticDataError, augment
from mupad_core.train.config import load_config
from mupad_core.train.run import train

REPO = Path(__file__).resolve().parents[1]
CROPS = {"epithelium": [(1200, 1760), (1300, 1800)], "stroma": [(900, 2300), (700, 2500)]}  # level-0 x, y


def _tiny_run(tmp_path: Path, name: str, **changes) -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny-he2he.yaml").read_text())
    config.update(name=name, out_dir=str(tmp_path / "runs"))
    config["data"].update(slides=[str(sample_slide_path())], patch_px=32)
    config["train"].update(steps=2, checkpoint_every=2, log_every=1)
    for key, value in changes.items():
        config[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return train(load_config(path), progress_bar=False, log=lambda m: None).model_dir


@pytest.fixture(scope="module")
def variations_model(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("he2he"), "he2he")


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    """Two classes of two real 40 x 48 px H&E crops each."""
    from mupad_core.slide.readers import open_slide

    folder = tmp_path_factory.mktemp("fewshot")
    with open_slide(sample_slide_path()) as reader:
        for name, corners in CROPS.items():
            (folder / name).mkdir()
            for k, (x, y) in enumerate(corners):
                Image.fromarray(reader.read_region(0, x, y, 48, 40)).save(folder / name / f"tile{k}.png")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_augment_writes_a_loadable_class_folder_set_of_the_requested_size(variations_model, few_shot, tmp_path,
                                                                          capsys):
    out = tmp_path / "augmented"
    code = main(["augment", str(few_shot), "-o", str(out), "-n", "3", "--model", str(variations_model),
                 "--steps", "2", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out / "manifest.csv")
    for name in CROPS:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == sorted([f"tile{k}.png" for k in range(2)] + [f"tile{k}-var{v}.png" for k in range(2)
                                                                       for v in range(3)])
        original = np.asarray(Image.open(few_shot / name / "tile0.png"))
        assert np.array_equal(np.asarray(Image.open(out / name / "tile0.png")), original)
        variations = [np.asarray(Image.open(out / name / f"tile0-var{v}.png")) for v in range(3)]
        assert all(v.shape == original.shape and v.dtype == np.uint8 for v in variations)
        assert not np.array_equal(variations[0], variations[1])  # a new noise seed each
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * (1 + 3) and {r["class"] for r in rows} == set(CROPS)
    assert sum(r["generated"] == "1" for r in rows) == 12 and all((out / r["source"]).is_file() for r in rows)
    record = json.loads((out / SETTINGS_FILE).read_text())
    assert record["complete"] and record["counts"] == {"epithelium": 8, "stroma": 8} and record["not_for_diagnosis"]

    # A short training run reads the enlarged set through its manifest.
    config = yaml.safe_load((REPO / "configs" / "tiny-he2he.yaml").read_text())
    config.update(name="on-augmented", out_dir=str(tmp_path / "runs"), task="text2he",
                  conditions={"text": {"encoder": "minilm"}},
                  data={"kind": "manifest", "manifest": str(out / "manifest.csv"), "split": "train", "crop_px": 32,
                        "mpp": 0.5})
    config["train"].update(steps=3, checkpoint_every=3, log_every=1)
    path = tmp_path / "on-augmented.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train(load_config(path), progress_bar=False, log=lambda m: None)
    assert len(result.history) == 3 and all(np.isfinite(r["loss_total"]) for r in result.history)


def test_an_interrupted_augment_resumes_to_the_same_files(variations_model, few_shot, tmp_path):
    settings = AugmentSettings(model=str(variations_model), variations=2, steps=2, seed=4)
    whole = augment(few_shot, tmp_path / "whole", settings)

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    target = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        augment(few_shot, target, settings, progress=stop_after_three)
    assert not (target / "manifest.csv").exists()  # an unfinished set never looks finished
    assert json.loads((target / SETTINGS_FILE).read_text())["complete"] is False
    augment(few_shot, target, settings)
    assert _files(target) == _files(whole)
    assert (target / "manifest.csv").read_text() == (whole / "manifest.csv").read_text()

    with pytest.raises(SyntheticDataError, match="other settings"):
        augment(few_shot, target, AugmentSettings(model=str(variations_model), variations=5, steps=2, seed=4))


def test_augment_input_and_model_mistakes_are_one_line_errors(variations_model, few_shot, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["augment", str(empty), "-o", str(tmp_path / "o1"), "--model", str(variations_model)]) == 1
    assert "no class folders with images" in capsys.readouterr().err
    (few_shot.parent / "notempty").mkdir(exist_ok=True)
    (few_shot.parent / "notempty" / "x.txt").write_text("mine")
    assert main(["augment", str(few_shot), "-o", str(few_shot.parent / "notempty"),
                 "--model", str(variations_model)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["augment", str(few_shot), "-o", str(tmp_path / "o2"), "--model", "demo-he2ihc"]) == 1
    assert "spatial template" in capsys.readouterr().err  # a restaining model cannot make variations


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("text"), "text", task="text2he", conditions={"text": {"encoder": "minilm"}},
                     data={"kind": "slides", "slides": [str(sample_slide_path())], "patch_px": 32, "mpp": 1.0,
                           "length": 64, "captions": ["H&E skin"]})


def test_generate_cli_places_the_region_on_the_slide_with_its_spread(text_model, tmp_path, capsys):
    from mupad_core.slide.readers import open_slide
    from mupad_core.store import validate_omezarr

    out = tmp_path / "gen.ome.zarr"
    roi = ["600", "1000", "96", "64"]
    code = main(["generate", "-o", str(out), "--model", str(text_model), "--text", "H&E dense tumour",
                 "--slide", str(sample_slide_path()), "--roi", *roi, "--samples", "2", "--steps", "2", "--quiet",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    spread = tmp_path / "gen.spread.ome.zarr"
    assert capsys.readouterr().out.split() == [str(out), str(spread)]
    for path in (out, spread):
        validate_omezarr(path)
    with open_slide(sample_slide_path()) as slide, open_slide(out) as result, open_slide(spread) as disagreement:
        src = slide.level_mpp(0)
        assert result.mpp == pytest.approx((1.0, 1.0))  # the model's own pixel size (its training mpp)
        assert result.dimensions == (round(96 * src[0]), round(64 * src[1]))
        # Output pixel 0 averages source pixels [x0, x0 + s): its centre lies at x0 + (s - 1) / 2.
        assert result.origin[1] == pytest.approx((600 + (1.0 / src[0] - 1) / 2) * src[0])
        assert disagreement.origin == result.origin and disagreement.channel_names == ["spread"]
        provenance = result.properties["mupad"]
        assert provenance["condition"] == {"kind": "text", "text": "H&E dense tumour"}
        assert provenance["samples"] == 2 and provenance["source"]["roi_level0"] == [int(v) for v in roi]

    assert main(["generate", "-o", str(tmp_path / "x.ome.zarr"), "--model", str(text_model), "--text", "a",
                 "--reference", "b.png"]) == 1
    assert "give one condition" in capsys.readouterr().err
    assert main(["generate", "-o", str(out), "--model", str(text_model), "--text", "a", "--steps", "1"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_synth_pairs_writes_images_captions_and_webdataset_shards(text_model, tmp_path, capsys):
    model = text_model
    captions = tmp_path / "captions.txt"
    captions.write_text("# prompts\nH&E dense tumour\nH&E loose stroma\n")
    out = tmp_path / "pairs"
    code = main(["synth-pairs", str(captions), "-o", str(out), "-n", "2", "--size", "40", "--shard-size", "3",
                 "--model", str(model), "--steps", "2", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    with (out / "pairs.csv").open() as fh:
        pairs = list(csv.DictReader(fh))
    assert [p["caption"] for p in pairs] == ["H&E dense tumour"] * 2 + ["H&E loose stroma"] * 2
    assert all(Image.open(out / p["image"]).size == (40, 40) for p in pairs)
    shards = sorted(out.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names == [f"{pairs[3]['key']}.png", f"{pairs[3]['key']}.txt"]
        assert tar.extractfile(names[1]).read().decode() == "H&E loose stroma"
    assert main(["synth-pairs", str(captions), "-o", str(tmp_path / "p2"), "--model", "demo-he2he"]) == 1
    assert "no text condition stream" in capsys.readouterr().err


def test_bundled_variations_model_keeps_the_reference_look(tmp_path):
    """demo-he2he on real crops: each variation keeps its reference's colour and stain balance
    (mean RGB close) while differing pixel by pixel; the grid goes into docs/synthetic-data.md."""
    from mupad_core.slide.readers import open_slide

    few_shot = tmp_path / "fewshot"
    with open_slide(sample_slide_path()) as reader:
        for name, corners in CROPS.items():
            (few_shot / name).mkdir(parents=True)
            x, y = corners[0]
            Image.fromarray(reader.read_region(0, x, y, 128, 128)).save(few_shot / name / "tile0.png")
    out = augment(few_shot, tmp_path / "out", AugmentSettings(model="demo-he2he", variations=3, steps=20, seed=0))
    rows = []
    for name in CROPS:
        reference = np.asarray(Image.open(out / name / "tile0.png")).astype(float)
        variations = [np.asarray(Image.open(out / name / f"tile0-var{k}.png")).astype(float) for k in range(3)]
        for variation in variations:
            assert np.abs(variation.mean((0, 1)) - reference.mean((0, 1))).max() < 40, name  # 28 measured
            assert np.abs(variation - reference).mean() > 3, name  # not a copy
        rows.append(np.concatenate([reference, *variations], axis=1))
    # The two classes stay apart: each variation is nearer its own reference's mean colour.
    means = {name: np.asarray(Image.open(out / name / "tile0.png")).reshape(-1, 3).mean(0) for name in CROPS}
    for name in CROPS:
        other = next(n for n in CROPS if n != name)
        for k in range(3):
            mean = np.asarray(Image.open(out / name / f"tile0-var{k}.png")).reshape(-1, 3).mean(0)
            assert np.linalg.norm(mean - means[name]) < np.linalg.norm(mean - means[other])
    grid = np.concatenate(rows, axis=0).astype(np.uint8)
    from helpers import figures_dir
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        figures_dir() / "augment-demo-he2he.png")
