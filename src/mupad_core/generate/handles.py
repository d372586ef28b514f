"""What the whole-slide engine drives: a model handle per task.

A handle turns a block of source pixels into output pixels of its task. The engine
owns tiling, noise, fusion and writing; the handle only knows its network:

- `prepare(source)`: per-block work done once (source latent, condition tokens).
- `window_velocity(x, t, prepared, windows)`: the network on a batch of latent windows.
- `decode(latent)`: latent block to output pixels.

`IdentityHandle` returns its input (checks and benchmarks: the read/write floor).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..slide.stains import source_view
from .config import model_defaults, model_pipeline  # noqa: F401  (model_defaults re-exported: callers import it from here)
from .fusion import Window
from .tiled_vae import tiled_decode, tiled_encode


class ModelHandle(Protocol):
    model_id: str
    weights_hash: str
    out_channels: int
    latent_channels: int
    downscale: int
    passthrough: bool
    mpp: float | None  # the pixel size (µm) the model was trained at; None when it records none

    def prepare(self, source: torch.Tensor) -> Any: ...

    def window_velocity(self, x: torch.Tensor, t: float, prepared: Any, windows: list[Window]) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


class IdentityHandle:
    """Output = source pixels. Selected by `--model identity`, valid for every task."""

    model_id = "identity"
    weights_hash = "none"
    passthrough = True
    latent_channels = 3
    downscale = 1
    mpp = None

    def __init__(self, out_channels: int = 3):
        self.out_channels = out_channels


@dataclass
class PreparedBlock:
    source_latent: torch.Tensor  # (C, h, w) spatial template for the whole block
    predictions: dict = field(default_factory=dict)  # one-pass models: window (y, x) -> prediction
    source: torch.Tensor | None = None  # (3, H, W) block pixels, for per-window image tokens
    tokens: dict = field(default_factory=dict)  # window (y, x) -> its image tokens (computed once)


class TokenCache:
    """Image tokens by the bytes of the window they came from, least recently used dropped
    first. A window's tokens are a function of its pixels only, and the same pixels come back
    often: windows in the margin two neighbouring blocks share, and every rerun of a region
    with another seed, strength or step count (the napari widget keeps its handles,
    `kept_handle`). Thread-safe: two widget jobs may share one handle."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(crop: torch.Tensor) -> bytes:
        pixels = crop.detach().cpu().contiguous()
        digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=20)
        digest.update(repr((tuple(pixels.shape), str(pixels.dtype))).encode())
        return digest.digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is not None:
                self._entries.move_to_end(key)
            return tokens

    def put(self, key: bytes, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = tokens
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._entries)


