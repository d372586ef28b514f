"""Self-attention and the two cross-attention designs compared in the paper.

Decoupled Cross-Attention (DCA, paper eq. 1) gives every condition modality its own
key/value (and query) projections, so image, text and RNA tokens never compete inside
one softmax; a per-sample presence flag gates each stream, which is what makes
classifier-free guidance and "any subset of conditions" exact. The `shared` variant is
the ablation baseline: one cross-attention over all condition tokens concatenated.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("image", "text", "rna")

# An attention processor may replace how attention probabilities are formed
# (record/inject self-attention maps for FF->FFPE). It is called with
# (block_index, q, k, v) shaped (B, heads, N, head_dim) and returns the attended
# values, or None to fall back to fused SDPA.
AttentionProcessor = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over image (+CLS) tokens via fused SDPA.

    `processor` is a hook (set by `MupadSiT.set_attention_processor`) that can compute
    the attention probabilities explicitly so they can be recorded or injected.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads, elementwise_affine=False) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, elementwise_affine=False) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.block_index = -1
        self.processor: AttentionProcessor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.processor(self.block_index, q, k, v) if self.processor is not None else None
        if out is None:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(_merge_heads(out))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to one set of condition tokens."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        q = _split_heads(self.q(x), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        attn_mask = None
        if context_mask is not None:
            # (B, Nc) bool, True = real token; broadcast over heads and queries.
            attn_mask = context_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(_merge_heads(out))


class DecoupledCrossAttention(nn.Module):
    """One cross-attention stream per modality, gated per sample and summed."""

    def __init__(self, dim: int, heads: int, context_dim: int, modalities=MODALITIES):
        super().__init__()
        self.streams = nn.ModuleDict({m: CrossAttention(dim, heads, context_dim) for m in modalities})

    def forward(
        self,
        x: torch.Tensor,
        contexts: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor | None],
        presence: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        out = None
        for name, stream in self.streams.items():
            if name not in contexts:
                continue
            gate = presence[name].to(x.dtype)[:, None, None]
            # Multiplying by an exact 0/1 gate removes the stream's contribution
            # bit-exactly for absent samples (the "no effect" guarantee). The first
            # stream starts the sum and later ones are fused adds (addcmul), rather than
            # zeros + gate * stream for each.
            y = stream(x, contexts[name], masks.get(name))
            out = gate * y if out is None else torch.addcmul(out, gate, y)
        return torch.zeros_like(x) if out is None else out


class SharedCrossAttention(nn.Module):
    """Ablation baseline: one cross-attention over concatenated condition tokens.

    Each modality's tokens get a learned modality embedding; absent modalities are
    masked out of the softmax (a sample with none present gets zero update).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, modalities=MODALITIES):
        super().__init__()
        self.modalities = tuple(modalities)
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(context_dim)) for m in self.modalities}
        )
        self.attn = CrossAttention(dim, heads, context_dim)

    def forward(self, x, contexts, masks, presence) -> torch.Tensor:
        tokens, keep = [], []
        for name in self.modalities:
            if name not in contexts:
                continue
            c = contexts[name]
            tokens.append(c + self.modality_embed[name])
            m = masks.get(name)
            m = torch.ones(c.shape[:2], dtype=torch.bool, device=c.device) if m is None else m.bool()
            keep.append(m & presence[name].bool()[:, None])
        if not tokens:
            return torch.zeros_like(x)
        context = torch.cat(tokens, dim=1)
        mask = torch.cat(keep, dim=1)
        any_present = mask.any(dim=1)
        # A row with every key masked would give NaN; give it one dummy key, then zero it.
        safe_mask = mask.clone()
        safe_mask[~any_present, 0] = True
        out = self.attn(x, context, safe_mask)
        return out * any_present.to(x.dtype)[:, None, None]


def build_cross_attention(kind: str, dim: int, heads: int, context_dim: int, modalities=MODALITIES) -> nn.Module:
    """One stream per modality the model was configured with (no unused streams)."""
    if kind == "decoupled":
        return DecoupledCrossAttention(dim, heads, context_dim, modalities)
    if kind == "shared":
        return SharedCrossAttention(dim, heads, context_dim, modalities)
    raise ValueError(f"cross_attention must be 'decoupled' or 'shared', got {kind!r}")
