"""The denoiser engine on torch (GPU, or CPU without an ONNX export; the model stage's work,
its Ray Data actor is in pipeline/actors.py, the ONNX Runtime engine in pipeline/ort_engine.py).

Tiling is ``pipeline/tiling.py``'s: memory is bounded by the tile size whatever the input size.
The search embedding of the cleaned image and its region vectors come from the copy-detection
embedder (``models/embedder.py``), the same vector space that ``aejob compress`` writes.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import cast

import numpy as np
import torch

from models import checkpoint
from models.denoiser import ResUNetDenoiser
from models.embedder import DEFAULT_EMBEDDER, EmbedderEngine
from pipeline.batch import ok_rows, pixels_of
from pipeline.noise_level import estimate_sigma, estimate_sigma_pca
from pipeline.tiling import DEFAULT_DENOISER, DenoiserBase, Sigma, check_ensemble, views_by_parity

__all__ = ["DEFAULT_DENOISER", "DenoiseEngine", "Sigma", "estimate_sigma", "estimate_sigma_pca", "ok_rows",
           "pixels_of"]

log = logging.getLogger(__name__)

def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gpu_tile_batch(tile: int, device: torch.device, bytes_per_pixel: int = 6_000, most: int = 64) -> int:
    """Tiles per forward pass that fill about half of the GPU's free memory.

    ``bytes_per_pixel`` is the U-Net's activation footprint in fp16 at inference (its widest
    levels hold ~1.5k fp16 values per input pixel), so a 512² tile needs about 1.5 GB.
    """
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(most, int(free * 0.5 // (tile * tile * bytes_per_pixel))))


class DenoiseEngine(DenoiserBase):
    """The denoiser (+ embedder) on torch: CUDA with AMP and pinned uploads, or CPU."""

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

    def _per_pass(self, th: int, tw: int) -> int:
        return self.batch_size if self.device.type == "cuda" else super()._per_pass(th, tw)

    @torch.inference_mode()
    def _predict(self, xb_np: np.ndarray, sb_np: np.ndarray, ensemble: int) -> np.ndarray:
        """The network on a batch of tiles, averaged over ``ensemble`` rotated/mirrored views
        (each mapped back first): residual errors of the views are partly independent, so the
        mean is closer to the clean image, at ``ensemble`` times the compute. Views of the same
        shape (even or odd quarter turns) go through the network as one batch, on the device."""
        xb, sb = self._upload(torch.from_numpy(xb_np)), self._upload(torch.from_numpy(sb_np))
        acc = torch.zeros_like(xb)
        n = xb.shape[0]
        for views in views_by_parity(ensemble):
            batch = torch.cat([torch.rot90(xb.flip(-1) if m else xb, t, (-2, -1)) for t, m in views])
            with self._autocast():
                out = self.model(batch, sb.repeat(len(views))).float()
            for j, (t, m) in enumerate(views):
                back = torch.rot90(out[j * n : (j + 1) * n], -t, (-2, -1))
                acc += back.flip(-1) if m else back
        return (acc / ensemble).cpu().numpy()
