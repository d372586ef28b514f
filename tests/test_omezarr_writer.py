"""The streaming OME-Zarr pyramid writer, on real zarr stores on disk.

What matters: readers (ome-zarr-models, napari-ome-zarr) accept what it writes; pixels are exact
at level 0 and 2x2 area means below; a crash leaves nothing at the final path and a resume
finishes the very same image; the image is never held in memory.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import zarr
from skimage.transform import downscale_local_mean

from mupad_core.store import PyramidWriter, validate_omezarr
from mupad_core.store.omezarr import NOTICE, PROGRESS_FILE

HE_IMAGE = Path("he_tiles") / "OS-1-detail.ome.tif"
PROVENANCE = {
    "model_id": "mupad-sit-test",
    "weights_hash": "sha256:0123",
    "task": "he_to_ihc",
    "seed": 7,
    "steps": 4,
    "guidance": 1.5,
    "source_path": "slide.svs",
    "source_mpp": [0.25, 0.25],
}


def read_he_crop(shared_data: Path, height: int, width: int) -> tuple[np.ndarray, tuple[float, float]]:
    """(height, width, 3) uint8 crop of a real H&E image and its pixel size (x, y) in µm."""
    with tifffile.TiffFile(shared_data / HE_IMAGE) as tif:
        pixels = tif.ome_metadata and tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        image = tif.asarray()
    return image[:height, :width], (float(pixels["PhysicalSizeX"]), float(pixels["PhysicalSizeY"]))


def write_all(writer: PyramidWriter, image_cyx: np.ndarray, origins=None) -> None:
    chunk = writer.chunk
    for y, x in origins if origins is not None else writer.pending_tiles():
        writer.write_tile(y, x, image_cyx[:, y : y + chunk, x : x + chunk])


def reference_downsample(image_cyx: np.ndarray) -> np.ndarray:
    """Independent 2x2 area mean: edge-pad odd sizes, skimage's local mean, round half to even."""
    _, height, width = image_cyx.shape
    padded = np.pad(image_cyx, ((0, 0), (0, height % 2), (0, width % 2)), mode="edge")
    return np.round(downscale_local_mean(padded, (1, 2, 2))).astype(image_cyx.dtype)


def ome_attributes(path: Path) -> dict:
    attrs = zarr.open_group(path, mode="r").attrs.asdict()
    return attrs.get("ome", attrs)


def levels_of(path: Path) -> list[np.ndarray]:
    group = zarr.open_group(path, mode="r")
    paths = [dataset["path"] for dataset in ome_attributes(path)["multiscales"][0]["datasets"]]
    return [group[level][...] for level in paths]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_rgb_he_image_round_trips_through_readers(tmp_path, shared_data, version):
    he_yxc, mpp = read_he_crop(shared_data, 1101, 901)  # odd sizes: partial chunks, odd edges
    path = tmp_path / "he.ome.zarr"
    writer = PyramidWriter(path, he_yxc.shape[:2], 3, mpp=mpp, version=version, provenance=PROVENANCE)
    for y, x in writer.pending_tiles():
        writer.write_tile(y, x, he_yxc[y : y + 256, x : x + 256])  # (h, w, C) tiles
    assert writer.finalize() == path

    validate_omezarr(path)
    assert not writer.partial_path.exists() and not (path / PROGRESS_FILE).exists()
    he_cyx = np.moveaxis(he_yxc, -1, 0)
    levels = levels_of(path)
    assert [level.shape for level in levels] == [(3, 1101, 901), (3, 551, 451)]
    np.testing.assert_array_equal(levels[0], he_cyx)
    np.testing.assert_array_equal(levels[1], reference_downsample(he_cyx))

    attrs = ome_attributes(path)
    multiscale = attrs["multiscales"][0]
    assert [axis["name"] for axis in multiscale["axes"]] == ["c", "y", "x"]
    assert multiscale["axes"][1]["unit"] == "micrometer"
    scales = [dataset["coordinateTransformations"][0]["scale"] for dataset in multiscale["datasets"]]
    assert scales == [[1.0, mpp[1], mpp[0]], [1.0, 2 * mpp[1], 2 * mpp[0]]]
    channels = attrs["omero"]["channels"]
    assert [(c["label"], c["color"], c["active"]) for c in channels] == [
        ("red", "FF0000", True),
        ("green", "00FF00", True),
        ("blue", "0000FF", True),
    ]
    assert all(c["window"] == {"start": 0, "end": 255, "min": 0, "max": 255} for c in channels)
    provenance = zarr.open_group(path, mode="r").attrs["mupad"]
    assert {key: provenance[key] for key in PROVENANCE} == PROVENANCE
    assert provenance["generated"] and provenance["not_for_diagnosis"] and provenance["notice"] == NOTICE
    assert provenance["kind"] == "rgb" and provenance["software"].startswith("napari-mupad")

    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    [(data, metadata, layer_type)] = napari_ome_zarr.napari_get_reader(str(path))()
    assert layer_type == "image" and metadata["channel_axis"] == 0 and len(data) == 2
    np.testing.assert_array_equal(np.asarray(data[1]), levels[1])
    assert metadata["scale"] == pytest.approx([mpp[1], mpp[0]])
    assert metadata["contrast_limits"] == [[0, 255]] * 3


