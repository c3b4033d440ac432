"""The denoiser engine (the model stage's work; its Ray Data actor is in pipeline/actors.py).

The engine pads every image to the model's downsampling multiple and cuts large images into
overlapping tiles, so memory is bounded by the tile size whatever the input size; tiles of all
images in a batch are grouped by shape and run in mini-batches. The search embedding of the
cleaned image and its region vectors come from the copy-detection embedder
(``models/embedder.py``), the same vector space that ``aejob compress`` writes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from models import checkpoint
from models.denoiser import ResUNetDenoiser
from models.embedder import DEFAULT_EMBEDDER, EmbedderEngine
from pipeline.batch import ok_rows, pixels_of
from pipeline.noise_level import estimate_sigma, estimate_sigma_pca

__all__ = ["DEFAULT_DENOISER", "DenoiseEngine", "estimate_sigma", "estimate_sigma_pca", "ok_rows", "pixels_of"]

log = logging.getLogger(__name__)

DEFAULT_DENOISER = "denoiser-base"
# On CPU a forward pass takes tiles up to this many pixels in all (at least one tile): a 481x321
# photo alone ran 114 ms, two of them per pass 124 ms and three 124 ms per image (median of 5,
# 2 torch threads): larger activations fall out of the caches. Small tiles still go together.
CPU_FORWARD_PIXELS = 1 << 17


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


Sigma = float | str | Sequence[float | None] | None


def gpu_tile_batch(tile: int, device: torch.device, bytes_per_pixel: int = 6_000, most: int = 64) -> int:
    """Tiles per forward pass that fill about half of the GPU's free memory.

    ``bytes_per_pixel`` is the U-Net's activation footprint in fp16 at inference (its widest
    levels hold ~1.5k fp16 values per input pixel), so a 512² tile needs about 1.5 GB.
    """
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(most, int(free * 0.5 // (tile * tile * bytes_per_pixel))))


@dataclass(frozen=True)
class Tile:
    image: int
    y: int
    x: int
    h: int
    w: int


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - 2 * overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


# Self-ensemble views (quarter turns, mirror) in the order they are added: x2 pairs the image
# with its transpose, x4 adds the half turn and the anti-transpose, x8 is the whole dihedral group.
VIEWS: tuple[tuple[int, bool], ...] = ((0, False), (1, True), (2, False), (3, True),
                                      (1, False), (0, True), (3, False), (2, True))
ENSEMBLES = (1, 2, 4, 8)


def check_ensemble(n: int) -> int:
    if n not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLES))}, not {n}")
    return n


class DenoiseEngine:
    def __init__(
        self,
        checkpoint_ref: str = DEFAULT_DENOISER,
        device: str = "auto",
        threads: int = 0,
        tile: int = 512,
        overlap: int = 32,
        batch_size: int = 4,
        amp: bool = True,
        ensemble: int = 1,
        embedder: str = DEFAULT_EMBEDDER,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        ck = checkpoint.load(checkpoint_ref, map_location="cpu")
        self.model = cast(ResUNetDenoiser, ck.model).to(self.device).eval()
        self.name = ck.name
        self.sha256 = ck.sha256
        self.meta = ck.meta
        self.multiple = int(ck.config.multiple)
        self.tile = max(self.multiple, tile // self.multiple * self.multiple)
        self.overlap = max(0, min(overlap, self.tile // 4))  # tiles must advance
        self.amp = amp and self.device.type == "cuda"
        # On a GPU the batch is sized to fill it (the CLI's --batch-size counts images per call,
        # tiles per forward pass are the engine's business); on CPU it is the given size.
        self.batch_size = gpu_tile_batch(self.tile, self.device) if self.device.type == "cuda" else max(1, batch_size)
        self.ensemble = check_ensemble(ensemble)
        # The embedding is the copy-detection embedder's (models/embedder.py), in float32 on
        # every device: vectors do not change with the denoiser, and clean and compress share them.
        self.embedder = EmbedderEngine(embedder, device=self.device.type)
        self.embedding_dim = self.embedder.dim
        self.embedding_model = self.embedder.model_id

    def _autocast(self):  # type: ignore[no-untyped-def]
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """To the device; from pinned host memory on CUDA so the copy overlaps compute."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _to_tensor(self, img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255)

    def conditions(self, images: list[np.ndarray], sigma: Sigma) -> list[float]:
        """The noise level handed to the network per image (negative = blind).

        ``None`` (auto): each image's estimated sigma. The network was trained with the true
        level on half of its samples and blind on the rest; on held-out photos feeding the
        estimate was never worse than blind and kept clean images closer to the input
        (44.2 vs 42.0 dB). ``"blind"``: the network judges alone. A number: that level for all.
        """
        if sigma == "blind":
            return [-1.0] * len(images)
        if sigma is None:
            return [estimate_sigma(img) for img in images]
        if isinstance(sigma, (int, float)):
            return [float(sigma)] * len(images)
        return [-1.0 if s is None else float(s) for s in sigma]

    def _predict(self, xb: torch.Tensor, sb: torch.Tensor, ensemble: int) -> torch.Tensor:
        """The network on a batch of tiles, averaged over ``ensemble`` rotated/mirrored views
        (each mapped back first): residual errors of the views are partly independent, so the
        mean is closer to the clean image, at ``ensemble`` times the compute. Views of the same
        shape (even or odd quarter turns) go through the network as one batch."""
        acc = torch.zeros_like(xb)
        n = xb.shape[0]
        for parity in (0, 1):
            views = [v for v in VIEWS[:ensemble] if v[0] % 2 == parity]
            if not views:
                continue
            batch = torch.cat([torch.rot90(xb.flip(-1) if m else xb, t, (-2, -1)) for t, m in views])
            with self._autocast():
                out = self.model(batch, sb.repeat(len(views))).float()
            for j, (t, m) in enumerate(views):
                back = torch.rot90(out[j * n : (j + 1) * n], -t, (-2, -1))
                acc += back.flip(-1) if m else back
        return acc / ensemble

    def denoise(
        self, images: list[np.ndarray], sigma: Sigma = None, ensemble: int | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Denoise uint8 HxWx3 images; returns (cleaned uint8 images, embeddings [N, D]).

        sigma: None (auto: estimate per image), "blind", one level for all, or one per image.
        ensemble: views averaged per tile (1, 2, 4, 8); the engine's setting when None.
        """
        cleaned = self.clean(images, sigma, ensemble)
        return cleaned, self.embed(cleaned)

    @torch.inference_mode()
    def clean(self, images: list[np.ndarray], sigma: Sigma = None, ensemble: int | None = None) -> list[np.ndarray]:
        """``denoise`` without the embedding: the cleaned uint8 images."""
        views = self.ensemble if ensemble is None else check_ensemble(ensemble)
        levels = self.conditions(images, sigma)
        m = self.multiple
        padded: list[torch.Tensor] = []
        tiles: list[Tile] = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            ph, pw = -h % m, -w % m
            px = self._to_tensor(img)[None]
            if ph or pw:
                px = F.pad(px, (0, pw, 0, ph), mode="replicate")
            padded.append(px[0])
            H, W = h + ph, w + pw
            th, tw = min(self.tile, H), min(self.tile, W)
            for y in tile_starts(H, th, self.overlap):
                for x in tile_starts(W, tw, self.overlap):
                    tiles.append(Tile(i, y, x, th, tw))
        outputs = [torch.empty_like(p) for p in padded]
        by_shape: dict[tuple[int, int], list[Tile]] = {}
        for t in tiles:
            by_shape.setdefault((t.h, t.w), []).append(t)
        for (th, tw), group in by_shape.items():
            per = self.batch_size if self.device.type == "cuda" else max(1, min(self.batch_size,
                                                                                 CPU_FORWARD_PIXELS // (th * tw)))
            for j in range(0, len(group), per):
                chunk = group[j : j + per]
                xb = torch.stack([padded[t.image][:, t.y : t.y + t.h, t.x : t.x + t.w] for t in chunk])
                sb = torch.tensor([levels[t.image] for t in chunk], dtype=torch.float32)
                pred = self._predict(self._upload(xb), self._upload(sb), views)
                for t, out in zip(chunk, pred.cpu()):
                    H, W = padded[t.image].shape[1:]
                    # keep each tile's inner part; edges of the image keep the tile's edge
                    y0 = 0 if t.y == 0 else self.overlap
                    x0 = 0 if t.x == 0 else self.overlap
                    y1 = t.h if t.y + t.h >= H else t.h - self.overlap
                    x1 = t.w if t.x + t.w >= W else t.w - self.overlap
                    outputs[t.image][:, t.y + y0 : t.y + y1, t.x + x0 : t.x + x1] = out[:, y0:y1, x0:x1]
        cleaned = []
        for img, out in zip(images, outputs):
            h, w = img.shape[:2]
            arr = out[:, :h, :w].clamp_(0, 1).mul_(255).round_().to(torch.uint8)
            cleaned.append(arr.permute(1, 2, 0).contiguous().numpy())
        return cleaned

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """The search embedding of (cleaned) images: the copy-detection embedder's, float32."""
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self.embedder.embed(images)

    def vectors(self, images: list[np.ndarray], regions: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """What a DST row stores: the search embedding, and the region vectors ([N, dim],
        [N, R, dim], float32, in one pass) when ``regions``."""
        return self.embedder.vectors(images, regions)

    def denoise_one(self, img: np.ndarray, sigma: Sigma = None, ensemble: int | None = None) -> np.ndarray:
        return self.denoise([img], sigma, ensemble)[0][0]
