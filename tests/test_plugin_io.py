"""The plugin's reader, writer and sample data, in a real napari viewer on real slides.

What matters: slides open lazily as the right layers (one RGB layer for brightfield, one
additive coloured layer per fluorescence channel) at their physical scale; damaged files
give a notification naming the file and leave the viewer working; exported layers pass
OME-Zarr validation and reopen with the same pixels, scale, channels and provenance.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import dask.array as da
import numpy as np
import openslide
import pytest
import tifffile
import zarr
from napari.utils.notifications import notification_manager
from npe2 import PluginManifest
from qtpy.QtCore import QTimer

from mupad_core.slide.readers import SlideError
from mupad_core.slide.readers import base as reader_base
from mupad_core.store import PyramidWriter, validate_omezarr
from mupad_core.store.omezarr import NOTICE
from napari_mupad import _writer
from napari_mupad._reader import get_reader, read_slide
from napari_mupad._sample_data import bundled_slide_path

from helpers import figures_dir, settle_canvas

PLUGIN = "napari-mupad"
NDPI_DAPI = "slides/hamamatsu-ndpi-fluorescence/test3-DAPI-2-387.ndpi"
OME_TIFF = "he_tiles/OS-1-detail.ome.tif"
FIXTURES = "slides/openslide-python-fixtures"
MIF_NAMES = ["DAPI", "CD3", "PanCK"]
MIF_COLORS = ["0000FF", "FF8000", "00FF00"]
MIF_WINDOWS = [(100.0, 3000.0), (50.0, 1500.0), (0.0, 4000.0)]
LAST_UNHANDLED = ("last_type", "last_value", "last_traceback")
GENERATED = {"model_id": "mupad-sit-test", "task": "he_to_mif", "seed": 11, "steps": 8}


def brightest_rgb(layer) -> tuple[float, float, float]:
    return tuple(float(v) for v in layer.colormap.colors[-1][:3])


def hex_rgb(color: str) -> tuple[float, float, float]:
    return tuple(int(color[i : i + 2], 16) / 255 for i in (0, 2, 4))


def write_mif_store(path, version: str = "0.4") -> np.ndarray:
    """An mIF-like (3, 600, 700) uint16 OME-Zarr from PyramidWriter, as the engine writes it."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 4000, (3, 600, 700)).astype(np.uint16)
    writer = PyramidWriter(
        path,
        image.shape[1:],
        3,
        dtype="uint16",
        mpp=(0.5, 0.5),
        version=version,
        kind="fluorescence",
        channel_names=MIF_NAMES,
        channel_colors=MIF_COLORS,
        channel_windows=MIF_WINDOWS,
        provenance=GENERATED,
        min_level_px=128,
    )
    for y, x in writer.pending_tiles():
        writer.write_tile(y, x, image[:, y : y + 256, x : x + 256])
    writer.finalize()
    return image


# -- reader ------------------------------------------------------------------------------


def test_svs_opens_as_one_lazy_rgb_multiscale_layer(make_napari_viewer):
    path = bundled_slide_path()
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)

    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = layers[0]
    assert layer.rgb and layer.multiscale
    assert all(isinstance(level, da.Array) for level in layer.data)
    width, height = openslide.OpenSlide(str(path)).dimensions
    assert layer.data[0].shape == (height, width, 3) == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(unit) for unit in layer.units] == ["micrometer", "micrometer"]
    assert tuple(layer.contrast_limits) == (0, 255)  # fixed: no statistics pass over the slide
    assert layer.name == "CMU-1-Small-Region"
    assert layer.metadata["path"] == str(path)
    assert layer.metadata["vendor"] == "aperio"
    assert layer.metadata["mpp"] == pytest.approx((0.499, 0.499))
    assert layer.metadata["provenance"] is None
    expected = np.asarray(openslide.OpenSlide(str(path)).read_region((1000, 1200), 0, (300, 200)))[..., :3]
    np.testing.assert_array_equal(layer.data[0][1200:1400, 1000:1300].compute(), expected)


