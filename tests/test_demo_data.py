"""Demo-data manifests: what each model is allowed to see."""

from __future__ import annotations

import csv

from mupad_core.demo_data import prepare_ff2ffpe


def test_unpaired_ff2ffpe_rows_pair_frozen_sources_with_ffpe_targets_of_the_same_split(tmp_path):
    atlas = tmp_path / "he_atlas"
    atlas.mkdir()
    rows = [("monuseg_A-01Z_0.png", "H&E frozen section of lung adenocarcinoma", "train"),
            ("monuseg_A-01Z_1.png", "H&E frozen section of lung adenocarcinoma", "train"),
            ("monuseg_B-DX1_0.png", "H&E FFPE section of breast invasive carcinoma", "train"),
            ("monuseg_C-DX1_0.png", "H&E FFPE section of kidney clear cell carcinoma", "train"),
            ("monuseg_D-01Z_0.png", "H&E frozen section of colon adenocarcinoma", "val"),
            ("monuseg_E-DX1_0.png", "H&E FFPE section of colon adenocarcinoma", "val"),
            ("glas_testA_1_0.png", "H&E FFPE section of colon mucosa, benign glands", "train")]
    with (atlas / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "caption", "split"])
        writer.writerows(rows)
    caption = {name: (text, split) for name, text, split in rows}

    written = prepare_ff2ffpe(tmp_path / "unused-shared", tmp_path, copies=2)
    with written.open() as fh:
        pairs = list(csv.DictReader(fh))
    assert [p["source"] for p in pairs if p["split"] == "train"] == ["monuseg_A-01Z_0.png"] * 2 + \
        ["monuseg_A-01Z_1.png"] * 2  # frozen crops only, each listed `copies` times
    assert [(p["source"], p["target"]) for p in pairs if p["split"] == "val"] == \
        [("monuseg_D-01Z_0.png", "monuseg_E-DX1_0.png")]  # held out once, against held-out FFPE
    for p in pairs:
        text, split = caption[p["target"]]
        assert " FFPE " in text and split == p["split"] and not p["target"].startswith("glas_")
