"""Pyramidal OME-TIFF export: pixels, pyramid, OME-XML against the schema, streaming, crash safety,
and the `mupad export` / `mupad stain -o X.ome.tif` commands."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from ome_types import from_xml

from mupad_core.cli import main
from mupad_core.slide.readers import open_slide
from mupad_core.store import PyramidWriter
from mupad_core.store.ometiff import PROVENANCE_NAMESPACE, ExportError, export_ome_tiff

PROVENANCE = {"model_id": "demo-he2mif", "task": "he2mif", "steps": 20, "engine": {"seed": 0}}


def write_store(path, image_cyx, *, kind, names=None, colours=None, mpp=(0.25, 0.25)):
    writer = PyramidWriter(path, shape_yx=image_cyx.shape[1:], channels=image_cyx.shape[0], dtype=image_cyx.dtype,
                           mpp=mpp, kind=kind, channel_names=names, channel_colors=colours, provenance=PROVENANCE,
                           min_level_px=256)
    for top in range(0, image_cyx.shape[1], writer.chunk):
        for left in range(0, image_cyx.shape[2], writer.chunk):
            writer.write_tile(top, left, image_cyx[:, top : top + writer.chunk, left : left + writer.chunk])
    return writer.finalize()


@pytest.fixture
def he_store(tmp_path, cmu1):
    with open_slide(cmu1) as slide:
        pixels = slide.read_region(0, 300, 700, 1000, 700)  # real H&E, not a multiple of the tile
    return write_store(tmp_path / "he.ome.zarr", np.moveaxis(pixels, -1, 0).copy(), kind="rgb", mpp=(0.499, 0.499))


@pytest.fixture
def mif_store(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((3, 600, 900)) * 4000).astype(np.uint16)
    return write_store(tmp_path / "mif.ome.zarr", image, kind="fluorescence", names=["DAPI", "Lap2beta", "Ki67"],
                       colours=["0000FF", "00FF00", "FF0000"])


def assert_same_pyramid(store, tiff):
    with open_slide(store) as original, open_slide(tiff) as exported:
        assert len(exported.levels) == len(original.levels) >= 2
        for a, b in zip(original.levels, exported.levels):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        assert exported.mpp == pytest.approx(original.mpp)
        assert exported.kind == original.kind
        if original.kind == "fluorescence":
            assert exported.channel_names == original.channel_names


def test_rgb_result_round_trips_as_a_subifd_pyramid_with_valid_ome_xml(he_store, tmp_path):
    out = export_ome_tiff(open_slide(he_store), tmp_path / "he.ome.tif", tile=256)
    assert_same_pyramid(he_store, out)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        assert len(tif.pages[0].subifds) == len(tif.series[0].levels) - 1 == 2
        ome = from_xml(tif.ome_metadata, validate=True)
    pixels = ome.images[0].pixels
    assert (pixels.size_x, pixels.size_y, pixels.physical_size_x) == (1000, 700, pytest.approx(0.499))
    (annotation,) = ome.structured_annotations.map_annotations
    assert annotation.namespace == PROVENANCE_NAMESPACE
    record = {m.k: m.value for m in annotation.value.ms}
    assert record["model_id"] == "demo-he2mif" and record["steps"] == "20" and record["generated"] == "true"


def test_fluorescence_keeps_dtype_channel_names_and_colours(mif_store, tmp_path):
    out = export_ome_tiff(open_slide(mif_store), tmp_path / "mif.ome.tiff")
    assert_same_pyramid(mif_store, out)
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].axes == "CYX" and tif.series[0].dtype == np.uint16
        ome = from_xml(tif.ome_metadata, validate=True)
    channels = ome.images[0].pixels.channels
    assert [c.name for c in channels] == ["DAPI", "Lap2beta", "Ki67"]
    assert [c.color.as_rgb_tuple()[:3] for c in channels] == [(0, 0, 255), (0, 255, 0), (255, 0, 0)]


def test_export_reads_one_tile_at_a_time(mif_store, tmp_path):
    reader = open_slide(mif_store)
    largest = []

    class Recording:
        def __init__(self, level):
            self.level, self.shape, self.dtype = level, level.shape, level.dtype

        def __getitem__(self, key):
            region = self.level[key]
            largest.append(region.shape[0] * region.shape[1])
            return region

    reader.levels = [Recording(level) for level in reader.levels]
    export_ome_tiff(reader, tmp_path / "tiles.ome.tif", tile=128)
    assert largest and max(largest) <= 128 * 128


def test_an_interrupted_export_leaves_nothing_that_looks_finished(mif_store, tmp_path):
    out = tmp_path / "cut.ome.tif"

    def interrupt(done, total):
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_ome_tiff(open_slide(mif_store), out, progress=interrupt)
    assert list(tmp_path.glob("cut*")) == []


@pytest.mark.parametrize("name,problem", [("x.tif", "ends in .ome.tif"), ("x.ome.tif", "multiple of 16")])
def test_bad_requests_name_the_file(he_store, tmp_path, name, problem):
    with pytest.raises(ExportError, match=problem) as error:
        export_ome_tiff(open_slide(he_store), tmp_path / name, tile=100)
    assert name in str(error.value)


def test_stain_to_ome_tiff_matches_the_ome_zarr_run(cmu1, tmp_path, capsys):
    common = ["--model", "identity", "--target-mpp", "4", "--quiet"]
    assert main(["stain", str(cmu1), "-o", str(tmp_path / "a.ome.zarr"), *common]) == 0
    assert main(["stain", str(cmu1), "-o", str(tmp_path / "a.ome.tif"), *common]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "a.ome.zarr"), str(tmp_path / "a.ome.tif")]
    assert_same_pyramid(tmp_path / "a.ome.zarr", tmp_path / "a.ome.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.tif", "a.ome.zarr"]  # the work store is gone


def test_stain_resumes_an_interrupted_conversion(cmu1, tmp_path, monkeypatch, capsys):
    import mupad_core.store.ometiff as ometiff

    out = tmp_path / "b.ome.tif"
    real = ometiff.export_ome_tiff

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ometiff, "export_ome_tiff", interrupted)
    args = ["stain", str(cmu1), "-o", str(out), "--model", "identity", "--target-mpp", "4", "--quiet"]
    assert main(args) == 130
    assert not out.exists() and (tmp_path / "b.ome.tif.work.ome.zarr").exists()
    monkeypatch.setattr(ometiff, "export_ome_tiff", real)
    assert main([*args, "--resume"]) == 0
    assert out.exists() and not (tmp_path / "b.ome.tif.work.ome.zarr").exists()


def test_export_command_and_its_errors(mif_store, tmp_path, capsys):
    out = tmp_path / "cmd.ome.tif"
    assert main(["export", str(mif_store), str(out), "--quiet"]) == 0
    assert_same_pyramid(mif_store, out)
    assert main(["export", str(mif_store), str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["stain", str(mif_store), "-o", str(tmp_path / "c.ome.zarr"), "--format", "ome-tiff",
                 "--model", "identity", "--quiet"]) == 1
    assert "must end in .ome.tif" in capsys.readouterr().err
