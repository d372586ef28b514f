"""What a codec or encoder computes, as a string: latent caches and teachers compare these to
notice when a model changed (a digest of the weights, not their file name)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

# Tensors above this many elements are fingerprinted from a strided sample of about this
# many values (plus their sum), so a multi-GB foundation model hashes in about a second.
_HASH_SAMPLE = 1 << 20


def _digest_module(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if flat.numel() > _HASH_SAMPLE:
            step = flat.numel() // _HASH_SAMPLE
            digest.update(repr(float(flat.double().sum())).encode())
            flat = flat[::step]
        data = flat.cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.float()
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def codec_identity(codec: Any) -> str:
    """A string that changes when the codec would encode differently.

    `PixelUnshuffleCodec`: its repr (``pixel-unshuffle:F``). `DiffusersVAE`: class,
    configuration (minus its path), scaling/shift, sampling mode and a weight digest.
    Anything else: its ``identity`` attribute, else a digest of its weights when it is a
    module, else a readable repr; otherwise pass ``vae_id=`` yourself."""
    identity = getattr(codec, "identity", None)
    if isinstance(identity, str):
        return identity
    vae = getattr(codec, "vae", None)
    if isinstance(vae, torch.nn.Module):
        config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
        config.update(
            scaling_factor=getattr(codec, "scaling_factor", None),
            shift_factor=getattr(codec, "shift_factor", None),
            sample_posterior=getattr(codec, "sample_posterior", None),
        )
        config_digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{type(codec).__name__}:{type(vae).__name__}:config={config_digest}:weights={_digest_module(vae)}"
    if isinstance(codec, torch.nn.Module):
        return f"{type(codec).__name__}:weights={_digest_module(codec)}"
    text = repr(codec)
    if " object at 0x" in text:
        raise ValueError(
            f"cannot tell which codec {type(codec).__name__} is (no identity, weights or repr); pass vae_id='...'"
        )
    return text


def encoder_identity(encoder: Callable[..., Any]) -> str:
    """Like `codec_identity`, for a feature encoder (a module, or any callable)."""
    identity = getattr(encoder, "identity", None)
    if isinstance(identity, str):
        return identity
    if isinstance(encoder, torch.nn.Module):
        return f"{type(encoder).__name__}:weights={_digest_module(encoder)}"
    name = getattr(encoder, "__qualname__", type(encoder).__qualname__)
    return f"{getattr(encoder, '__module__', '')}.{name}"
