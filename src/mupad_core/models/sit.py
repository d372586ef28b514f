"""SiT backbone with Decoupled Cross-Attention: the MUPAD denoiser.

A DiT/SiT-style transformer on VAE latents (patch size 2, adaLN-Zero time
conditioning) that predicts the velocity of the linear interpolant (see
`mupad_core.transport.path`). Condition tokens enter through per-modality
cross-attention streams after self-attention in every block. Optional extras:

- a CLS token (the teacher's global embedding of the clean image) that is noised and
  denoised together with the latent tokens (REG-style, paper eq. 3);
- an alignment projector: a small CNN over one block's tokens laid out on the latent
  grid, regressed onto a frozen teacher's patch features (paper eq. 2);
- `concat_channels`: a spatial template (e.g. the H&E latent for H&E->mIF) concatenated
  with the noisy latent channel-wise before patch embedding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import SelfAttention, build_cross_attention
from .conditions import Conditions
from .embeddings import ContextEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d

# hidden size, depth, heads: the DiT/SiT presets (patch size is a separate choice).
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, as one fused elementwise pass over the tokens."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, then the condition streams, then the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_attention: str | None, qk_norm: bool,
                 modalities: tuple[str, ...] = ()):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, qk_norm=qk_norm)
        self.cross = build_cross_attention(cross_attention, dim, heads, dim, modalities) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, contexts, masks, presence):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        # addcmul: the gated residual x + gate * f(x) in one pass instead of two.
        x = torch.addcmul(x, gate_msa[:, None], self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        if self.cross is not None and contexts:
            x = x + self.cross(self.norm_cross(x), contexts, masks, presence)
        return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class AlignmentProjector(nn.Module):
    """Small CNN from a block's tokens (laid out spatially) to teacher feature space.

    Convolutions see neighbouring tokens, unlike REPA's per-token MLP: the paper's
    argument is that spatial context helps match a pathology encoder's patch features.
    `kind="mlp"` is REPA's projector (1x1 convolutions: each token alone), for the ablation.
    """

    def __init__(self, dim: int, out_dim: int, width: int = 0, kind: str = "cnn"):
        super().__init__()
        if kind not in ("cnn", "mlp"):
            raise ValueError(f"align_projector must be 'cnn' or 'mlp', got {kind!r}")
        width = width or min(dim * 2, 2048)
        k = 3 if kind == "cnn" else 1
        self.net = nn.Sequential(
            nn.Conv2d(dim, width, k, padding=k // 2),
            nn.SiLU(),
            nn.Conv2d(width, width, k, padding=k // 2),
            nn.SiLU(),
            nn.Conv2d(width, out_dim, 1),
        )

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, grid_h, grid_w)
        return self.net(x)


@dataclass
class SiTOutput:
    velocity: torch.Tensor
    cls_velocity: torch.Tensor | None = None
    projected: torch.Tensor | None = None  # (B, align_dim, H/p, W/p) for the alignment loss


class MupadSiT(ModelMixin, ConfigMixin):
    """The MUPAD denoiser. Build with `MupadSiT.from_preset("B", ...)` or a config dict."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        concat_channels: int = 0,
        patch_size: int = 2,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        cross_attention: str | None = "decoupled",
        condition_dims: Mapping[str, int] | None = None,
        condition_tokens: Mapping[str, int] | None = None,
        cls_dim: int = 0,
        align_depth: int = 0,
        align_dim: int = 0,
        qk_norm: bool = False,
        align_projector: str = "cnn",
    ):
        super().__init__()
        condition_dims = dict(condition_dims or {})
        condition_tokens = dict(condition_tokens or {})
        if condition_dims and not cross_attention:
            raise ValueError("condition_dims given but cross_attention is off")
        if align_dim and not 0 < align_depth <= depth:
            raise ValueError(f"align_depth must be in 1..{depth}, got {align_depth}")
        if hidden_size < patch_size * patch_size * in_channels:
            # Found the hard way: a demo model left visible noise in every sample.
            warnings.warn(
                f"hidden_size {hidden_size} < patch_size² x in_channels = {patch_size * patch_size * in_channels}: "
                "the output layer cannot express every velocity component, so samples keep residual noise; "
                "use a wider model, a smaller patch or a latent with fewer channels",
                stacklevel=2,
            )
        self.out_channels = in_channels
        self.x_embedder = PatchEmbed(in_channels + concat_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.context_embedders = nn.ModuleDict(
            {
                name: ContextEmbedder(dim, hidden_size, condition_tokens.get(name, 0), scalar_tokens=(dim == 1))
                for name, dim in condition_dims.items()
            }
        )
        self.cls_embedder = nn.Linear(cls_dim, hidden_size) if cls_dim else None
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention if condition_dims else None, qk_norm,
                     tuple(condition_dims))
            for _ in range(depth)
        )
        for i, block in enumerate(self.blocks):
            block.attn.block_index = i
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        self.cls_head = FinalLayer(hidden_size, cls_dim) if cls_dim else None
        self.projector = AlignmentProjector(hidden_size, align_dim, kind=align_projector) if align_dim else None
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "MupadSiT":
        """SiT-S/B/L/XL sizes, e.g. `from_preset("B", in_channels=4)` is SiT-B/2."""
        try:
            hidden, depth, heads = PRESETS[name.upper().split("/")[0]]
        except KeyError:
            raise ValueError(f"unknown SiT preset {name!r}; choose from {', '.join(PRESETS)}") from None
        return cls(hidden_size=hidden, depth=depth, num_heads=heads, **kwargs)

    def initialize_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in filter(None, (self.final_layer, self.cls_head)):
            for layer in (head.adaLN_modulation[-1], head.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    # -- attention hooks ------------------------------------------------------------
    def set_attention_processor(self, processor) -> None:
        """Install (or with None remove) a self-attention processor in every block."""
        for block in self.blocks:
            block.attn.processor = processor

    # -- forward ------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def embed_conditions(self, conditions: Conditions | None):
        if conditions is None or not self.context_embedders:
            return {}, {}, {}
        contexts, masks, presence = {}, {}, {}
        # The first parameter's dtype, i.e. what ModelMixin.dtype returns, without its walk
        # over every submodule and parameter (~1 ms a call, per modality, per forward).
        dtype = self.x_embedder.proj.weight.dtype
        for name, tokens in conditions.tokens.items():
            if name not in self.context_embedders:
                raise ValueError(f"model has no '{name}' condition stream (has: {', '.join(self.context_embedders)})")
            contexts[name] = self.context_embedders[name](tokens.to(dtype))
            if name in conditions.masks:
                masks[name] = conditions.masks[name]
            presence[name] = conditions.presence[name]
        return contexts, masks, presence

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        conditions: Conditions | None = None,
        cls: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        return_projection: bool = False,
    ) -> SiTOutput:
        """x: (B, C, H, W) noisy latent at time t (B,), t=0 noise, t=1 data."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.config.concat_channels:
            if concat is None:
                raise ValueError(f"model expects a {self.config.concat_channels}-channel spatial template (concat=)")
            x_in = torch.cat([x, concat.to(x.dtype)], dim=1)
        else:
            x_in = x
        p = self.config.patch_size
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        h = self.x_embedder(x_in)
        h = h + sincos_pos_embed_2d(h.shape[-1], grid_h, grid_w, device=h.device, dtype=h.dtype)
        c = self.t_embedder(t)
        n_prefix = 0
        if self.cls_embedder is not None:
            if cls is None:
                raise ValueError("model has a CLS token; pass cls= (noised teacher embedding)")
            h = torch.cat([self.cls_embedder(cls.to(h.dtype))[:, None], h], dim=1)
            n_prefix = 1
        contexts, masks, presence = self.embed_conditions(conditions)
        projected = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c, contexts, masks, presence)
            if return_projection and self.projector is not None and i == self.config.align_depth:
                projected = self.projector(h[:, n_prefix:], grid_h, grid_w)
        velocity = self.unpatchify(self.final_layer(h[:, n_prefix:], c), grid_h, grid_w)
        cls_velocity = self.cls_head(h[:, :1], c)[:, 0] if n_prefix else None
        return SiTOutput(velocity=velocity, cls_velocity=cls_velocity, projected=projected)

    def predict(self, x_t, t, conditions=None, cls=None, concat=None) -> SiTOutput:
        """The model-handle entry point samplers and the engine call."""
        return self.forward(x_t, t, conditions=conditions, cls=cls, concat=concat)
