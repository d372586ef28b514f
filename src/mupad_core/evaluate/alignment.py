"""Text-image alignment: do generated images show what their captions say?

The paper scores text->H&E by the cosine similarity of image and caption embeddings in a
pathology text-image model (CONCH). Here any transformers dual encoder with
`get_image_features` / `get_text_features` (CLIP, PLIP, QuiltNet, a fine-tuned CLIP) loads
from a folder or hub id; none ships with napari-mupad, so the metric runs where the user has
one. Reported: the mean cosine of each image with its own caption, the same with the
captions shuffled (the chance level of this encoder on these captions), and the top-1
retrieval accuracy of the right caption among all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TextImageEncoder:
    """A dual encoder from a folder or hub id (config, safetensors weights, tokenizer)."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        from ..hub import resolve_pretrained

        folder = Path(resolve_pretrained(str(name_or_path), ["*.json", "*.safetensors", "*.txt", "*.model"]))
        try:
            self.model = AutoModel.from_pretrained(folder, use_safetensors=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # transformers raises many types; the user needs the folder and the reason
            raise ValueError(f"{folder}: cannot load a text-image encoder ({exc})") from exc
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"{folder}: {type(self.model).__name__} is not a text-image dual encoder")
        vision = getattr(self.model.config, "vision_config", None)
        self.size = int(getattr(vision, "image_size", 224))
        mean, std = CLIP_MEAN, CLIP_STD
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            settings = json.loads(processor.read_text())
            mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.device = torch.device(device)
        self.name = str(name_or_path)

    @staticmethod
    def _embedding(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unit embeddings (B, D)."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.device)
        return F.normalize(self._embedding(self.model.get_image_features(pixel_values=x)).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self._embedding(features).float(), dim=-1).cpu()


def text_image_alignment(encoder: TextImageEncoder, images: torch.Tensor, captions: Sequence[str],
                         seed: int = 0) -> dict:
    """Alignment of each image with its caption, against shuffled captions and as retrieval."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    if len(captions) < 2:
        raise ValueError("text-image alignment needs at least two image-caption pairs")
    a, b = encoder.images(images), encoder.texts(captions)
    similarity = (a @ b.T).numpy()
    matched = np.diag(similarity)
    order = np.random.default_rng(seed).permutation(len(captions))
    while np.any(order == np.arange(len(captions))):  # a derangement: no image keeps its caption
        order = np.random.default_rng(seed := seed + 1).permutation(len(captions))
    shuffled = similarity[np.arange(len(captions)), order]
    retrieval = (similarity.argmax(axis=1) == np.arange(len(captions))).mean()
    return {"encoder": encoder.name, "pairs": len(captions), "cosine": round(float(matched.mean()), 4),
            "cosine_shuffled": round(float(shuffled.mean()), 4),
            "top1_retrieval": round(float(retrieval), 4)}