def test_ndpi_fluorescence_opens_as_additive_channel_layers(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    layers = viewer.open(shared_data / NDPI_DAPI, plugin=PLUGIN)

    assert [layer.name for layer in layers] == ["R", "G", "DAPI 2 (387)"]
    for layer, color in zip(layers, ["FF0000", "00FF00", "0000FF"]):
        assert not layer.rgb and layer.multiscale
        assert len(layer.data) == 7
        assert layer.data[-1].shape == (76, 62)
        assert tuple(layer.scale) == pytest.approx((0.2282, 0.2282), abs=1e-4)
        assert layer.blending == "additive"
        assert brightest_rgb(layer) == pytest.approx(hex_rgb(color))
    dapi = layers[2]
    assert dapi.metadata["channel"] == "DAPI 2 (387)" and dapi.metadata["kind"] == "fluorescence"
    assert dapi.data[-1].compute().mean() > 5 * layers[0].data[-1].compute().mean()


def test_ome_tiff_opens(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(shared_data / OME_TIFF, plugin=PLUGIN)
    assert layer.rgb and layer.name == "OS-1-detail"
    assert layer.data[0].shape == (1101, 1101, 3)
    assert tuple(layer.scale) == pytest.approx((0.2271, 0.2271), abs=1e-4)
    assert layer.metadata["vendor"] == "ome-tiff"
    expected = tifffile.imread(shared_data / OME_TIFF)[500:600, 400:550]
    np.testing.assert_array_equal(layer.data[0][500:600, 400:550].compute(), expected)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_mif_ome_zarr_opens_as_named_coloured_additive_layers(make_napari_viewer, tmp_path, version):
    path = tmp_path / "panel.ome.zarr"
    image = write_mif_store(path, version)
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)

    assert [layer.name for layer in layers] == MIF_NAMES
    for index, layer in enumerate(layers):
        assert layer.blending == "additive"
        assert brightest_rgb(layer) == pytest.approx(hex_rgb(MIF_COLORS[index]))
        assert tuple(layer.contrast_limits) == MIF_WINDOWS[index]
        assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
        assert len(layer.data) == 4  # 600, 300, 150, 75
        np.testing.assert_array_equal(layer.data[0].compute(), image[index])
        provenance = layer.metadata["provenance"]
        assert provenance.items() >= GENERATED.items()
        assert provenance["not_for_diagnosis"] is True
        assert layer.metadata["notice"] == NOTICE


def test_file_without_pixel_size_opens_in_pixels_with_a_warning(make_napari_viewer, shared_data):
    path = shared_data / FIXTURES / "boxes.tiff"
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert tuple(layer.scale) == (1, 1)
    assert [str(unit) for unit in layer.units] == ["pixel", "pixel"]
    assert layer.metadata["mpp"] is None
    warnings = [str(n.message) for n in notification_manager.records[before:] if n.severity == "warning"]
    assert any("boxes.tiff" in message and "pixels (scale 1)" in message for message in warnings), warnings


def test_get_reader_claims_only_what_it_can_read(tmp_path):
    write_mif_store(tmp_path / "no-suffix-ngff", "0.5")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")  # a zarr group but no image
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dicom-slide").mkdir()
    (tmp_path / "dicom-slide" / "level0.dcm").touch()
    for claimed in ["slide.svs", "scan.NDPI", "x.ome.tif", "tile.png", "no-suffix-ngff", "dicom-slide"]:
        assert get_reader(str(tmp_path / claimed)) is not None, claimed
    for refused in ["notes.txt", "folder", "plain.zarr", "table.csv"]:
        assert get_reader(str(tmp_path / refused)) is None, refused
    assert get_reader([str(tmp_path / "a.svs"), str(tmp_path / "b.svs")]) is None


def _zero_byte_svs(shared_data, tmp_path):
    path = tmp_path / "zero.svs"
    path.touch()
    return path


@pytest.mark.parametrize(
    ("make_path", "problem"),
    [
        (lambda data, tmp: data / FIXTURES / "unopenable.tiff", "compression: 52479"),
        (lambda data, tmp: data / "slides/histolab/broken.svs", "not a slide format"),
        (_zero_byte_svs, "is empty (0 bytes)"),
        (lambda data, tmp: data / FIXTURES / "unreadable.svs", "cannot read level 0"),  # opens, tiles fail
    ],
    ids=["unopenable-tiff", "broken-svs", "zero-byte-svs", "unreadable-tiles-svs"],
)
def test_corrupt_file_gives_a_notification_and_the_viewer_survives(
    make_napari_viewer, qtbot, shared_data, tmp_path, make_path, problem
):
    path = make_path(shared_data, tmp_path)
    viewer = make_napari_viewer()
    qt_viewer = viewer.window._qt_viewer
    before = len(notification_manager.records)
    unhandled_before = {name: getattr(sys, name) for name in LAST_UNHANDLED if hasattr(sys, name)}

    def error_messages() -> list[str]:
        return [str(n.message) for n in notification_manager.records[before:] if n.severity == "error"]

    # As from File > Open: the error leaves Qt's event loop, napari's hook makes it a notification.
    with notification_manager:
        QTimer.singleShot(0, lambda: qt_viewer._qt_open([str(path)], stack=False, plugin=PLUGIN))
        qtbot.waitUntil(lambda: bool(error_messages()), timeout=10000)
    errors = error_messages()
    # The records and sys.last_* (set for the unhandled error) hold tracebacks that hold the
    # viewer; napari's fixture would report it as leaked.
    del notification_manager.records[before:]
    for name, value in unhandled_before.items():
        setattr(sys, name, value)
    for name in set(LAST_UNHANDLED) - set(unhandled_before):
        if hasattr(sys, name):
            delattr(sys, name)
    assert len(errors) == 1, errors
    assert str(path) in errors[0] and problem in errors[0]
    assert "\n" not in errors[0]
    assert len(viewer.layers) == 0  # no half-made layer

    (layer,) = viewer.open(bundled_slide_path(), plugin=PLUGIN)
    assert layer.data[0].shape == (2967, 2220, 3)


def test_reader_function_fails_at_open_when_tiles_cannot_be_read(shared_data):
    """Caught at open (one probe pixel), not half-way through drawing, whatever napari's slicing mode."""
    path = shared_data / FIXTURES / "unreadable.svs"
    with pytest.raises(SlideError, match=r"unreadable\.svs: cannot read level 0") as raised:
        get_reader(str(path))(str(path))
    assert "\n" not in str(raised.value)


# -- sample data ---------------------------------------------------------------------------


def test_a_big_flat_png_opens_as_a_cached_multiscale_layer(make_napari_viewer, tmp_path, monkeypatch, qtbot):
    from PIL import Image

    from mupad_core.slide.readers import overview_cache

    monkeypatch.setenv("MUPAD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(overview_cache, "MIN_FLAT_SIDE_PX", 1500)  # stands in for a 40k² image
    with openslide.OpenSlide(str(bundled_slide_path())) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    viewer = make_napari_viewer(show=True)
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer.multiscale and len(layer.data) == 2  # level 0 and 4x, both from the cache
    assert all(level.name.startswith("overview-") for level in layer.data)  # the PNG is not decoded again
    np.testing.assert_array_equal(layer.data[0][:64, :64].compute(), pixels[:64, :64])
    settle_canvas(viewer, qtbot)
    viewer.reset_view()
    shot = viewer.screenshot(str(figures_dir() / "plugin-flat-image.png"), canvas_only=True, flash=False)
    assert shot[..., :3].std() > 10  # tissue drawn, not a blank canvas


def test_a_big_flat_tiff_opens_at_once_and_its_overview_fills_in(make_napari_viewer, tmp_path, monkeypatch, qtbot):
    """The layer is there before any coarse level is built (blank, white glass, where nothing is
    yet), redraws as bands are built, and draws from the finished cache when the thread is done."""
    import threading

    import tifffile

    from mupad_core.slide.readers import overview_cache
    from napari_mupad._reader import OverviewWatcher

    monkeypatch.setenv("MUPAD_HOME", str(tmp_path / "home"))
    # Stand-ins for a 40k² image: a lower threshold, and small bands so the build has 15 blocks.
    for name, value in (("MIN_FLAT_SIDE_PX", 1500), ("COARSEST_SIDE_PX", 256), ("BAND_ROWS", 512),
                        ("BLOCK_COLUMNS", 1024), ("CHUNK_PX", 128)):
        monkeypatch.setattr(overview_cache, name, value)
    monkeypatch.setattr(OverviewWatcher, "refresh_s", 0.0)  # redraw at every block
    with openslide.OpenSlide(str(bundled_slide_path())) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), compression="zlib", photometric="rgb")
    gate, real_pool, first_level_pools = threading.Event(), overview_cache.mean_pool, []

    def held_pool(px, factor):  # the build stops after 8 of its 15 blocks until the test lets it go
        if factor == overview_cache.FIRST_FACTOR:
            first_level_pools.append(1)
            if len(first_level_pools) > 8:
                gate.wait(30)
        return real_pool(px, factor)

    monkeypatch.setattr(overview_cache, "mean_pool", held_pool)
    viewer = make_napari_viewer(show=True)
    (layer,) = viewer.open(path, plugin=PLUGIN)
    level0 = layer.data[0]
    assert layer.multiscale and len(layer.data) == 4  # level 0, 4x, 8x, 16x
    assert layer.metadata["mupad_overview_building"].endswith(".zarr")
    np.testing.assert_array_equal(np.asarray(layer.data[0][:64, :64]), pixels[:64, :64])  # the file itself, now

    qtbot.waitUntil(lambda: "building8-" in layer.data[-1].name, timeout=60_000)  # redrawn after block 8
    coarsest = np.asarray(layer.data[-1])
    assert coarsest[:16].std() > 10 and np.all(coarsest[-16:] == 255)  # top bands built, the rest blank
    settle_canvas(viewer, qtbot)
    viewer.reset_view()
    viewer.screenshot(str(figures_dir() / "plugin-flat-tiff-building.png"), canvas_only=True, flash=False)

    gate.set()
    qtbot.waitUntil(lambda: "mupad_overview_building" not in layer.metadata, timeout=60_000)
    assert layer.data[0] is level0  # the file stays open through the swaps
    assert all(level.name.startswith("overview-") and "building" not in level.name for level in layer.data[1:])
    coarse = np.asarray(layer.data[1]).astype(float)
    assert np.abs(coarse[:100, :100] - pixels[:400, :400].reshape(100, 4, 100, 4, 3).mean(axis=(1, 3))).max() <= 0.5
    settle_canvas(viewer, qtbot)
    shot = viewer.screenshot(str(figures_dir() / "plugin-flat-tiff-built.png"), canvas_only=True, flash=False)
    assert shot[..., :3].std() > 10  # tissue drawn from the finished overview