class SiTImageToImageHandle:
    """A MupadSiT that sees the source through a spatial template (`concat_channels`), an
    image condition stream, or both.

    The template is the paper's H&E->X design (H&E->mIF concatenates the H&E latent with
    the noisy target latent at every step). The image stream gets each window's own source
    pixels as tokens (`image_encoder`, resized to the `image_px` it was trained on), so a
    variations model keeps the layout window by window; `token_map` can translate those
    tokens first (the embedding-space H&E->IHC flow). With tokens, classifier-free guidance
    runs the unconditional pass with the stream switched off.
    """

    passthrough = False
    image_encoder = image_px = mpp = None
    source_view = None  # what the model sees of the source pixels (slide/stains.py), from its pipeline
    source_start = None  # sigma when the model's paths start at its source latent (transport/path.py), else None

    def viewed(self, source: torch.Tensor) -> torch.Tensor:
        return self.source_view(source) if self.source_view is not None else source

    def __init__(self, model, codec, model_id: str, weights_hash: str, device="cpu", dtype=torch.float32,
                 channel_names: list[str] | None = None, channel_colors: list[str] | None = None,
                 image_encoder=None, image_px: int | None = None, token_map=None):
        streams = set(model.config.condition_dims or {})
        if streams - {"image"}:
            raise ValueError(f"{model_id}: whole-slide generation passes image tokens only; this model also needs "
                             f"{', '.join(sorted(streams - {'image'}))} (generate those at ROI size)")
        if not model.config.concat_channels and not streams:
            raise ValueError(f"{model_id}: model has no spatial template input (concat_channels=0) and no image stream")
        if streams and image_encoder is None:
            raise ValueError(f"{model_id}: model has an image stream; pass its image encoder")
        self.image_encoder = image_encoder.to(device).eval() if image_encoder is not None else None
        self.image_px = image_px
        self.token_map = token_map
        self.model = model.to(device).eval()
        self.codec = codec
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.device = torch.device(device)
        self.dtype = dtype
        self.latent_channels = model.config.in_channels
        self.downscale = codec.downscale
        self.out_channels = getattr(codec, "image_channels", 3)
        # Named output channels (mIF markers) make a fluorescence image, even three of them.
        self.channel_names = channel_names
        self.channel_colors = channel_colors

    @property
    def token_map(self):
        return self._token_map

    @token_map.setter
    def token_map(self, value) -> None:
        """A new map makes new tokens: the cached ones are dropped with the old map."""
        self._token_map = value
        self.token_cache = TokenCache()

    @property
    def conditioned(self) -> bool:
        return self.image_encoder is not None

    def prepare(self, source: torch.Tensor) -> PreparedBlock:
        source = self.viewed(source)
        template = getattr(self, "model", None) is None or self.model.config.concat_channels
        latent = tiled_encode(self.codec, source.to(self.device)) if template else None
        return PreparedBlock(source_latent=latent, source=source if self.conditioned else None)

    def source_latent(self, prepared: PreparedBlock) -> torch.Tensor:
        """The block's source latent (encoded on first use when the model has no template)."""
        if prepared.source_latent is None:
            prepared.source_latent = tiled_encode(self.codec, prepared.source.to(self.device))
        return prepared.source_latent

    def _window_tokens(self, prepared: PreparedBlock, windows) -> torch.Tensor:
        """Image tokens of each window's source pixels (cached: the same at every step)."""
        d = self.downscale
        missing = []
        for w in windows:
            if (w.y, w.x) in prepared.tokens:
                continue
            crop = prepared.source[:, w.y * d : (w.y + w.h) * d, w.x * d : (w.x + w.w) * d]
            key = self.token_cache.key(crop)
            cached = self.token_cache.get(key)
            if cached is not None:
                prepared.tokens[(w.y, w.x)] = cached
            else:
                missing.append((w, key, crop))
        if missing:
            crops = torch.stack([crop for _, _, crop in missing]).to(self.device)
            size = self.image_px
            patch = getattr(self.image_encoder, "patch_size", 1)
            if size and not hasattr(self.image_encoder, "input_size"):  # builtin CNN: the size it learnt at
                size = max(patch, size // patch * patch)
                if crops.shape[-1] != size or crops.shape[-2] != size:
                    crops = torch.nn.functional.interpolate(crops, size=(size, size), mode="bilinear",
                                                            antialias=True, align_corners=False).clamp(0, 1)
            # One window at a time: a window's tokens then do not depend on which other
            # windows share its batch (convolution kernels chosen per batch size differ in
            # the last bits), so blocks cut differently give identical pixels.
            for (w, key, _), crop in zip(missing, crops):
                tokens = self.image_encoder.encode(crop[None]).tokens
                tokens = (self.token_map(tokens) if self.token_map is not None else tokens)[0]
                prepared.tokens[(w.y, w.x)] = tokens
                self.token_cache.put(key, tokens)
        return torch.stack([prepared.tokens[(w.y, w.x)] for w in windows])

    @property
    def cls_dim(self) -> int:
        """Size of the CLS token the model generates with each window (0: none)."""
        return int(getattr(self, "model", None) and self.model.config.get("cls_dim") or 0)

    @torch.no_grad()
    def window_velocity(self, x, t, prepared: PreparedBlock, windows, cls: torch.Tensor | None = None,
                        guidance: float = 0.0):
        """Velocities of the windows; with `cls` (one token per window) also the tokens' velocities.
        `guidance` w: v = v_c + w (v_c - v_u), the image stream switched off for v_u."""
        from ..models.conditions import Conditions
        from ..transport.samplers import GuidedVelocity

        concat = None
        if self.model.config.concat_channels:
            concat = torch.stack([prepared.source_latent[:, w.y : w.y + w.h, w.x : w.x + w.w] for w in windows])
        conditions = Conditions(tokens={"image": self._window_tokens(prepared, windows)}) if self.conditioned else None
        cls_in = None if cls is None else cls.to(self.device)
        # Guidance is the transport's (one implementation): the image stream off for v_u.
        guided = GuidedVelocity(self._forward, conditions, concat, drop=("image",))
        velocity, cls_velocity = guided(x.to(self.device), cls_in, t, guidance)
        return velocity if cls is None else (velocity, cls_velocity)

    def _forward(self, x, t, conditions, cls=None, concat=None):
        """The model in bf16 on a GPU when asked, its outputs back in float32."""
        from ..models.sit import SiTOutput

        use_bf16 = self.device.type == "cuda" and self.dtype == torch.bfloat16
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = self.model(x, t, conditions, concat=concat, cls=cls)
        return SiTOutput(velocity=out.velocity.float(),
                         cls_velocity=None if out.cls_velocity is None else out.cls_velocity.float())

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return tiled_decode(self.codec, latent.to(self.device)).cpu()

    @torch.no_grad()
    def background_latent(self, value: float, tolerance: float = 2 / 255) -> torch.Tensor | None:
        """(C,) latent of a plain image of `value` (1: white glass; 0: dark fluorescence
        background), where the engine steers windows that hold no tissue; None when decoding
        it does not give back `value` within `tolerance` (a codec that cannot draw plain
        background then has every window sampled). Taken at the centre of a tile-sized
        encoded patch: a VAE's latent of a uniform area is uniform away from its edges."""
        cache = self.__dict__.setdefault("_background", {})
        if value not in cache:
            side = 64 * self.downscale if getattr(self.codec, "needs_tiling", True) else 8 * self.downscale
            plain = torch.full((1, self.out_channels, side, side), float(value), device=self.device)
            latent = self.codec.encode(plain, generator=torch.Generator(device=self.device).manual_seed(0))
            centre = latent[0, :, latent.shape[-2] // 2, latent.shape[-1] // 2].float()
            probe = centre[None, :, None, None].expand(1, -1, 8, 8).to(latent.dtype)
            error = (self.codec.decode(probe).float() - value).abs().max().item()
            cache[value] = centre if error <= tolerance else None
        return cache[value]


class DisagreeingWindowsHandle(SiTImageToImageHandle):
    """A stand-in model whose windows disagree on purpose, for measuring seams.

    Each window is pulled to the source latent plus a colour shift of its own (the failure
    mode of independently sampled tiles). The shift depends only on the window's source
    pixels, so the same window computed from two blocks agrees with itself. The velocity
    (target - x) / (1 - t) makes an Euler run land exactly on the fused targets.
    """

    def __init__(self, shift: float = 0.3):
        from ..models.vae import PixelUnshuffleCodec

        self.codec = PixelUnshuffleCodec(2)
        self.model_id, self.weights_hash, self.device = "disagreeing-windows", "none", torch.device("cpu")
        self.latent_channels, self.downscale, self.out_channels = 12, 2, 3
        self.shift = shift

    def window_velocity(self, x, t, prepared, windows):
        target = torch.stack([prepared.source_latent[:, w.y : w.y + w.h, w.x : w.x + w.w] for w in windows])
        for k in range(len(windows)):
            seed = int(target[k].double().sum().item() * 1000) % (2**31)
            colour = self.shift * torch.randn(3, generator=torch.Generator().manual_seed(seed))
            target[k] += colour.repeat_interleave(4)[:, None, None]  # same shift for the 2x2 sub-pixels
        return (target - x) / (1 - t)


class OnePassHandle(SiTImageToImageHandle):
    """A one-pass baseline (pix2pix-style U-Net) driven by the same engine.

    Its velocity (prediction - x) / (1 - t) makes any Euler run end exactly on the fused
    predictions of the windows, so seams, blocks, resume and the store are the diffusion
    models' own; each window is predicted once per block (cached), whatever the step count.
    """

    def __init__(self, model, codec, model_id: str, weights_hash: str, device="cpu", dtype=torch.float32):
        self.model = model.to(device).eval()
        self.codec = codec
        self.model_id, self.weights_hash = model_id, weights_hash
        self.device, self.dtype = torch.device(device), dtype
        self.latent_channels = model.config.out_channels
        self.downscale = codec.downscale
        self.out_channels = getattr(codec, "image_channels", 3)
        self.channel_names = self.channel_colors = None

    def prepare(self, source: torch.Tensor) -> PreparedBlock:
        source = self.viewed(source)
        return PreparedBlock(source_latent=self.codec.encode(source.to(self.device)[None])[0])

    @torch.no_grad()
    def window_velocity(self, x, t, prepared: PreparedBlock, windows):
        from ..models.baselines import predict

        missing = [w for w in windows if (w.y, w.x) not in prepared.predictions]
        if missing:
            crops = torch.stack([prepared.source_latent[:, w.y : w.y + w.h, w.x : w.x + w.w] for w in missing])
            for w, p in zip(missing, predict(self.model, crops).float().cpu()):
                prepared.predictions[(w.y, w.x)] = p
        target = torch.stack([prepared.predictions[(w.y, w.x)] for w in windows])
        return (target - x) / max(1.0 - float(t), 1e-6)


def load_handle(spec: str, task: str, device: str = "cpu") -> ModelHandle:
    """`identity`, or a MUPAD checkpoint (bundled id, folder or hub id) with a spatial-template input."""
    if spec == "identity":
        return IdentityHandle()
    handle = _load_checkpoint_handle(spec, task, device)
    handle.mpp = model_defaults(spec).get("mpp") or handle.mpp  # a flow falls back on its generator's
    pipeline = model_pipeline(spec)
    view = pipeline.get("source_view")
    if view:
        handle.source_view = source_view(view, f"{spec}: mupad_pipeline.json source_view")
    if pipeline.get("start") == "source":
        handle.source_start = float(pipeline.get("start_noise", 0.5))
    return handle


_KEPT: OrderedDict[tuple, ModelHandle] = OrderedDict()
_KEPT_LOCK = threading.Lock()


def kept_handle(spec: str, task: str, device: str = "cpu", keep: int = 2) -> ModelHandle:
    """`load_handle`, but the last `keep` handles stay loaded (a viewer's reruns skip the load
    and reuse the window tokens they cached). A model folder whose files change on disk (a
    retrained model saved over the old one) is loaded afresh."""
    if spec == "identity":
        return load_handle(spec, task, device)
    from ..models.checkpoint import CHECKPOINT_FILES
    from ..zoo import resolve_model

    folder = resolve_model(spec, CHECKPOINT_FILES)
    stamp = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))
    key = (str(spec), task, str(device), str(folder), stamp)
    with _KEPT_LOCK:
        handle = _KEPT.get(key)
        if handle is not None:
            _KEPT.move_to_end(key)
            return handle
    handle = load_handle(spec, task, device)
    with _KEPT_LOCK:
        _KEPT[key] = handle
        while len(_KEPT) > keep:
            _KEPT.popitem(last=False)
    return handle


