"""The SiT backbone with Decoupled Cross-Attention: shapes, gating, presets, gradients."""

import pytest
import torch

from helpers import randomize, tiny_sit
from mupad_core.models.conditions import Conditions
from mupad_core.models.sit import PRESETS, MupadSiT


def conditions(batch=2, seed=0, **presence):
    g = torch.Generator().manual_seed(seed)
    tokens = {
        "image": torch.randn(batch, 5, 32, generator=g),
        "text": torch.randn(batch, 7, 24, generator=g),
        "rna": torch.randn(batch, 331, generator=g),
    }
    flags = {k: torch.tensor(presence.get(k, [1.0] * batch)) for k in tokens}
    return Conditions(tokens=tokens, presence=flags)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (16, 40)])
def test_forward_shapes_on_various_latent_grids(size):
    model = tiny_sit()
    x = torch.randn(2, 4, *size)
    out = model(x, torch.rand(2), conditions())
    assert out.velocity.shape == x.shape


@pytest.mark.parametrize("kind", ["decoupled", "shared"])
def test_absent_modality_has_exactly_no_effect(kind):
    model = randomize(tiny_sit(cross_attention=kind)).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.rand(2)
    base = conditions(seed=0, text=[0.0, 1.0])
    other = conditions(seed=0, text=[0.0, 1.0])
    other.tokens["text"] = torch.randn_like(other.tokens["text"]) * 5  # different text for both samples
    with torch.no_grad():
        a = model(x, t, base).velocity
        b = model(x, t, other).velocity
    # Sample 0 has text switched off: bit-identical. Sample 1 has it on: it matters.
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-6


def test_each_stream_is_separate_in_decoupled_attention():
    model = tiny_sit()
    cross = model.blocks[0].cross
    assert set(cross.streams) == {"image", "text", "rna"}
    q_weights = [cross.streams[m].q.weight for m in ("image", "text", "rna")]
    assert len({w.data_ptr() for w in q_weights}) == 3  # own projections per modality
    # Streams follow the configured modalities: no unused streams, and a new modality
    # (e.g. H&E patch tokens for H&E->mIF) gets its own stream and really acts.
    custom = randomize(tiny_sit(condition_dims={"he_patches": 16}, condition_tokens={})).eval()
    assert set(custom.blocks[0].cross.streams) == {"he_patches"}
    x, t = torch.randn(1, 4, 16, 16), torch.rand(1)
    with torch.no_grad():
        a = custom(x, t, Conditions(tokens={"he_patches": torch.randn(1, 5, 16)})).velocity
        b = custom(x, t, Conditions(tokens={"he_patches": torch.randn(1, 5, 16)})).velocity
    assert (a - b).abs().max() > 1e-6


def test_all_conditions_absent_equals_unconditional_model():
    model = randomize(tiny_sit()).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        none = model(x, t, None).velocity
        off = model(x, t, conditions().without("image", "text", "rna")).velocity
    assert torch.equal(none, off)


def test_cls_token_and_alignment_projector():
    model = randomize(tiny_sit(cls_dim=16, align_depth=1, align_dim=12))
    x = torch.randn(2, 4, 16, 24)
    out = model(x, torch.rand(2), conditions(), cls=torch.randn(2, 16), return_projection=True)
    assert out.cls_velocity.shape == (2, 16)
    assert out.projected.shape == (2, 12, 8, 12)  # laid out on the latent patch grid
    (out.velocity.square().mean() + out.cls_velocity.square().mean() + out.projected.mean()).backward()
    assert model.projector.net[0].weight.grad.abs().sum() > 0
    assert model.cls_embedder.weight.grad.abs().sum() > 0


def test_spatial_template_concat_channels():
    model = tiny_sit(concat_channels=4)
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(ValueError, match="spatial template"):
        model(x, torch.rand(1))
    assert model(x, torch.rand(1), concat=torch.randn(1, 4, 16, 16)).velocity.shape == x.shape


def test_presets_match_dit_sizes():
    b = MupadSiT.from_preset("B", in_channels=4, condition_dims=None)
    n = sum(p.numel() for p in b.parameters())
    assert 128e6 < n < 132e6  # DiT-B/2 / SiT-B/2 is ~130M parameters
    assert PRESETS["XL"] == (1152, 28, 16)
    with pytest.raises(ValueError, match="unknown SiT preset"):
        MupadSiT.from_preset("Q")


def test_backward_reaches_every_stream():
    model = randomize(tiny_sit())
    out = model(torch.randn(2, 4, 16, 16), torch.rand(2), conditions())
    out.velocity.square().mean().backward()
    for name, emb in model.context_embedders.items():
        grads = [p.grad for p in emb.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name


def test_a_model_too_narrow_for_its_output_warns():
    """hidden < patch² x channels: the final linear layer cannot span the velocity."""
    import warnings

    import pytest

    with pytest.warns(UserWarning, match="cannot express every velocity component"):
        MupadSiT(in_channels=48, hidden_size=128, depth=1, num_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MupadSiT(in_channels=48, hidden_size=192, depth=1, num_heads=2)
