"""Big images without a pyramid (flat TIFF, tiled or stripped, and PNG): lazy reads of just the
bytes asked for, and coarse levels built once, cached, and reused. Small generated files stand
in for 40k² ones by lowering the size threshold; benchmarks/flat_images.py measures the big ones."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from mupad_core.slide.readers import open_slide
from mupad_core.slide.readers import overview_cache
from mupad_core.slide.readers.base import ContiguousPixels


@pytest.fixture(autouse=True)
def small_threshold(tmp_path, monkeypatch):
    monkeypatch.setenv("MUPAD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(overview_cache, "MIN_FLAT_SIDE_PX", 1500)
    monkeypatch.setattr(overview_cache, "COARSEST_SIDE_PX", 256)


@pytest.fixture
def he_image(cmu1) -> np.ndarray:
    with open_slide(cmu1) as slide:
        return slide.read_region(0, 0, 0, 2100, 2600)  # real H&E, sides not multiples of 4


def write_flat(path, image, layout):
    if layout == "stripped":  # uncompressed in one strip, as many microscopes and scripts write
        out = tifffile.memmap(path, shape=image.shape, dtype=image.dtype, photometric="rgb")
        out[:] = image
        out.flush()
        del out
    elif layout == "tiled":
        tifffile.imwrite(path, image, tile=(256, 256), compression="zlib", photometric="rgb")
    else:
        Image.fromarray(image).save(path)
    return path


def reference_pool(image, factor):
    height, width = image.shape[:2]
    h, w = height // factor, width // factor
    return image[: h * factor, : w * factor].reshape(h, factor, w, factor, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("layout,name", [("stripped", "flat.tif"), ("tiled", "flat.tif"), ("png", "flat.png")])
def test_a_flat_image_gets_cached_coarse_levels_once(he_image, tmp_path, monkeypatch, layout, name):
    path = write_flat(tmp_path / name, he_image, layout)
    calls = []
    with open_slide(path, mpp=0.5, progress=lambda done, total: calls.append((done, total))) as reader:
        assert reader.level_downsamples[:2] == [1.0, 4.0] and max(reader.levels[-1].shape[:2]) <= 256
        np.testing.assert_array_equal(np.asarray(reader.levels[0][:700, :900]), he_image[:700, :900])
        coarse = np.asarray(reader.levels[1]).astype(float)
        pooled = reference_pool(he_image, 4)
        assert np.abs(coarse[: pooled.shape[0], : pooled.shape[1]] - pooled).max() <= 0.5
        assert reader.read_region(len(reader.levels) - 1, 0, 0, 64, 64).shape == (64, 64, 3)
    assert calls and calls[-1][0] == calls[-1][1]

    def must_not_build(*args, **kwargs):
        raise AssertionError("the overview was built again")

    monkeypatch.setattr(overview_cache, "build_overview", must_not_build)
    with open_slide(path, mpp=0.5) as again:
        assert len(again.levels) == len(reader.levels)
        if layout == "png":  # level 0 from the tiled cache: no second whole-image decode
            assert again.levels[0].name.startswith("overview-")
            np.testing.assert_array_equal(np.asarray(again.levels[0][-50:, -50:]), he_image[-50:, -50:])


def test_a_changed_file_gets_a_new_overview(he_image, tmp_path):
    path = write_flat(tmp_path / "flat.tif", he_image, "tiled")
    first = overview_cache.cache_path(path)
    write_flat(path, he_image[::-1].copy(), "tiled")
    os.utime(path, ns=(1, 1))
    assert overview_cache.cache_path(path) != first
    with open_slide(path, mpp=0.5) as reader:
        coarse = np.asarray(reader.levels[1]).astype(float)
    pooled = reference_pool(he_image[::-1], 4)
    assert np.abs(coarse[: pooled.shape[0], : pooled.shape[1]] - pooled).max() <= 0.5


def test_an_interrupted_build_leaves_no_cache_and_the_next_open_builds_it(he_image, tmp_path):
    path = write_flat(tmp_path / "flat.tif", he_image, "stripped")

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        open_slide(path, mpp=0.5, progress=interrupt)
    assert not overview_cache.cache_path(path).exists()
    with open_slide(path, mpp=0.5) as reader:
        assert len(reader.levels) > 1


def test_a_second_process_building_the_same_overview_keeps_the_first_ones(he_image, tmp_path):
    """Two dask workers (or viewers) opening one flat slide at once both build its overview: the
    one that finishes second finds the store in place, keeps it and leaves no partial behind."""
    path = write_flat(tmp_path / "flat.tif", he_image, "tiled")
    with open_slide(path, mpp=0.5) as reader:
        store = overview_cache.cache_path(path)
        before = np.asarray(reader.levels[1])
    with open_slide(path, mpp=0.5, overview=False) as late:  # its open raced the first: no cache seen
        assert overview_cache.build_overview(late, store) == store
    assert [p.name for p in store.parent.iterdir() if p.name.startswith(store.name)] == [store.name]
    with open_slide(path, mpp=0.5) as reader:
        np.testing.assert_array_equal(np.asarray(reader.levels[1]), before)


def test_images_below_the_threshold_are_left_alone(cmu1, tmp_path, monkeypatch):
    monkeypatch.setattr(overview_cache, "MIN_FLAT_SIDE_PX", 8192)  # the default: CMU-1's 2967 px is below it
    with open_slide(cmu1) as reader:
        assert len(reader.levels) == 1
        assert "mupad.overview_cache" not in reader.properties
    assert not (tmp_path / "home").exists()


def test_a_one_strip_tiff_reads_only_the_bytes_asked_for(he_image, tmp_path, monkeypatch):
    path = write_flat(tmp_path / "strip.tif", he_image, "stripped")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages[0].dataoffsets) == 1  # the whole image is one strip
    read = []
    real_pread = os.pread

    def counting_pread(fd, n, offset):
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    with open_slide(path, mpp=0.5, overview=False) as reader:
        region = reader.read_region(0, 1000, 1200, 300, 200)
    np.testing.assert_array_equal(region, he_image[1200:1400, 1000:1300])
    assert sum(read) <= 2 * 1024 * 1024 * 3  # one 1024-px chunk at most, not the 16 MB strip


def test_contiguous_pixels_match_numpy_for_any_slices(tmp_path):
    array = np.arange(2 * 7 * 5 * 3, dtype="<u2").reshape(2, 7, 5, 3)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"head" + array.tobytes())
    pixels = ContiguousPixels(path, 4, array.shape, array.dtype)
    for key in [(slice(None),), (slice(1, 2), slice(2, 6), slice(1, 4)), (slice(0, 2), slice(0, 7), slice(0, 5), slice(1, 2)),
                (slice(None), slice(None, None, 2)), (slice(1, 1),)]:
        np.testing.assert_array_equal(pixels[key], array[key])


def test_a_png_over_pils_decompression_bomb_limit_opens(he_image, tmp_path, monkeypatch):
    """PIL refuses images over ~179 megapixels by default; a slide exported as PNG often is."""
    from PIL import Image as PILImage

    path = write_flat(tmp_path / "big.png", he_image[:600, :800].copy(), "png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # this PNG is 480,000 px: "a bomb"
    with open_slide(path, mpp=0.5, overview=False) as reader:
        np.testing.assert_array_equal(np.asarray(reader.levels[0]), he_image[:600, :800])
    assert PILImage.MAX_IMAGE_PIXELS == 1000  # the limit is PIL's again afterwards


@pytest.mark.parametrize("layout", ["stripped", "tiled"])
def test_a_viewer_open_returns_at_once_and_the_overview_fills_in(he_image, tmp_path, monkeypatch, layout):
    """`overview="background"` (the napari reader): the file opens before any coarse level is
    built, blank where nothing is built yet, and the finished overview equals the one a plain
    open builds; a plain open meanwhile waits for that build instead of building a second."""
    import threading

    path = write_flat(tmp_path / "flat.tif", he_image, layout)
    gate = threading.Event()
    real_pool = overview_cache.mean_pool

    def held_pool(pixels, factor):
        gate.wait(30)  # the build stays at its first block until the test lets it go
        return real_pool(pixels, factor)

    monkeypatch.setattr(overview_cache, "mean_pool", held_pool)
    reader = open_slide(path, mpp=0.5, overview="background")
    build = reader.overview_build
    assert build is not None and not build.done() and build.done_blocks == 0
    assert reader.level_downsamples[:2] == [1.0, 4.0]
    assert np.all(np.asarray(reader.levels[-1]) == 255)  # nothing built yet: blank glass
    np.testing.assert_array_equal(np.asarray(reader.levels[0][:300, :400]), he_image[:300, :400])  # level 0 now

    builds, real_build = [], overview_cache.build_overview
    monkeypatch.setattr(overview_cache, "build_overview", lambda *a, **k: builds.append(a))
    opened = []
    waiter = threading.Thread(target=lambda: opened.append(open_slide(path, mpp=0.5)))
    waiter.start()
    gate.set()
    store = build.result(timeout=60)
    waiter.join(60)
    assert builds == [] and opened[0].properties["mupad.overview_cache"] == str(store)
    assert np.asarray(reader.levels[-1]).std() > 10  # the same arrays now read the finished overview
    monkeypatch.setattr(overview_cache, "mean_pool", real_pool)
    monkeypatch.setattr(overview_cache, "build_overview", real_build)
    shutil.rmtree(tmp_path / "home")
    with open_slide(path, mpp=0.5) as plain:  # a fresh synchronous build of the same file
        for mine, theirs in zip(opened[0].levels[1:], plain.levels[1:]):
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    opened[0].close()
    reader.close()
    assert [p.name for p in store.parent.iterdir() if ".partial-" in p.name] == []


def test_a_background_build_that_fails_leaves_no_partial_and_says_why(he_image, tmp_path, monkeypatch):
    path = write_flat(tmp_path / "flat.tif", he_image, "tiled")

    def broken(pixels, factor):
        raise OSError("disk full")

    monkeypatch.setattr(overview_cache, "mean_pool", broken)
    with open_slide(path, mpp=0.5, overview="background") as reader:
        with pytest.raises(OSError, match="disk full"):
            reader.overview_build.result(timeout=60)
    store = overview_cache.cache_path(path)
    assert not store.exists() and list(store.parent.glob("*.partial-*")) == []


def test_partials_of_dead_processes_are_removed_by_the_next_build(he_image, tmp_path):
    path = write_flat(tmp_path / "flat.tif", he_image, "tiled")
    store = overview_cache.cache_path(path)
    dead = store.with_name(f"{store.name}.partial-999999999-deadbeef")  # no such pid
    dead.mkdir(parents=True)
    with open_slide(path, mpp=0.5):
        pass
    assert not dead.exists() and store.exists()
