"""Whole-slide generation with an image condition stream: each window's own source pixels as tokens."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import zarr

from mupad_core.demo import sample_slide_path
from mupad_core.generate.engine import StainConfig, run_stain
from mupad_core.generate.handles import load_handle
from mupad_core.slide import open_slide

ROI = (1000, 1400, 192, 192)  # level-0 px of the bundled slide, at the model's 0.5 µm/px


@functools.lru_cache(maxsize=None)
def he2he_handle():
    """One handle for the module, as the napari widget keeps one: its token cache carries over."""
    return load_handle("demo-he2he", "he2he")


def stain(tmp_path, name, roi=ROI, handle=None, **options):
    handle = handle or he2he_handle()
    config = StainConfig(task="he2he", roi=roi, target_mpp=0.5, steps=2, seed=3, window_px=128, overlap_px=32,
                         block_px=256, chunk_px=64, margin_px=128, skip_background=False)
    for key, value in options.items():
        setattr(config, key, value)
    with open_slide(sample_slide_path()) as reader:
        out = run_stain(reader, handle, tmp_path / f"{name}.ome.zarr", config)
        source = reader.read_region(0, *roi)
    return zarr.open_group(out, mode="r")["0"][:].transpose(1, 2, 0).astype(float), source, out


def correlation(a, b, box=16):
    """Pearson correlation of the grey level in box x box means: the layout, not the pixels."""
    def boxes(x):
        g = x.mean(-1)
        h, w = g.shape[0] // box * box, g.shape[1] // box * box
        return g[:h, :w].reshape(h // box, box, w // box, box).mean((1, 3)).ravel()

    return float(np.corrcoef(boxes(a), boxes(b))[0, 1])


def test_variations_model_runs_whole_slide_from_window_tokens(tmp_path):
    """The bundled H&E-variations model (image stream, no template) stains a region through the engine."""
    from skimage.transform import resize

    handle = he2he_handle()
    encoded = []
    encode = handle.image_encoder.encode
    handle.image_encoder.encode = lambda crop: encoded.append(crop.shape) or encode(crop)
    try:
        whole, source, out = stain(tmp_path, "whole")
        first = len(encoded)
        near = stain(tmp_path, "near", strength=0.5)[0]
    finally:
        del handle.image_encoder.encode
    # Every window of the region was encoded once; the rerun over the same pixels encodes none.
    assert first > 0 and len(encoded) == first and len(handle.token_cache) >= first
    fresh = stain(tmp_path, "fresh", handle=load_handle("demo-he2he", "he2he"))[0]
    assert np.array_equal(fresh, whole)  # cached tokens are the tokens: same pixels as a new handle's
    small = resize(source.astype(float), whole.shape[:2], anti_aliasing=True, preserve_range=True)
    elsewhere = stain(tmp_path, "elsewhere", roi=(400, 1800, 192, 192))[0]
    # The layout comes from each window's tokens (at 3 steps, 16-px box correlation 0.44 against this
    # region's source when written, 0.33 for an output made from a glass region's tokens); a
    # half-strength start from the noised source keeps much more of it (0.93).
    assert correlation(whole, small) > correlation(elsewhere, small) + 0.1
    assert correlation(near, small) > 0.7
    provenance = zarr.open_group(out, mode="r").attrs["mupad"]
    assert provenance["model_id"] == "demo-he2he"
    # Blocks cut the region differently: every window still sees the same tokens and noise.
    # The top-left block has the same windows and margin in both cuts: identical. Elsewhere
    # a trained model's windows see far (attention, CLS), so over the steps windows beyond
    # a block's margin still move it a little: 3.0 grey levels on average at 3 steps, a
    # tenth of what another seed moves (33). The margin bounds that influence; it does not
    # remove it (docs/whole-slide.md).
    split = stain(tmp_path, "split", block_px=128)[0]
    other_seed = stain(tmp_path, "seed", seed=4)[0]
    assert np.array_equal(split[:128, :128], whole[:128, :128])
    assert np.abs(split - whole).mean() < 0.25 * np.abs(other_seed - whole).mean()


def test_guidance_schedule_skips_the_unconditional_pass_where_the_weight_is_zero(tmp_path, monkeypatch):
    """Guidance on part of the trajectory only: fewer network passes than constant guidance, other pixels."""
    from mupad_core.generate.handles import SiTImageToImageHandle

    calls = {"guided": 0, "plain": 0}
    original = SiTImageToImageHandle.window_velocity

    def counting(self, x, t, prepared, windows, cls=None, guidance=0.0):
        calls["guided" if guidance else "plain"] += 1
        return original(self, x, t, prepared, windows, cls=cls, guidance=guidance)

    monkeypatch.setattr(SiTImageToImageHandle, "window_velocity", counting)
    plain = stain(tmp_path, "plain", steps=3)[0]  # three steps: the schedule below guides the first two only
    calls.update(guided=0, plain=0)
    constant = stain(tmp_path, "constant", guidance=1.5, steps=3)[0]
    constant_calls = dict(calls)
    calls.update(guided=0, plain=0)
    annealed = stain(tmp_path, "annealed", guidance=1.5, guidance_schedule="interval:0:0.5", steps=3)[0]
    assert np.abs(constant - plain).mean() > 1.0  # guidance changes the samples
    assert constant_calls["plain"] == 0 and calls["plain"] > 0 and calls["guided"] < constant_calls["guided"]
    assert np.abs(annealed - constant).mean() > 0.5
    with pytest.raises(ValueError, match="guidance schedule"):
        stain(tmp_path, "bad", guidance=1.0, guidance_schedule="interval:0.8:0.2")
    with open_slide(sample_slide_path()) as reader, pytest.raises(ValueError, match="needs a model with an image condition stream"):
        run_stain(reader, load_handle("demo-he2ihc", "he2ihc"), tmp_path / "refused.ome.zarr",
                  StainConfig(task="he2ihc", roi=ROI, guidance=1.0))


def test_token_cache_keys_by_pixels_and_drops_the_least_recently_used_beyond_its_budget():
    import torch

    from mupad_core.generate.handles import TokenCache

    crops = [torch.full((3, 8, 8), v / 10) for v in range(4)]
    tokens = [torch.full((16,), float(v)) for v in range(4)]  # 64 bytes each
    cache = TokenCache(max_bytes=3 * 64)
    keys = [cache.key(c) for c in crops]
    assert cache.key(crops[0].clone()) == keys[0] and cache.key(crops[0].half()) != keys[0]
    for key, value in zip(keys[:3], tokens[:3]):
        cache.put(key, value)
    assert cache.get(keys[0]) is tokens[0]  # now the most recently used
    cache.put(keys[3], tokens[3])
    assert len(cache) == 3 and cache.bytes == 3 * 64
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is tokens[0] and cache.get(keys[3]) is tokens[3]


def test_kept_handles_are_reused_until_their_files_change(tmp_path):
    """The napari widget's handles: the same object for a rerun, a fresh load once the folder is rewritten."""
    import os
    import shutil

    from mupad_core.generate.handles import kept_handle
    from mupad_core.zoo import resolve_model

    folder = tmp_path / "he2he-copy"
    shutil.copytree(resolve_model("demo-he2he"), folder)
    first = kept_handle(str(folder), "he2he")
    assert kept_handle(str(folder), "he2he") is first
    weights = folder / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # saved again
    assert kept_handle(str(folder), "he2he") is not first
