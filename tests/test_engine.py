"""Whole-slide engine on a real slide: identity exactness, seams, resume, bad ROIs."""

import math

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from mupad_core.demo import sample_slide_path
from mupad_core.generate.engine import Cancelled, StainConfig, blocks_with_tissue, run_stain
from mupad_core.generate.handles import DisagreeingWindowsHandle, IdentityHandle, SiTImageToImageHandle
from mupad_core.generate.seams import seam_ratio, window_edges
from mupad_core.models.sit import MupadSiT
from mupad_core.models.vae import PixelUnshuffleCodec
from mupad_core.slide.readers import open_slide
from mupad_core.slide.tissue import TissueMap
from mupad_core.store import validate_omezarr


@pytest.fixture
def cmu():
    reader = open_slide(sample_slide_path())  # bundled with the package: these tests never skip
    yield reader
    reader.close()


def level0(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["0"][:].transpose(1, 2, 0)


def test_identity_reproduces_the_roi_exactly(cmu, tmp_path):
    roi = (300, 500, 1000, 700)
    out = run_stain(cmu, IdentityHandle(), tmp_path / "id.ome.zarr", StainConfig(roi=roi))
    validate_omezarr(out)
    expected = cmu.read_region(0, *roi)
    assert np.array_equal(level0(out), expected)
    group = zarr.open_group(str(out), mode="r")
    assert "1" in group  # a pyramid, not a single level
    assert group.attrs["mupad"]["source"]["roi_level0"] == list(roi)


@pytest.mark.parametrize("factor", [1.0, 2.5])
def test_a_region_result_lies_where_the_region_lies(cmu, tmp_path, factor):
    """The store's origin puts output pixel 0's centre at the centre of the source pixels it
    averages, so a viewer that honours NGFF translations overlays it on the slide."""
    roi = (300, 500, 400, 300)
    src_x, src_y = cmu.level_mpp(0)
    out = run_stain(cmu, IdentityHandle(), tmp_path / "id.ome.zarr",
                    StainConfig(roi=roi, target_mpp=src_x * factor))
    validate_omezarr(out)
    with open_slide(out) as result:
        oy, ox = result.origin
        # Output pixel 0 averages source pixels [x0, x0 + s): its centre is x0 + (s - 1) / 2.
        s_x, s_y = factor, src_x * factor / src_y
        assert ox == pytest.approx((roi[0] + (s_x - 1) / 2) * src_x)
        assert oy == pytest.approx((roi[1] + (s_y - 1) / 2) * src_y)
        # Its left edge is the ROI's left edge on the slide.
        assert ox - result.mpp[0] / 2 == pytest.approx((roi[0] - 0.5) * src_x)


def test_fused_windows_leave_no_seams_where_naive_stitching_does(cmu, tmp_path):
    roi = (203, 605, 1024, 1024)  # off the source's 8-px JPEG grid, so its block edges don't line up with ours
    fused_cfg = StainConfig(roi=roi, steps=4, window_px=128, overlap_px=48, block_px=512, margin_px=128)
    naive_cfg = StainConfig(roi=roi, steps=4, window_px=128, overlap_px=0, block_px=512, margin_px=0)
    fused = level0(run_stain(cmu, DisagreeingWindowsHandle(), tmp_path / "fused.ome.zarr", fused_cfg))
    naive = level0(run_stain(cmu, DisagreeingWindowsHandle(), tmp_path / "naive.ome.zarr", naive_cfg))
    fused_ratio = seam_ratio(fused, window_edges(128, 48, 1024))
    naive_ratio = seam_ratio(naive, window_edges(128, 0, 1024))
    assert fused_ratio <= 1.05, fused_ratio
    assert naive_ratio > 1.2, naive_ratio
    # Blocks share the global window grid and noise: cutting the ROI into 512-px blocks
    # gives the very same pixels as generating it as one block.
    one_block = level0(run_stain(cmu, DisagreeingWindowsHandle(), tmp_path / "one.ome.zarr",
                                 StainConfig(**{**vars(fused_cfg), "block_px": 1024})))
    assert np.array_equal(fused, one_block)


def tiny_handle():
    torch.manual_seed(0)
    model = MupadSiT(in_channels=12, concat_channels=12, hidden_size=32, depth=1, num_heads=2)
    with torch.no_grad():  # non-zero output layers so the network really shapes the result
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return SiTImageToImageHandle(model, PixelUnshuffleCodec(2), "tiny-test", "0" * 64)


def test_cancel_then_resume_equals_uninterrupted_run_bit_for_bit(cmu, tmp_path):
    cfg = StainConfig(task="he2he", roi=(0, 0, 768, 512), steps=2, method="sde", seed=7,
                      window_px=128, overlap_px=32, block_px=256, margin_px=128)
    whole = level0(run_stain(cmu, tiny_handle(), tmp_path / "whole.ome.zarr", cfg))

    def stop_after_two(done, total):
        if done == 2:
            raise Cancelled()

    target = tmp_path / "resumed.ome.zarr"
    with pytest.raises(Cancelled):
        run_stain(cmu, tiny_handle(), target, cfg, progress=stop_after_two)
    assert not target.exists()  # nothing that looks complete
    assert target.with_name(target.name + ".partial").exists()
    seen = []
    cfg.resume = True
    out = run_stain(cmu, tiny_handle(), target, cfg, progress=lambda d, t: seen.append(d))
    validate_omezarr(out)
    assert np.array_equal(level0(out), whole)
    assert seen[-1] == 6


def test_roi_outside_the_slide_is_refused(cmu, tmp_path):
    with pytest.raises(ValueError, match="CMU-1-Small-Region.svs: ROI .* not inside the slide"):
        run_stain(cmu, IdentityHandle(), tmp_path / "x.ome.zarr", StainConfig(roi=(2000, 0, 500, 500)))
    assert not list(tmp_path.iterdir())


def test_background_blocks_are_skipped_not_generated(cmu, tmp_path):
    calls = []

    class Counting(DisagreeingWindowsHandle):
        def window_velocity(self, x, t, prepared, windows):
            calls.append(len(windows))
            return super().window_velocity(x, t, prepared, windows)

    # The slide's left edge below y=1536 is glass: that ROI's left blocks hold no tissue.
    cfg = StainConfig(roi=(0, 1600, 1024, 1024), steps=2, window_px=128, overlap_px=32, block_px=512, margin_px=128)

    everything = {(r, c) for r in range(2) for c in range(2)}
    blocks = blocks_with_tissue(TissueMap.of(cmu), cfg.roi, (1.0, 1.0), 1024, 1024, 512, 128)
    assert blocks and blocks != everything, f"fixture assumption: some but not all blocks have tissue ({blocks})"
    out = level0(run_stain(cmu, Counting(), tmp_path / "bg.ome.zarr", cfg))
    for row, col in everything - blocks:
        assert (out[row * 512 : (row + 1) * 512, col * 512 : (col + 1) * 512] == 255).all()
    assert len(calls) > 0


def test_windows_without_tissue_are_steered_to_glass_without_a_network_pass(cmu, tmp_path):
    """Inside blocks that hold tissue, windows with none near them cost no network pass: they
    land exactly on white glass, leave tissue pixels untouched, and blocks cut differently
    still give identical pixels."""
    sampled = []

    class Counting(DisagreeingWindowsHandle):  # velocities pointwise in x: tissue pixels comparable exactly
        def window_velocity(self, x, t, prepared, windows):
            sampled.append(len(windows))
            return super().window_velocity(x, t, prepared, windows)

    # The slide's left edge below y=1536 is glass, its right part tissue.
    cfg = StainConfig(roi=(0, 1600, 1024, 1024), steps=2, window_px=128, overlap_px=32, block_px=512, margin_px=128)
    skipping = level0(run_stain(cmu, Counting(), tmp_path / "skip.ome.zarr", cfg))
    skipping_passes = sum(sampled)
    sampled.clear()
    everything = level0(run_stain(cmu, Counting(), tmp_path / "all.ome.zarr",
                                  StainConfig(**{**vars(cfg), "skip_glass_windows": False})))
    assert 0 < skipping_passes < 0.8 * sum(sampled), (skipping_passes, sum(sampled))

    tissue = TissueMap.of(cmu)
    ys, xs = np.mgrid[1600:2624, 0:1024]
    rows = np.minimum(ys // tissue.downsample, tissue.mask.shape[0] - 1).astype(int)
    cols = np.minimum(xs // tissue.downsample, tissue.mask.shape[1] - 1).astype(int)
    # Every window over a tissue pixel is sampled in both runs: the pixel is the same.
    on_tissue = tissue.mask[rows, cols]
    assert np.array_equal(skipping[on_tissue], everything[on_tissue])
    # Output pixels with no tissue within a window and its overlap margin are covered by
    # glass windows only: white exactly (the stand-in model makes something else there).
    reach = math.ceil((128 + 32) / tissue.downsample) + 1
    glass_only = ~ndimage.maximum_filter(tissue.mask, size=2 * reach + 1)[rows, cols]
    in_tissue_blocks = np.zeros_like(glass_only)
    for row, col in blocks_with_tissue(tissue, cfg.roi, (1.0, 1.0), 1024, 1024, 512, 128):
        in_tissue_blocks[row * 512 : (row + 1) * 512, col * 512 : (col + 1) * 512] = True
    assert (glass_only & in_tissue_blocks).sum() > 10_000, "fixture assumption: glass inside tissue blocks"
    assert (skipping[glass_only] == 255).all()
    assert not (everything[glass_only & in_tissue_blocks] == 255).all()

    one_block = level0(run_stain(cmu, Counting(), tmp_path / "one.ome.zarr",
                                 StainConfig(**{**vars(cfg), "block_px": 1024})))
    assert np.array_equal(skipping, one_block)
    # The store says so (a store without the key sampled every window: resuming one refuses the skip).
    engine = lambda name: zarr.open_group(str(tmp_path / name), mode="r").attrs["mupad"]["engine"]  # noqa: E731
    assert engine("skip.ome.zarr")["skip_glass_windows"] is True and "skip_glass_windows" not in engine("all.ome.zarr")
    # SDE: the last step keeps half a step of the noise estimate (as for tissue, SiT's
    # convention); at 20 steps glass ends within a few grey levels of white.
    sde = level0(run_stain(cmu, Counting(), tmp_path / "sde.ome.zarr",
                           StainConfig(**{**vars(cfg), "roi": (0, 1600, 512, 512), "method": "sde", "steps": 20})))
    glass_corner = sde[glass_only[:512, :512]]
    assert glass_corner.size > 10_000 and 255 - glass_corner.astype(float).mean() < 5 and glass_corner.min() >= 200


def test_glass_windows_go_to_the_background_of_the_output_kind_or_are_sampled(cmu, tmp_path):
    """Fluorescence output is steered to 0, not white; a codec that cannot draw plain
    background (a random VAE) has every window sampled, and the store does not claim the skip."""
    from diffusers import AutoencoderKL

    from mupad_core.models.vae import DiffusersVAE, MarkerGroupCodec

    torch.manual_seed(0)
    markers = SiTImageToImageHandle(MupadSiT(in_channels=24, concat_channels=12, hidden_size=32, depth=1, num_heads=2),
                                    MarkerGroupCodec(PixelUnshuffleCodec(2), 4), "tiny-mif", "0" * 64,
                                    channel_names=["DAPI", "CD3", "CD8", "PanCK"])
    assert torch.equal(markers.codec.decode(markers.background_latent(0.0)[None, :, None, None].expand(1, -1, 2, 2)),
                       torch.zeros(1, 4, 4, 4))
    cfg = StainConfig(task="he2mif", roi=(0, 1600, 512, 512), steps=1, window_px=128, overlap_px=32, block_px=512,
                      margin_px=128)
    out = tmp_path / "mif.ome.zarr"
    pixels = zarr.open_group(str(run_stain(cmu, markers, out, cfg)), mode="r")["0"][:]
    tissue = TissueMap.of(cmu)
    reach = math.ceil((128 + 32) / tissue.downsample) + 3
    ys, xs = np.mgrid[1600:2112, 0:512]
    far = ~ndimage.maximum_filter(tissue.mask, size=2 * reach + 1)[
        np.minimum(ys // tissue.downsample, tissue.mask.shape[0] - 1).astype(int), (xs // tissue.downsample).astype(int)]
    assert far.sum() > 10_000 and (pixels[:, far] == 0).all()
    assert zarr.open_group(str(out), mode="r").attrs["mupad"]["engine"]["skip_glass_windows"] is True

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    random_vae = SiTImageToImageHandle(MupadSiT(in_channels=4, concat_channels=4, hidden_size=32, depth=1, num_heads=2),
                                       DiffusersVAE(vae), "tiny-vae", "0" * 64)
    assert random_vae.background_latent(1.0) is None
    out = run_stain(cmu, random_vae, tmp_path / "vae.ome.zarr",
                    StainConfig(task="he2he", roi=(0, 1600, 256, 256), steps=1, window_px=64, overlap_px=16,
                                block_px=256, margin_px=64))
    assert "skip_glass_windows" not in zarr.open_group(str(out), mode="r").attrs["mupad"]["engine"]


def test_resume_with_other_pixel_settings_is_refused(cmu, tmp_path):
    cfg = StainConfig(task="he2he", roi=(0, 0, 512, 256), steps=2, window_px=128, overlap_px=32, block_px=256,
                      margin_px=128)

    def stop(done, total):
        raise Cancelled()

    target = tmp_path / "r.ome.zarr"
    with pytest.raises(Cancelled):
        run_stain(cmu, tiny_handle(), target, cfg, progress=stop)
    for change in ({"method": "sde"}, {"roi": (8, 0, 512, 256)}, {"overlap_px": 64}):
        other = StainConfig(**{**vars(cfg), **change, "resume": True})
        with pytest.raises(ValueError, match="cannot resume"):
            run_stain(cmu, tiny_handle(), target, other)
    # The message names the setting, also inside the engine settings.
    with pytest.raises(ValueError, match=r"engine\.skip_glass_windows: stored True, requested None"):
        run_stain(cmu, tiny_handle(), target, StainConfig(**{**vars(cfg), "skip_glass_windows": False, "resume": True}))
    # Batch size does not change pixels: resuming with another is fine.
    run_stain(cmu, tiny_handle(), target, StainConfig(**{**vars(cfg), "batch_size": 3, "resume": True}))


def test_settings_that_would_do_nothing_are_refused(cmu, tmp_path):
    for bad, message in (({"steps": 0}, "steps"), ({"batch_size": 0}, "batch size"), ({"guidance": 2.0}, "guidance")):
        with pytest.raises(ValueError, match=message):
            run_stain(cmu, tiny_handle(), tmp_path / "x.ome.zarr", StainConfig(roi=(0, 0, 256, 256), **bad))
    assert not list(tmp_path.iterdir())


def test_resampled_output_does_not_depend_on_block_size(cmu, tmp_path):
    """At a target pixel size other than the scan's, each output pixel is a function of its
    global position only: cutting the ROI into other blocks changes nothing."""
    src = cmu.level_mpp(0)[0]
    for factor in (1.37, 0.6):  # downsampling and upsampling
        cfg = StainConfig(roi=(101, 203, 1100, 900), target_mpp=src * factor, block_px=256, chunk_px=256)
        small = level0(run_stain(cmu, IdentityHandle(), tmp_path / f"s{factor}.ome.zarr", cfg))
        large = level0(run_stain(cmu, IdentityHandle(), tmp_path / f"l{factor}.ome.zarr",
                                 StainConfig(**{**vars(cfg), "block_px": 1024})))
        assert small.shape == (round(900 / factor), round(1100 / factor), 3)
        assert np.array_equal(small, large)


def test_resampling_past_the_slide_edge_reads_background_without_reading_it(cmu, monkeypatch):
    """A coarse target's window margin reaches far past the slide: only the part on the
    slide is read, and the taps beyond it weigh in as background, exactly as if read."""
    from mupad_core.generate.resample import axis_taps, pixel_map, read_resampled

    pmap = pixel_map(cmu, (0, 0, *cmu.dimensions), 4.6)  # ~9x down: 20 taps a pixel
    box = (-30, -40, 80, 90)  # output (oy, ox, oh, ow): past the top-left corner
    asked = []
    read = cmu.read_region
    monkeypatch.setattr(cmu, "read_region", lambda *a: asked.append(a) or read(*a))
    got = read_resampled(cmu, pmap, *box).numpy()
    (level, x, y, w, h), = asked
    assert x >= 0 and y >= 0  # nothing off the slide was read
    # Reference: read the whole tap box (background outside) and apply dense weights.
    iy, wy = axis_taps(box[0], box[2], pmap.origin[1], pmap.step[1])
    ix, wx = axis_taps(box[1], box[3], pmap.origin[0], pmap.step[0])
    y0, x0 = iy.min(), ix.min()
    full = read(pmap.level, int(x0), int(y0), int(ix.max() - x0 + 1), int(iy.max() - y0 + 1)) / 255.0
    dense_y = np.zeros((box[2], full.shape[0]))
    np.put_along_axis(dense_y, iy - y0, wy, axis=1)
    dense_x = np.zeros((box[3], full.shape[1]))
    np.put_along_axis(dense_x, ix - x0, wx, axis=1)
    expected = np.einsum("yi,ijc,xj->cyx", dense_y, full, dense_x, optimize=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[:, :20, :20].min() > 0.999  # well off the slide: white


def test_a_block_read_in_parallel_strips_equals_the_one_piece_read(cmu):
    """GPU hosts read each block's source in strips on several threads; every output pixel
    depends only on its own taps, so the strips join into exactly the one-piece read, at the
    scan's pixel size and resampled, inside the slide and past its edge."""
    from mupad_core.generate.engine import read_source, read_source_parallel
    from mupad_core.generate.resample import pixel_map

    src = cmu.level_mpp(0)[0]
    for factor, box in ((1.0, (-256, -256, 1536, 1300)), (1.37, (100, 50, 1100, 700))):
        pmap = pixel_map(cmu, (0, 0, *cmu.dimensions), src * factor)
        whole = read_source(cmu, pmap, *box)
        strips = read_source_parallel(cmu, pmap, *box, workers=4)
        assert strips.shape == whole.shape == (3, box[2], box[3])
        assert torch.equal(strips, whole)


def test_read_workers_and_a_one_sample_run_change_no_pixel(cmu, tmp_path):
    """Reading with more threads is an I/O setting: same pixels, and it is left out of the
    settings a resume must match."""
    torch.manual_seed(0)
    model = MupadSiT(in_channels=48, concat_channels=48, hidden_size=64, depth=1, num_heads=2)
    handle = SiTImageToImageHandle(model, PixelUnshuffleCodec(4), "tiny", "h")
    cfg = StainConfig(task="he2ihc", roi=(700, 900, 600, 400), steps=1, window_px=64, overlap_px=16, margin_px=64,
                      block_px=512, chunk_px=256)  # a block's source is 640 px high: 2 strips of 320
    one = run_stain(cmu, handle, tmp_path / "one.ome.zarr", cfg)
    many = run_stain(cmu, handle, tmp_path / "many.ome.zarr", StainConfig(**{**vars(cfg), "read_workers": 2}))
    assert np.array_equal(level0(one), level0(many))
    engine = zarr.open_group(str(many), mode="r").attrs["mupad"]["engine"]
    assert "read_workers" not in engine


def test_resampling_matches_pil_antialiased_bilinear(cmu, tmp_path):
    """The slide-wide map is the usual centre-aligned antialiased bilinear resize (PIL's),
    so stained pixels sit where a viewer scaling the source would put them."""
    from PIL import Image

    roi = (400, 600, 900, 700)
    factor = 1.37
    out = level0(run_stain(cmu, IdentityHandle(), tmp_path / "r.ome.zarr",
                           StainConfig(roi=roi, target_mpp=cmu.level_mpp(0)[0] * factor, block_px=256)))
    region = Image.fromarray(cmu.read_region(0, roi[0], roi[1], roi[2] + 8, roi[3] + 8))
    box = (0, 0, out.shape[1] * factor, out.shape[0] * factor)  # the exact step, not size/size
    expected = np.asarray(region.resize((out.shape[1], out.shape[0]), Image.BILINEAR, box=box))
    inner = (slice(3, -3), slice(3, -3))  # PIL clips its kernel at the region's edge; we read real neighbours
    diff = np.abs(out[inner].astype(int) - expected[inner].astype(int))
    assert diff.max() <= 2, diff.max()
    assert diff.mean() < 0.3, diff.mean()


def test_whole_slide_sde_steps_as_the_sampler_does(cmu):
    """One window, no fusion: the engine's fused SDE loop is `samplers.sample` with the
    global noise field as its Brownian increments."""
    from mupad_core.generate.canvas import GlobalNoise
    from mupad_core.generate.engine import generate_block
    from mupad_core.transport.samplers import sample

    handle = tiny_handle()
    cfg = StainConfig(steps=3, method="sde", window_px=64, overlap_px=0)
    source = torch.from_numpy(cmu.read_region(0, 512, 512, 64, 64)).permute(2, 0, 1).float() / 255
    noise = GlobalNoise(5, handle.latent_channels)
    engine_out = generate_block(handle, source, (0, 0), noise, cfg)

    latent = handle.prepare(source).source_latent
    h, w = latent.shape[-2:]
    result = sample(handle.model, noise.window(0, 0, h, w, step=0)[None], None, method="sde", steps=3,
                    concat=latent[None], sde_noise=lambda k, shape: noise.window(0, 0, h, w, step=k + 1)[None])
    reference = handle.decode(result.x[0]).clamp(0, 1)
    torch.testing.assert_close(engine_out, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(engine_out, source, atol=1e-2)  # the network really acted


def test_heun_runs_on_whole_slides_through_the_same_sampler(cmu, tmp_path):
    """Every sampler of transport/samplers.py integrates the engine's fused velocity: Heun on
    one window is `sample(method="heun")`; over a slide it stays seam-free across block cuts
    and steers glass windows to exact white (its last corrector at t = 1 included)."""
    from mupad_core.generate.canvas import GlobalNoise
    from mupad_core.generate.engine import generate_block
    from mupad_core.transport.samplers import sample

    handle = tiny_handle()
    source = torch.from_numpy(cmu.read_region(0, 512, 512, 64, 64)).permute(2, 0, 1).float() / 255
    noise = GlobalNoise(3, handle.latent_channels)
    engine_out = generate_block(handle, source, (0, 0), noise, StainConfig(steps=3, method="heun", window_px=64,
                                                                            overlap_px=0))
    latent = handle.prepare(source).source_latent
    h, w = latent.shape[-2:]
    result = sample(handle.model, noise.window(0, 0, h, w, step=0)[None], None, method="heun", steps=3,
                    concat=latent[None])
    assert result.network_passes == 6
    torch.testing.assert_close(engine_out, handle.decode(result.x[0]).clamp(0, 1), atol=1e-5, rtol=0)

    cfg = StainConfig(roi=(0, 1600, 512, 512), steps=2, method="heun", window_px=128, overlap_px=32, block_px=256,
                      margin_px=128)
    cut = level0(run_stain(cmu, DisagreeingWindowsHandle(), tmp_path / "cut.ome.zarr", cfg))
    whole = level0(run_stain(cmu, DisagreeingWindowsHandle(), tmp_path / "whole.ome.zarr",
                             StainConfig(**{**vars(cfg), "block_px": 512})))
    assert np.array_equal(cut, whole)
    tissue = TissueMap.of(cmu)
    ys, xs = np.mgrid[1600:2112, 0:512]
    rows = np.minimum(ys // tissue.downsample, tissue.mask.shape[0] - 1).astype(int)
    cols = np.minimum(xs // tissue.downsample, tissue.mask.shape[1] - 1).astype(int)
    reach = math.ceil((128 + 32) / tissue.downsample) + 1
    glass_only = ~ndimage.maximum_filter(tissue.mask, size=2 * reach + 1)[rows, cols]
    assert glass_only.sum() > 10_000 and (cut[glass_only] == 255).all()


def test_resume_rewrites_only_the_missing_chunks_of_a_block(cmu, tmp_path):
    """A block with some chunks on disk and some not (a record lost in a crash) is
    regenerated and only its missing chunks are written; the result is still exact."""
    import base64
    import json

    from mupad_core.store.omezarr import PROGRESS_FILE

    cfg = StainConfig(task="he2he", roi=(64, 64, 512, 256), steps=2, window_px=64, overlap_px=16,
                      block_px=256, chunk_px=128, margin_px=64)
    whole = level0(run_stain(cmu, tiny_handle(), tmp_path / "whole.ome.zarr", cfg))

    def stop_after_first(done, total):
        raise Cancelled()

    target = tmp_path / "t.ome.zarr"
    with pytest.raises(Cancelled):
        run_stain(cmu, tiny_handle(), target, cfg, progress=stop_after_first)
    partial = target.with_name(target.name + ".partial")
    record_path = partial / PROGRESS_FILE
    record = json.loads(record_path.read_text())
    done = np.unpackbits(np.frombuffer(base64.b64decode(record["done"]), np.uint8), count=2 * 4).reshape(2, 4)
    assert done[:, :2].all() and not done[:, 2:].any()  # the first 256-px block: 2 x 2 chunks
    done[1, 1] = False  # lose one chunk's record, and scribble over the other three
    record["done"] = base64.b64encode(np.packbits(done)).decode("ascii")
    record_path.write_text(json.dumps(record))
    array = zarr.open_group(str(partial), mode="r+")["0"]
    array[:, 128:256, 128:256] = 0
    array[:, 0:128, 0:128] = 7

    out = level0(run_stain(cmu, tiny_handle(), target, StainConfig(**{**vars(cfg), "resume": True})))
    assert np.array_equal(out[128:, 128:256], whole[128:, 128:256])  # the lost chunk, regenerated exactly
    assert (out[:128, :128] == 7).all()  # a chunk recorded as done is trusted, not rewritten
    assert np.array_equal(out[:, 256:], whole[:, 256:])


def test_named_output_channels_make_a_fluorescence_store(cmu, tmp_path):
    """A model that names its output markers (mIF) writes them as named, coloured channels,
    even when there are three of them (which would otherwise read as RGB)."""
    handle = tiny_handle()
    handle.channel_names, handle.channel_colors = ["DAPI", "Lap2beta", "Ki67"], ["0000FF", "00FF00", "FF0000"]
    out = run_stain(cmu, handle, tmp_path / "mif.ome.zarr",
                    StainConfig(task="he2mif", roi=(0, 0, 256, 256), steps=1, window_px=64, overlap_px=16,
                                margin_px=64, block_px=256, skip_background=False))
    validate_omezarr(out)
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert attrs["mupad"]["kind"] == "fluorescence"
    assert [(c["label"], c["color"]) for c in attrs["omero"]["channels"]] == [
        ("DAPI", "0000FF"), ("Lap2beta", "00FF00"), ("Ki67", "FF0000")]


SMALL = dict(task="he2he", roi=(400, 900, 256, 256), steps=2, window_px=64, overlap_px=16, margin_px=64,
             block_px=256, skip_background=False)


def test_samples_give_the_mean_of_single_runs_and_their_spread(cmu, tmp_path):
    """--samples K: the store holds the mean of the K runs the sample seeds would give, and a
    spread store beside it the per-pixel standard deviation; both placed alike."""
    from mupad_core.generate.engine import spread_path
    from mupad_core.generate.uncertainty import sample_seeds

    seeds = sample_seeds(3, 3)
    assert seeds[0] == 3 and len(set(seeds)) == 3
    singles = [run_stain(cmu, tiny_handle(), tmp_path / f"s{k}.ome.zarr", StainConfig(**SMALL, seed=seed))
               for k, seed in enumerate(seeds)]
    runs = np.stack([level0(path).astype(float) for path in singles])  # uint8 each: compare within rounding
    out = run_stain(cmu, tiny_handle(), tmp_path / "mean.ome.zarr", StainConfig(**SMALL, seed=3, samples=3))
    validate_omezarr(out)
    mean = level0(out).astype(float)
    assert np.abs(mean - runs.mean(0)).max() <= 1.0
    spread = spread_path(out)
    assert spread.name == "mean.spread.ome.zarr" and not spread.with_name(spread.name + ".partial").exists()
    validate_omezarr(spread)
    measured = level0(spread)[..., 0].astype(float)
    expected = (runs / 255).std(0).mean(-1) * 2 * 255
    assert np.abs(measured - expected).max() <= 2.0  # from unrounded samples vs rounded ones
    assert measured.mean() > 1  # the tiny model's samples really differ
    attrs = zarr.open_group(str(spread), mode="r").attrs.asdict()
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["spread"]
    assert attrs["mupad"]["spread_of"] == "mean.ome.zarr" and attrs["mupad"]["engine"]["samples"] == 3
    with open_slide(out) as a, open_slide(spread) as b:
        assert a.origin == b.origin and a.mpp == b.mpp


def test_samples_resume_after_a_crash_between_the_two_finalizes(cmu, tmp_path, monkeypatch):
    from mupad_core.generate.engine import spread_path
    from mupad_core.store import PyramidWriter

    cfg = StainConfig(**SMALL, seed=1, samples=2)
    reference = level0(run_stain(cmu, tiny_handle(), tmp_path / "ref.ome.zarr", cfg))
    target = tmp_path / "crash.ome.zarr"
    real_finalize = PyramidWriter.finalize

    def crash_on_the_mean(self):
        if self.path == target:
            raise OSError("disk went away")
        return real_finalize(self)

    monkeypatch.setattr(PyramidWriter, "finalize", crash_on_the_mean)
    with pytest.raises(OSError):
        run_stain(cmu, tiny_handle(), target, cfg)
    monkeypatch.setattr(PyramidWriter, "finalize", real_finalize)
    assert spread_path(target).exists() and not target.exists()  # never a finished mean without its spread
    out = run_stain(cmu, tiny_handle(), target, StainConfig(**{**vars(cfg), "resume": True}))
    assert np.array_equal(level0(out), reference)


class _Still(SiTImageToImageHandle):
    """Velocity 0: the sampler returns its starting point, so the start itself is visible."""

    def window_velocity(self, x, t, prepared, windows):
        return torch.zeros_like(x)


def test_strength_starts_from_the_source_noised_part_of_the_way(cmu, tmp_path):
    from mupad_core.generate.canvas import GlobalNoise

    handle = _Still(tiny_handle().model, PixelUnshuffleCodec(2), "still", "0" * 64)
    roi = SMALL["roi"]
    source = torch.from_numpy(cmu.read_region(0, *roi)).permute(2, 0, 1).float() / 255
    noise = GlobalNoise(0, 12).window(0, 0, 128, 128)
    for strength in (0.25, 1.0):
        out = level0(run_stain(cmu, handle, tmp_path / f"s{strength}.ome.zarr",
                               StainConfig(**{**SMALL, "margin_px": 0}, strength=strength)))
        start = (1 - strength) * PixelUnshuffleCodec(2).encode(source[None])[0] + strength * noise
        expected = (PixelUnshuffleCodec(2).decode(start[None])[0].clamp(0, 1) * 255).round().byte()
        assert np.abs(out.astype(int) - expected.permute(1, 2, 0).numpy()).max() <= 1


def test_strength_is_refused_where_the_output_is_another_kind_of_image(cmu, tmp_path):
    with pytest.raises(ValueError, match="same kind of image"):
        run_stain(cmu, tiny_handle(), tmp_path / "x.ome.zarr", StainConfig(**{**SMALL, "task": "he2ihc"}, strength=0.5))
    with pytest.raises(ValueError, match="strength must be in"):
        run_stain(cmu, tiny_handle(), tmp_path / "x.ome.zarr", StainConfig(**SMALL, strength=0))
    with pytest.raises(ValueError, match="samples must be"):
        run_stain(cmu, tiny_handle(), tmp_path / "x.ome.zarr", StainConfig(**SMALL, samples=0))


def test_mean_and_spread_on_known_samples():
    from mupad_core.generate.uncertainty import mean_and_spread

    samples = torch.zeros(4, 3, 2, 2)
    samples[2:, :, 0, 0] = 1.0  # pixel (0, 0): half the samples black, half white: the largest spread
    samples[:, 0, 1, 1] = 0.7  # pixel (1, 1): every sample agrees
    mean, spread = mean_and_spread(samples, one_channel=True)
    assert spread.shape == (1, 2, 2) and mean.shape == (3, 2, 2)
    assert spread[0, 0, 0] == pytest.approx(1.0) and spread[0, 1, 1] == 0 and mean[0, 0, 0] == pytest.approx(0.5)
    _, per_channel = mean_and_spread(samples, one_channel=False)
    assert per_channel.shape == (3, 2, 2) and torch.allclose(per_channel[:, 0, 0], torch.ones(3))
    with pytest.raises(ValueError, match="K, C, H, W"):
        mean_and_spread(samples[0], one_channel=True)
