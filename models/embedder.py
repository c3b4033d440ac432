"""Copy-detection embedder: a compact CNN, GeM pooling and a linear projection, L2-normalised.

Trained contrastively (``aejob train embedder``) so that an image and its copies — re-encoded,
resized, cropped to half its area, slightly rotated, flipped, noisy, blurred, colour-shifted —
land close together and different pictures far apart (SSCD's recipe, scaled down to a few
milliseconds per image on a CPU core).

``embed`` (``models/regions.py``, shared with the ONNX engine) downscales every image (shorter
side ``input_size``, aspect kept, the long side capped at ``max_aspect`` times the short by a
centre crop) before the network: its cost is then independent of the image size. Embeddings are
computed in float32 on every device (no autocast, no TF32), so the same image gets the same
vector on CPU and GPU up to rounding.

``embed_regions`` / ``embed_with_regions`` add the database side's regional vectors: 5 windows
of half the area of the image prepared at a shorter side of 160 (``models/regions.py``), which
a crop of half an image matches far better than the full-image vector does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.regions import DEFAULT_EMBEDDER, REGIONS, EmbedderBase, RegionSpec
from models.regions import prepare as prepare  # re-exported: training and tests prepare as the engine does

KIND = "embedder"


@dataclass(frozen=True)
class EmbedderConfig:
    stem: int = 24
    channels: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 stage each, after the stem
    blocks: tuple[int, ...] = (1, 1, 2, 1)  # residual blocks per stage
    dim: int = 256
    gem_p: float = 3.0
    input_size: int = 128  # shorter side at inference
    max_aspect: float = 2.0


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class CopyEmbedder(nn.Module):
    """uint8-range RGB in [0, 1] (N, 3, H, W) → L2-normalised (N, dim)."""

    def __init__(self, config: EmbedderConfig = EmbedderConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [_down(3, config.stem)]
        prev = config.stem
        for c, b in zip(config.channels, config.blocks):
            layers.append(_down(prev, c))
            layers.extend(_Block(c) for _ in range(b))
            prev = c
        self.features = nn.Sequential(*layers)
        # GeM's exponent is learned (Radenović et al.); it starts at gem_p
        self.gem_p = nn.Parameter(torch.tensor(float(config.gem_p)))
        self.proj = nn.Linear(prev, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features((x - 0.5) / 0.25)
        p = self.gem_p.clamp(1.0, 8.0)
        g = f.clamp_min(1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        return F.normalize(self.proj(g), dim=-1)


def register_all(register: Any, entry_cls: Any) -> None:
    register(entry_cls(
        name="copy-embedder", kind=KIND, config_cls=EmbedderConfig, factory=CopyEmbedder,
        presets={"tiny": {"stem": 8, "channels": (8, 16), "blocks": (1, 1), "dim": 16, "input_size": 32},
                 "base": {}},
    ))


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """No TF32 on CUDA: the vectors must not depend on the device's matmul precision."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class EmbedderEngine(EmbedderBase):
    """Loads an embedder checkpoint once; ``embed`` maps uint8 RGB images to float32 [N, dim],
    ``embed_regions`` to their region vectors [N, R, dim] (``models/regions.py``)."""

    def __init__(self, checkpoint_ref: str = DEFAULT_EMBEDDER, threads: int = 0, device: str = "auto",
                 regions: RegionSpec = REGIONS) -> None:
        from models import checkpoint

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        ck = checkpoint.load(checkpoint_ref, map_location="cpu")
        if not isinstance(ck.model, CopyEmbedder):
            raise ValueError(f"{checkpoint_ref}: {ck.name} is not an embedder checkpoint")
        self.model = ck.model.float().to(self.device).eval()
        self.config: EmbedderConfig = ck.config
        self.input_size, self.max_aspect = int(self.config.input_size), float(self.config.max_aspect)
        self.name = ck.name
        self.sha256 = ck.sha256
        self.meta = ck.meta
        self.path = ck.path
        self.dim = int(ck.config.dim)
        self.model_id = f"{self.name}:{self.sha256[:12]}"
        self.regions = regions  # the windows of ``embed_regions`` (recorded with the column)

    @torch.inference_mode()
    def _run(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device, torch.float32).div_(255)
        with _strict_fp32():
            return self.model(t).cpu().numpy()  # type: ignore[no-any-return]