def test_fluorescence_channels_keep_names_colours_and_get_data_windows(tmp_path):
    names = ["DAPI", "CD3", "CD8", "CD20", "CD68", "PanCK", "Ki67", "FOXP3"]
    colors = ["#0000ff", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FF8000", "FFFFFF"]
    rng = np.random.default_rng(3)
    image = (rng.gamma(2.0, 500.0, size=(8, 600, 520)) * np.arange(1, 9)[:, None, None]).clip(0, 65535)
    image = image.astype(np.uint16)
    path = tmp_path / "mif.ome.zarr"
    writer = PyramidWriter(
        path, (600, 520), 8, dtype="uint16", mpp=(0.5, 0.5), version="0.5", kind="fluorescence",
        channel_names=names, channel_colors=colors, provenance=PROVENANCE,
    )
    write_all(writer, image)
    writer.finalize()

    validate_omezarr(path)
    levels = levels_of(path)
    np.testing.assert_array_equal(levels[0], image)
    np.testing.assert_array_equal(levels[1], reference_downsample(image))
    assert zarr.open_group(path, mode="r")["0"].chunks == (1, 256, 256)
    channels = ome_attributes(path)["omero"]["channels"]
    assert [c["label"] for c in channels] == names
    assert [c["color"] for c in channels] == [color.lstrip("#").upper() for color in colors]
    for channel, plane in zip(channels, levels[-1]):
        window = channel["window"]
        assert window["min"] == 0 and window["max"] == 65535
        assert plane.min() <= window["start"] < window["end"] <= plane.max()


def test_small_image_without_pixel_size_gets_two_unitless_levels(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (3, 300, 250), dtype=np.uint8)
    with pytest.warns(UserWarning, match="no pixel size"):
        writer = PyramidWriter(tmp_path / "small.ome.zarr", (300, 250), 3)
    write_all(writer, image)
    path = writer.finalize()

    validate_omezarr(path)
    assert [level.shape for level in levels_of(path)] == [(3, 300, 250), (3, 150, 125)]
    multiscale = ome_attributes(path)["multiscales"][0]
    assert not any("unit" in axis for axis in multiscale["axes"])
    scales = [dataset["coordinateTransformations"][0]["scale"] for dataset in multiscale["datasets"]]
    assert scales == [[1, 1, 1], [1, 2, 2]]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_origin_places_a_region_and_the_reader_reads_it_back(tmp_path, version):
    from mupad_core.slide.readers import open_slide

    image = np.random.default_rng(2).integers(0, 256, (3, 300, 200), dtype=np.uint8)
    writer = PyramidWriter(tmp_path / "roi.ome.zarr", (300, 200), 3, mpp=(0.5, 0.25), version=version,
                           origin=(120.25, 40.5), min_level_px=100)
    write_all(writer, image)
    path = writer.finalize()

    validate_omezarr(path)
    datasets = ome_attributes(path)["multiscales"][0]["datasets"]
    # Level L's first pixel centre: the origin plus (2^L - 1)/2 level-0 pixels.
    translations = [d["coordinateTransformations"][1]["translation"] for d in datasets]
    assert translations[0] == [0.0, 120.25, 40.5]
    assert translations[1] == [0.0, 120.25 + 0.25 * 0.5, 40.5 + 0.5 * 0.5]
    with open_slide(path) as reader:
        assert reader.origin == pytest.approx((120.25, 40.5))
        assert reader.mpp == pytest.approx((0.5, 0.25))


def test_crash_then_resume_gives_the_uninterrupted_image(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (3, 700, 600), dtype=np.uint8)
    options = dict(
        shape_yx=(700, 600), channels=3, mpp=(0.5, 0.5), chunk=128, provenance=PROVENANCE, min_level_px=100
    )
    reference = PyramidWriter(tmp_path / "reference.ome.zarr", **options)
    write_all(reference, image)
    reference_levels = levels_of(reference.finalize())
    assert len(reference_levels) == 4

    path = tmp_path / "resumed.ome.zarr"
    first_run = PyramidWriter(path, **options)
    all_tiles = first_run.pending_tiles()
    first_half = all_tiles[: len(all_tiles) // 2]
    write_all(first_run, image, first_half)
    del first_run  # the process "dies": no finalize
    assert not path.exists() and path.with_name(path.name + ".partial").is_dir()

    second_run = PyramidWriter(path, resume=True, **options)
    assert second_run.done_tiles() == set(first_half)
    assert second_run.pending_tiles() == all_tiles[len(first_half) :]
    write_all(second_run, image)
    second_run.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        second_run.write_tile(0, 0, image[:, :128, :128])

    validate_omezarr(path)
    for resumed, uninterrupted in zip(levels_of(path), reference_levels, strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)


def test_crash_during_finalize_still_resumes(tmp_path, monkeypatch):
    image = np.random.default_rng(2).integers(0, 256, (3, 300, 300), dtype=np.uint8)
    options = dict(shape_yx=(300, 300), channels=3, mpp=(1.0, 1.0), provenance=PROVENANCE)
    path = tmp_path / "late.ome.zarr"
    writer = PyramidWriter(path, **options)
    write_all(writer, image)

    def crash(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PyramidWriter, "_move_into_place", crash)
        with pytest.raises(KeyboardInterrupt):
            writer.finalize()
    assert not path.exists()

    resumed = PyramidWriter(path, resume=True, **options)
    assert resumed.pending_tiles() == []
    np.testing.assert_array_equal(levels_of(resumed.finalize())[0], image)


@pytest.mark.parametrize(
    "changed",
    [
        {"shape_yx": (700, 599)},
        {"dtype": "uint16"},
        {"chunk": 256},
        {"version": "0.5"},
        {"provenance": {**PROVENANCE, "seed": 8}},
    ],
)
def test_resume_with_other_parameters_is_refused(tmp_path, changed):
    options = dict(shape_yx=(700, 600), channels=3, mpp=(0.5, 0.5), chunk=128, provenance=PROVENANCE)
    path = tmp_path / "run.ome.zarr"
    PyramidWriter(path, **options).write_tile(0, 0, np.zeros((3, 128, 128), np.uint8))
    with pytest.raises(ValueError, match=r"cannot resume .*run\.ome\.zarr\.partial.*differ"):
        PyramidWriter(path, resume=True, **{**options, **changed})


def test_existing_results_are_protected_until_overwrite(tmp_path):
    image = np.full((3, 256, 256), 200, np.uint8)
    path = tmp_path / "out.ome.zarr"
    first = PyramidWriter(path, (256, 256), 3, mpp=(1.0, 1.0))
    write_all(first, image)
    first.finalize()

    with pytest.raises(FileExistsError, match="out.ome.zarr already exists"):
        PyramidWriter(path, (256, 256), 3, mpp=(1.0, 1.0))
    replacement = PyramidWriter(path, (256, 256), 3, mpp=(1.0, 1.0), overwrite=True)
    write_all(replacement, image // 2)
    np.testing.assert_array_equal(levels_of(path)[0], image)  # old result intact until finalize
    replacement.finalize()
    np.testing.assert_array_equal(levels_of(path)[0], image // 2)

    stale = PyramidWriter(tmp_path / "stale.ome.zarr", (256, 256), 3, mpp=(1.0, 1.0))
    with pytest.raises(FileExistsError, match=r"stale\.ome\.zarr\.partial exists"):
        PyramidWriter(stale.path, (256, 256), 3, mpp=(1.0, 1.0))


def test_bad_tiles_and_incomplete_images_are_refused(tmp_path):
    writer = PyramidWriter(tmp_path / "bad.ome.zarr", (300, 300), 3, mpp=(1.0, 1.0))
    with pytest.raises(ValueError, match="chunk grid"):
        writer.write_tile(10, 0, np.zeros((3, 256, 256), np.uint8))
    with pytest.raises(ValueError, match="neither"):
        writer.write_tile(0, 0, np.zeros((3, 100, 256), np.uint8))
    with pytest.raises(TypeError, match="float32"):
        writer.write_tile(0, 0, np.zeros((3, 256, 256), np.float32))
    writer.write_tile(0, 0, np.zeros((3, 256, 256), np.uint8))
    with pytest.raises(RuntimeError, match="3 of 4 level-0 chunks"):
        writer.finalize()
    assert not writer.path.exists()


def test_validate_rejects_a_plain_zarr_group(tmp_path):
    zarr.open_group(tmp_path / "plain.zarr", mode="w").create_array("0", shape=(4, 4), dtype="uint8")
    with pytest.raises(ValueError, match="plain.zarr is not a valid OME-Zarr image"):
        validate_omezarr(tmp_path / "plain.zarr")


def test_large_image_is_written_in_bounded_memory(tmp_path):
    """8192² RGB (192 MiB) tile by tile: peak RSS grows by a small fraction of the image."""
    size, chunk = 8192, 512
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    try:
        writer = PyramidWriter(tmp_path / "big.ome.zarr", (size, size), 3, mpp=(0.5, 0.5), chunk=chunk)
        ramp = np.arange(chunk, dtype=np.uint16)
        for y, x in writer.pending_tiles():
            tile = np.empty((3, chunk, chunk), np.uint8)
            tile[0] = ((ramp[:, None] + y // chunk * 37) % 256).astype(np.uint8)
            tile[1] = ((ramp[None, :] + x // chunk * 11) % 256).astype(np.uint8)
            tile[2] = np.random.default_rng(y * size + x).integers(0, 256, tile.shape[1:], dtype=np.uint8)
            writer.write_tile(y, x, tile)
        path = writer.finalize()
    finally:
        done.set()
        sampler.join()

    growth_mib = (peak - baseline) / 2**20
    assert growth_mib < 96, f"peak RSS grew by {growth_mib:.0f} MiB writing a 192 MiB image"
    group = zarr.open_group(path, mode="r")
    assert [group[str(level)].shape[1:] for level in range(4)] == [(size >> level,) * 2 for level in range(4)]


def test_unfinished_result_finds_the_newest_partial_of_a_name(tmp_path):
    from mupad_core.store.omezarr import unfinished_result

    assert unfinished_result(tmp_path, "roi") is None
    for name in ("roi.ome.zarr.partial", "roi-2.ome.zarr.partial", "roi-extra.ome.zarr.partial", "roi-3.ome.zarr"):
        (tmp_path / name).mkdir()
        time.sleep(0.01)
    assert unfinished_result(tmp_path, "roi") == tmp_path / "roi-2.ome.zarr"  # not another name, not a finished one