def _load_checkpoint_handle(spec: str, task: str, device: str) -> ModelHandle:
    from ..models.checkpoint import CHECKPOINT_FILES, load_model, read_pipeline, weights_sha256
    from ..models.vae import codec_for
    from ..zoo import resolve_model

    folder = resolve_model(spec, CHECKPOINT_FILES)
    pipeline = read_pipeline(folder)
    tasks = pipeline.get("tasks")
    if tasks and task not in tasks:
        raise ValueError(f"{folder}: model is trained for {', '.join(tasks)}, not {task!r}")
    model = load_model(folder)
    from ..models.baselines import ONE_PASS_KINDS

    if pipeline.get("kind") == "embedding-flow":
        return _embedding_flow_handle(folder, spec, pipeline, device)
    if pipeline.get("kind") in ONE_PASS_KINDS:
        return OnePassHandle(model, codec_for(pipeline["vae"], pipeline.get("channels"), device=device), str(spec),
                             weights_sha256(folder),
                             device=device)
    streams = set(model.config.condition_dims or {})
    if streams - {"image"}:
        # Refused before any output exists, rather than failing (or silently running
        # unconditional) in the middle of a slide.
        raise ValueError(
            f"{folder}: model needs {', '.join(sorted(streams - {'image'}))} condition tokens, which a slide does not "
            "give; generate with it at ROI size (`mupad generate`, the ROI widget)"
        )
    if not model.config.concat_channels and not streams:
        raise ValueError(
            f"{folder}: this model generates from noise alone; whole-slide staining needs the source as a "
            "spatial template (concat_channels > 0) or an image condition stream"
        )
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    codec = codec_for(pipeline["vae"], pipeline.get("channels"), device=device)  # marker groups for N != 3
    image_encoder = None
    if "image" in streams:

        image_encoder = load_encoders(folder, pipeline, model, device)["image"]
    return SiTImageToImageHandle(model, codec, str(spec), weights_sha256(folder), device=device, dtype=dtype,
                                 channel_names=pipeline.get("channels"), channel_colors=pipeline.get("colors"),
                                 image_encoder=image_encoder, image_px=pipeline.get("image_px"))


