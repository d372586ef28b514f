"""The bundle of condition tokens a MUPAD model is queried with.

Keeping tokens, masks and presence flags together lets samplers drop a modality
(classifier-free guidance) or a whole sample without knowing which encoders made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Conditions:
    """Condition tokens per modality (`image`, `text`, `rna`).

    tokens[m]:   (B, N_m, D_m) float tensor from that modality's encoder
                 (for `rna`: (B, P) pathway scores; the model tokenises them).
    masks[m]:    optional (B, N_m) bool, True for real tokens (padding = False).
    presence[m]: (B,) float/bool; 0 switches modality m off for that sample exactly.
    """

    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    presence: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for name, t in self.tokens.items():
            if name not in self.presence:
                self.presence[name] = torch.ones(t.shape[0], device=t.device)

    @property
    def batch_size(self) -> int | None:
        for t in self.tokens.values():
            return t.shape[0]
        return None

    def to(self, device=None, dtype=None) -> "Conditions":
        def move(t, floating=True):
            if t is None:
                return None
            if dtype is not None and floating and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Conditions(
            tokens={k: move(v) for k, v in self.tokens.items()},
            masks={k: move(v, floating=False) for k, v in self.masks.items()},
            presence={k: move(v, floating=False) for k, v in self.presence.items()},
        )

    def without(self, *names: str) -> "Conditions":
        """The same conditions with modalities switched off for every sample."""
        presence = dict(self.presence)
        for name in names:
            if name in presence:
                presence[name] = torch.zeros_like(presence[name])
        return Conditions(dict(self.tokens), dict(self.masks), presence)

    def repeat(self, n: int) -> "Conditions":
        """Stack the batch n times (e.g. cond+uncond in one forward pass)."""
        cat = lambda t: None if t is None else torch.cat([t] * n, dim=0)  # noqa: E731
        return Conditions(
            {k: cat(v) for k, v in self.tokens.items()},
            {k: cat(v) for k, v in self.masks.items()},
            {k: cat(v) for k, v in self.presence.items()},
        )

    @staticmethod
    def concat(parts: list["Conditions"]) -> "Conditions":
        """Batch-concatenate conditions that carry the same modalities."""
        names = parts[0].tokens.keys()
        out = Conditions()
        for name in names:
            out.tokens[name] = torch.cat([p.tokens[name] for p in parts])
            out.presence[name] = torch.cat([p.presence[name].float() for p in parts])
            if all(name in p.masks for p in parts):
                out.masks[name] = torch.cat([p.masks[name] for p in parts])
        return out