def test_the_reader_closes_the_file_when_its_last_layer_is_gone(make_napari_viewer, tmp_path, monkeypatch):
    import gc

    from mupad_core.slide.readers import BACKENDS

    closed = []
    for cls in BACKENDS.values():
        monkeypatch.setattr(cls, "close", lambda self, real=cls.close: closed.append(str(self.path)) or real(self))
    source = tmp_path / "panel.ome.zarr"
    write_mif_store(source)
    viewer = make_napari_viewer()
    viewer.open(bundled_slide_path(), plugin=PLUGIN)
    panel = viewer.open(source, plugin=PLUGIN)
    assert len(panel) == 3 and closed == []
    viewer.layers.remove(panel[0])
    viewer.layers.remove(panel[1])
    del panel
    gc.collect()
    assert closed == []  # one marker layer still reads the store
    viewer.layers.clear()
    gc.collect()
    assert sorted(closed) == sorted([str(bundled_slide_path()), str(source)])


def test_sample_data_is_the_bundled_cc0_slide(make_napari_viewer):
    manifest = PluginManifest.from_distribution(PLUGIN)
    (sample,) = [s for s in manifest.contributions.sample_data if s.key == "cmu1-small-region"]
    assert "CC0" in sample.display_name and "OpenSlide" in sample.display_name

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu1-small-region")
    (layer,) = viewer.layers
    assert layer.name == "CMU-1-Small-Region" and layer.rgb
    assert layer.data[0].shape == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))


