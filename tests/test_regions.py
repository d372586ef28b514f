"""GeoJSON regions (QuPath's annotation export) through `mupad stain --regions`.

The fixture tests/data/qupath-regions.geojson is written by hand from the format QuPath
exports: a FeatureCollection of annotations in level-0 pixels, a Polygon with a hole, a
MultiPolygon (a triangle and a square) and a Point (not a region, ignored)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from mupad_core.cli import main
from mupad_core.slide.readers import open_slide
from mupad_core.slide.regions import RegionsError, read_regions
from mupad_core.store import validate_omezarr

REGIONS = Path(__file__).parent / "data" / "qupath-regions.geojson"


def test_reads_polygons_holes_and_multipolygons():
    regions = read_regions(REGIONS, slide_size=(2220, 2967))
    assert len(regions.polygons) == 3  # the polygon and the MultiPolygon's two parts; the point is skipped
    assert len(regions.polygons[0].holes) == 1
    assert regions.bbox() == (400, 900, 1100, 700)
    mask = regions.mask(regions.bbox(), (1.0, 1.0), 0, 0, 700, 1100)
    assert mask[50, 50] and not mask[150, 150]  # inside region 1; inside its hole
    assert not mask[50, 400] and mask[150, 650] and mask[650, 1050]  # between regions; triangle; square


def test_stain_covers_exactly_the_regions(cmu1, tmp_path):
    out = tmp_path / "regions.ome.zarr"
    assert main(["stain", str(cmu1), "-o", str(out), "--model", "identity", "--regions", str(REGIONS),
                 "--quiet"]) == 0
    validate_omezarr(out)
    group = zarr.open_group(str(out), mode="r")
    image = group["0"][:]
    assert image.shape == (3, 700, 1100)  # the regions' bounding box at the slide's own pixel size
    with open_slide(cmu1) as reader:
        source = reader.read_region(0, 400, 900, 1100, 700).transpose(2, 0, 1)
    mask = read_regions(REGIONS).mask((400, 900, 1100, 700), (1.0, 1.0), 0, 0, 700, 1100)
    np.testing.assert_array_equal(image[:, mask], source[:, mask])  # inside: the source itself
    assert (image[:, ~mask] == 255).all()  # outside, and in the hole: background
    recorded = group.attrs["mupad"]["regions"]
    assert recorded["file"] == str(REGIONS) and len(recorded["geojson"]["features"]) == 3


@pytest.mark.parametrize(
    "content,expect",
    [
        ("{not json", "not JSON"),
        (json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]}), "no Polygon"),
        (json.dumps({"type": "Polygon", "coordinates": [[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]]}),
         "lies outside the slide"),
        (json.dumps({"type": "Polygon", "coordinates": [[[1, 2]]]}), "malformed Polygon"),
    ],
    ids=["not-json", "no-polygons", "outside-slide", "malformed"],
)
def test_bad_geojson_is_one_line_naming_the_file(cmu1, tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.geojson"
    bad.write_text(content)
    out = tmp_path / "out.ome.zarr"
    assert main(["stain", str(cmu1), "-o", str(out), "--model", "identity", "--regions", str(bad), "--quiet"]) != 0
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "bad.geojson" in line and expect in line, line
    assert not out.exists()
    with pytest.raises(RegionsError):
        read_regions(bad, slide_size=(2220, 2967))