def _embedding_flow_handle(folder, spec, pipeline: dict, device) -> SiTImageToImageHandle:
    """The flow's generator, its window tokens translated by the flow first (paper eq. 6)."""
    import hashlib

    from ..models.checkpoint import CHECKPOINT_FILES, load_model, read_pipeline, weights_sha256
    from ..zoo import resolve_model

    flow = load_model(folder, device=device)
    generator = pipeline["generator"]
    if (folder / generator).exists():  # recorded relative to the flow folder
        generator = str((folder / generator).resolve())
    generator_tasks = read_pipeline(resolve_model(generator, CHECKPOINT_FILES)).get("tasks") or ["image2image"]
    handle = load_handle(generator, generator_tasks[0], device=device)
    if not getattr(handle, "conditioned", False):
        raise ValueError(f"{folder}: its generator {generator} has no image stream to feed translated tokens")
    if int(flow.config.embed_dim) != int(handle.image_encoder.token_dim):
        raise ValueError(f"{folder}: the flow maps {flow.config.embed_dim}-d tokens, its generator's encoder gives "
                         f"{handle.image_encoder.token_dim}-d")
    steps = int(pipeline.get("flow_steps", 8))
    handle.token_map = lambda tokens: flow.translate(tokens, steps)
    handle.model_id = str(spec)
    handle.weights_hash = hashlib.sha256((weights_sha256(folder) + handle.weights_hash).encode()).hexdigest()
    return handle


def load_encoders(folder: Path, pipeline: dict, model, device: str = "cpu") -> dict:
    """The condition encoders a checkpoint's streams take, with their trained weights where saved."""
    from ..models.conditioning import build_encoder

    dims = dict(model.config.condition_dims or {})
    token_counts = dict(model.config.condition_tokens or {})
    specs = pipeline.get("encoders", {})
    encoders = {}
    for modality, dim in dims.items():
        entry = dict(specs.get(modality) or {})
        name = entry.pop("name", None)
        if modality == "rna":
            entry.setdefault("num_pathways", token_counts.get("rna"))
        encoder = build_encoder(modality, name, **entry)
        if encoder.token_dim != dim:
            raise ValueError(f"{folder}: the {modality} encoder ({name or 'default'}) gives {encoder.token_dim}-d tokens, "
                             f"the model's {modality} stream takes {dim}-d")
        weights = folder / f"{modality}_encoder.safetensors"
        if weights.is_file():
            from safetensors.torch import load_file

            encoder.load_state_dict(load_file(weights), strict=True)
        encoders[modality] = encoder.to(device).eval()
    return encoders