# -- laziness ------------------------------------------------------------------------------


@pytest.fixture
def pixel_reads(monkeypatch):
    """(level, pixel count) of every read the tifffile/OME-Zarr backends make."""
    reads: list[tuple[int, int]] = []
    original = reader_base.GuardedArray.__getitem__

    def counting_getitem(self, key):
        pixels = original(self, key)
        reads.append((self.level, math.prod(pixels.shape[:2]) if pixels.ndim >= 2 else pixels.size))
        return pixels

    monkeypatch.setattr(reader_base.GuardedArray, "__getitem__", counting_getitem)
    return reads


def write_large_pyramidal_tiff(path, side: int = 8192, levels: int = 5) -> None:
    """A (side, side, 3) OME-TIFF with a SubIFD pyramid, tiles of one grey each (fast to write)."""

    def tiles(size: int):
        for row in range(size // 256):
            for col in range(size // 256):
                yield np.full((256, 256, 3), (row * 7 + col * 13) % 256, np.uint8)

    options = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb", "dtype": np.uint8}
    metadata = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(tiles(side), shape=(side, side, 3), subifds=levels - 1, metadata=metadata, **options)
        for level in range(1, levels):
            size = side >> level
            tif.write(tiles(size), shape=(size, size, 3), subfiletype=1, **options)


def test_opening_a_large_slide_reads_almost_nothing(make_napari_viewer, qtbot, tmp_path, pixel_reads):
    path = tmp_path / "large.ome.tif"
    write_large_pyramidal_tiff(path)
    level0_pixels = 8192 * 8192

    layer_data = get_reader(str(path))(str(path))
    (levels, meta, layer_type) = layer_data[0]
    assert layer_type == "image" and meta["rgb"]
    assert meta["contrast_limits"] == [0, 255]  # given, so napari computes no statistics
    assert [level.shape[0] for level in levels] == [8192, 4096, 2048, 1024, 512]
    assert all(isinstance(level, da.Array) for level in levels)
    # the reader itself probes one pixel of the coarsest level (one tile) and nothing else
    assert {level for level, _ in pixel_reads} == {4} and sum(n for _, n in pixel_reads) <= 512 * 512

    pixel_reads.clear()
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    viewer.reset_view()
    qtbot.wait(200)
    assert all(isinstance(level, da.Array) for level in layer.data)
    # zoomed out on an 800x600 canvas napari draws a coarse level (1024 px here), never the top ones
    assert not [level for level, _ in pixel_reads if level < 2], sorted(set(pixel_reads))
    assert sum(n for _, n in pixel_reads) < 0.05 * level0_pixels


# -- writer --------------------------------------------------------------------------------


def test_export_rgb_slide_round_trips(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(bundled_slide_path(), plugin=PLUGIN)
    layer.metadata["provenance"] = {**GENERATED, "task": "he_to_ihc"}
    out = tmp_path / "export.ome.zarr"

    written = viewer.layers.save(str(out), plugin=PLUGIN)

    assert written == [str(out)]
    assert not out.with_name(out.name + ".partial").exists()
    validate_omezarr(out)
    (reopened,) = viewer.open(out, plugin=PLUGIN)
    assert reopened.rgb and reopened.name == "export"
    assert tuple(reopened.scale) == pytest.approx(tuple(layer.scale))
    np.testing.assert_array_equal(reopened.data[0].compute(), layer.data[0].compute())
    provenance = reopened.metadata["provenance"]
    assert provenance.items() >= {**GENERATED, "task": "he_to_ihc"}.items()
    assert provenance["source"] == str(bundled_slide_path())
    assert reopened.metadata["notice"] == NOTICE


def test_export_of_a_scanned_region_is_not_labelled_generated(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(bundled_slide_path(), plugin=PLUGIN)
    out = tmp_path / "scan.ome.zarr"
    viewer.layers.save(str(out), plugin=PLUGIN)
    validate_omezarr(out)
    (reopened,) = viewer.open(out, plugin=PLUGIN)
    assert reopened.metadata["provenance"]["generated"] is False
    assert reopened.metadata["notice"] is None


def test_export_channel_layers_round_trips_as_one_mif_store(make_napari_viewer, tmp_path):
    source = tmp_path / "panel.ome.zarr"
    image = write_mif_store(source)
    viewer = make_napari_viewer()
    layers = viewer.open(source, plugin=PLUGIN)
    layers[1].contrast_limits = (10, 900)  # a display change the export keeps
    out = tmp_path / "exported.ome.zarr"

    assert viewer.layers.save(str(out), plugin=PLUGIN) == [str(out)]

    validate_omezarr(out)
    viewer.layers.clear()  # else napari renames the new layers "DAPI [1]"...
    reopened = viewer.open(out, plugin=PLUGIN)
    assert [layer.name for layer in reopened] == MIF_NAMES
    for index, layer in enumerate(reopened):
        np.testing.assert_array_equal(layer.data[0].compute(), image[index])
        assert brightest_rgb(layer) == pytest.approx(hex_rgb(MIF_COLORS[index]))
        assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
        assert layer.blending == "additive"
        assert layer.metadata["provenance"].items() >= GENERATED.items()
    assert tuple(reopened[1].contrast_limits) == (10, 900)
    assert tuple(reopened[0].contrast_limits) == MIF_WINDOWS[0]


def test_export_rgb_layer_to_pyramidal_ome_tiff(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(bundled_slide_path(), plugin=PLUGIN)
    layer.metadata["provenance"] = {**GENERATED, "task": "he2ihc"}
    out = tmp_path / "for-qupath.ome.tif"

    assert viewer.layers.save(str(out), plugin=PLUGIN) == [str(out)]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["for-qupath.ome.tif"]  # no stage left behind
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 2
        from ome_types import from_xml

        record = {m.k: m.value for m in from_xml(tif.ome_metadata, validate=True).structured_annotations
                  .map_annotations[0].value.ms}
    assert record["model_id"] == GENERATED["model_id"] and record["task"] == "he2ihc"
    (reopened,) = viewer.open(out, plugin=PLUGIN)
    assert tuple(reopened.scale) == pytest.approx(tuple(layer.scale))
    np.testing.assert_array_equal(reopened.data[0].compute(), layer.data[0].compute())


def test_export_channel_layers_to_one_ome_tiff(make_napari_viewer, tmp_path):
    source = tmp_path / "panel.ome.zarr"
    image = write_mif_store(source)
    viewer = make_napari_viewer()
    viewer.open(source, plugin=PLUGIN)
    out = tmp_path / "panel.ome.tiff"

    assert viewer.layers.save(str(out), plugin=PLUGIN) == [str(out)]

    viewer.layers.clear()
    reopened = viewer.open(out, plugin=PLUGIN)
    assert [layer.name for layer in reopened] == MIF_NAMES
    for index, layer in enumerate(reopened):
        np.testing.assert_array_equal(layer.data[0].compute(), image[index])
        assert brightest_rgb(layer) == pytest.approx(hex_rgb(MIF_COLORS[index]))


def test_a_real_mif_panel_in_ome_tiff_reopens_with_its_markers_and_colours(make_napari_viewer, tmp_path,
                                                                          shared_data, qtbot):
    """DeepLIIF's real DAPI / Lap2β / Ki67 immunofluorescence as a store, exported to an
    OME-TIFF for QuPath and opened back: one additive layer per marker, named and coloured."""
    from PIL import Image

    from mupad_core.slide.readers import open_slide
    from mupad_core.store.ometiff import export_ome_tiff

    tile = np.asarray(Image.open(shared_data / "mif" / "deepliif" / "Lung1.png").convert("RGB"))
    markers = np.stack([tile[:, 1024:1536, 0], tile[:, 1536:2048, 1], tile[:, 2048:2560, 0]])
    names, colours = ["DAPI", "Lap2beta", "Ki67"], ["0000FF", "00FF00", "FF0000"]
    writer = PyramidWriter(tmp_path / "panel.ome.zarr", markers.shape[1:], 3, dtype="uint8", mpp=(0.25, 0.25),
                           kind="fluorescence", channel_names=names, channel_colors=colours,
                           provenance={"source": "DeepLIIF Lung1 (real mpIF)"}, min_level_px=128)
    for y, x in writer.pending_tiles():
        writer.write_tile(y, x, markers[:, y : y + 256, x : x + 256])
    writer.finalize()
    out = tmp_path / "panel.ome.tif"
    with open_slide(tmp_path / "panel.ome.zarr") as reader:
        export_ome_tiff(reader, out)
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(out, plugin=PLUGIN)
    assert [layer.name for layer in layers] == names
    for index, layer in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(layer.data[0]), markers[index])
        assert layer.blending == "additive"
        assert brightest_rgb(layer) == pytest.approx(hex_rgb(colours[index]))
    settle_canvas(viewer, qtbot)
    viewer.reset_view()
    shot = viewer.screenshot(str(figures_dir() / "plugin-ome-tiff-mif.png"), canvas_only=True, flash=False)
    assert shot[..., 2].mean() > 5 and shot[..., 1].mean() > 5  # DAPI blue and Lap2β green are drawn


def test_single_channel_export_keeps_name_colour_and_scale(tmp_path):
    pixels = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)
    meta = {
        "name": "CD8",
        "colormap": "magenta",
        "contrast_limits": [0, 5000],
        "scale": (0.25, 0.25),
        "units": ("micrometer", "micrometer"),
        "metadata": {},
    }
    out = tmp_path / "cd8.zarr"
    assert _writer.write_image_layer(str(out), pixels, meta) == [str(out)]
    ((levels, reopened, _),) = read_slide(out)
    assert reopened["name"] == "CD8" and reopened["colormap"] == "magenta"
    assert reopened["scale"] == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(levels[0].compute(), pixels)


class RecordingArray:
    """A (H, W) array-like that records the size of every region read from it."""

    def __init__(self, shape, dtype=np.uint8):
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)
        self.region_pixels: list[int] = []

    def __getitem__(self, key):
        rows, cols = key
        region = np.full((rows.stop - rows.start, cols.stop - cols.start), (rows.start + cols.start) % 251, self.dtype)
        self.region_pixels.append(region.size)
        return region


def test_multiscale_export_streams_level0_in_regions(tmp_path):
    level0 = RecordingArray((5000, 4500))
    meta = {
        "name": "big",
        "multiscale": True,
        "colormap": "gray",
        "scale": (1.0, 1.0),
        "units": ("pixel", "pixel"),
        "metadata": {"mpp": (0.5, 0.5)},  # what our reader recorded: used when the scale is in pixels
    }
    out = tmp_path / "big.ome.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the recorded mpp is used: no "no pixel size" warning
        _writer.write_image_layer(str(out), [level0, RecordingArray((2500, 2250))], meta)
    assert max(level0.region_pixels) <= _writer.EXPORT_REGION_PX**2
    assert sum(level0.region_pixels) == 5000 * 4500  # every pixel read exactly once
    validate_omezarr(out)
    assert json.loads((out / ".zattrs").read_text())["multiscales"][0]["axes"][1]["unit"] == "micrometer"


