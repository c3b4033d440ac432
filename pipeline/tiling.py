"""How the denoiser engines cut images into tiles and put them back together, in numpy (no torch):
the torch engine (``pipeline/infer.py``) and the ONNX Runtime engine (``pipeline/ort_engine.py``)
differ only in the forward pass they hand to :func:`clean_tiled`.

Every image is padded (edge pixels repeated) to the model's downsampling multiple and cut into
overlapping tiles, so memory is bounded by the tile size whatever the input size; tiles of all
images in a call are grouped by shape and run in mini-batches; each tile keeps its inner part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.noise_level import estimate_sigma

DEFAULT_DENOISER = "denoiser-base"

# On CPU a forward pass takes tiles up to this many pixels in all (at least one tile): a 481x321
# photo alone ran 114 ms, two of them per pass 124 ms and three 124 ms per image (median of 5,
# 2 torch threads): larger activations fall out of the caches. Small tiles still go together.
CPU_FORWARD_PIXELS = 1 << 17

# Self-ensemble views (quarter turns, mirror) in the order they are added: x2 pairs the image
# with its transpose, x4 adds the half turn and the anti-transpose, x8 is the whole dihedral group.
VIEWS: tuple[tuple[int, bool], ...] = ((0, False), (1, True), (2, False), (3, True),
                                      (1, False), (0, True), (3, False), (2, True))
ENSEMBLES = (1, 2, 4, 8)

# (tiles N,3,h,w float32 in [0, 1], levels N float32, views) -> denoised tiles N,3,h,w
Predict = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
Sigma = float | str | Sequence[float | None] | None


class EmbedderLike(Protocol):
    def embed(self, images: list[np.ndarray]) -> np.ndarray: ...

    def vectors(self, images: list[np.ndarray], regions: bool) -> tuple[np.ndarray, np.ndarray | None]: ...


def check_ensemble(n: int) -> int:
    if n not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLES))}, not {n}")
    return n


def views_by_parity(ensemble: int) -> list[list[tuple[int, bool]]]:
    """The ensemble's views in two groups of one output shape each (even, odd quarter turns)."""
    groups = [[v for v in VIEWS[:ensemble] if v[0] % 2 == parity] for parity in (0, 1)]
    return [g for g in groups if g]


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


def clean_tiled(images: list[np.ndarray], levels: list[float], predict: Predict, *, multiple: int, tile: int,
                overlap: int, per_pass: Callable[[int, int], int], ensemble: int) -> list[np.ndarray]:
    """uint8 HxWx3 images -> denoised uint8 HxWx3 images through ``predict`` on tiles.

    ``per_pass(h, w)``: tiles of that shape per forward pass.
    """
    padded: list[np.ndarray] = []
    tiles: list[Tile] = []
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        ph, pw = -h % multiple, -w % multiple
        px = np.ascontiguousarray(img[:, :, :3].transpose(2, 0, 1), dtype=np.float32) / 255
        if ph or pw:
            px = np.pad(px, ((0, 0), (0, ph), (0, pw)), mode="edge")
        padded.append(px)
        H, W = h + ph, w + pw
        th, tw = min(tile, H), min(tile, W)
        for y in tile_starts(H, th, overlap):
            for x in tile_starts(W, tw, overlap):
                tiles.append(Tile(i, y, x, th, tw))
    outputs = [np.empty_like(p) for p in padded]
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        by_shape.setdefault((t.h, t.w), []).append(t)
    for (th, tw), group in by_shape.items():
        per = max(1, per_pass(th, tw))
        for j in range(0, len(group), per):
            chunk = group[j : j + per]
            xb = np.stack([padded[t.image][:, t.y : t.y + t.h, t.x : t.x + t.w] for t in chunk])
            sb = np.asarray([levels[t.image] for t in chunk], np.float32)
            pred = predict(xb, sb, ensemble)
            for t, out in zip(chunk, pred):
                H, W = padded[t.image].shape[1:]
                # keep each tile's inner part; edges of the image keep the tile's edge
                y0 = 0 if t.y == 0 else overlap
                x0 = 0 if t.x == 0 else overlap
                y1 = t.h if t.y + t.h >= H else t.h - overlap
                x1 = t.w if t.x + t.w >= W else t.w - overlap
                outputs[t.image][:, t.y + y0 : t.y + y1, t.x + x0 : t.x + x1] = out[:, y0:y1, x0:x1]
    cleaned = []
    for img, out in zip(images, outputs):
        h, w = img.shape[:2]
        arr = np.round(np.clip(out[:, :h, :w], 0, 1) * np.float32(255)).astype(np.uint8)
        cleaned.append(np.ascontiguousarray(arr.transpose(1, 2, 0)))
    return cleaned


class DenoiserBase:
    """What both denoiser engines share: noise levels, tiling, the embedding. A backend sets the
    attributes below and implements ``_predict`` (a forward pass on tiles, views averaged) and
    ``_per_pass`` (tiles of one shape per pass)."""

    name: str
    sha256: str
    device: Any  # "cpu" for ORT, a torch.device for the torch engine
    multiple: int
    tile: int
    overlap: int
    batch_size: int
    ensemble: int
    embedder: EmbedderLike
    embedding_dim: int
    embedding_model: str

    def _predict(self, xb: np.ndarray, sb: np.ndarray, ensemble: int) -> np.ndarray:
        raise NotImplementedError

    def _per_pass(self, th: int, tw: int) -> int:
        """On CPU, tiles up to ``CPU_FORWARD_PIXELS`` in all (and at most the batch size)."""
        return max(1, min(self.batch_size, CPU_FORWARD_PIXELS // (th * tw)))

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

    def clean(self, images: list[np.ndarray], sigma: Sigma = None, ensemble: int | None = None) -> list[np.ndarray]:
        """Denoised uint8 HxWx3 images. sigma: None (auto: estimated per image), "blind", one
        level for all, or one per image; ensemble: views averaged per tile (1, 2, 4, 8), the
        engine's setting when None."""
        views = self.ensemble if ensemble is None else check_ensemble(ensemble)
        return clean_tiled(images, self.conditions(images, sigma), self._predict, multiple=self.multiple,
                           tile=self.tile, overlap=self.overlap, per_pass=self._per_pass, ensemble=views)

    def denoise(self, images: list[np.ndarray], sigma: Sigma = None,
                ensemble: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """``clean`` and the embeddings [N, D] of the cleaned images."""
        cleaned = self.clean(images, sigma, ensemble)
        return cleaned, self.embed(cleaned)

    def denoise_one(self, img: np.ndarray, sigma: Sigma = None, ensemble: int | None = None) -> np.ndarray:
        return self.denoise([img], sigma, ensemble)[0][0]

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """The search embedding of (cleaned) images: the copy-detection embedder's, float32."""
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self.embedder.embed(images)

    def vectors(self, images: list[np.ndarray], regions: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """What a DST row stores: the search embedding, and the region vectors ([N, dim],
        [N, R, dim], float32, in one pass) when ``regions``."""
        return self.embedder.vectors(images, regions)
