"""The denoiser engine on ONNX Runtime (CPU, no torch), and :func:`denoise_engine`, which picks it
or the torch engine (``pipeline/infer.py``).

On CPU, with ONNX exports of both checkpoints beside them (``models/export.py``) and onnxruntime
installed, ``aejob clean``'s model actors and the bench's bare loop run this engine: the same
tiling, noise levels and embedding methods as the torch engine (``pipeline/tiling.py``,
``models/regions.py``), the networks through ORT sessions. ``AEJOB_ENGINE=torch`` (or ``onnx``)
forces a choice; a GPU always takes the torch engine (AMP, pinned uploads).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from models import export
from models.regions import DEFAULT_EMBEDDER, REGIONS, EmbedderBase, RegionSpec
from pipeline.tiling import DEFAULT_DENOISER, DenoiserBase, check_ensemble, views_by_parity

log = logging.getLogger(__name__)

ENGINE_ENV = "AEJOB_ENGINE"  # "torch" | "onnx" | unset (auto)


class OrtNet:
    """One ONNX Runtime session on CPU with ``threads`` intra-op threads (0: ORT's default)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(0, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No spin-waiting between ops: beside the encode stage's process on the same cores, spinning
        # threads took its CPU (CBSD68 job on 2 cores: 19.7 s spinning, 16.9 and 17.7 s not)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})[0]
        return np.asarray(out, np.float32)


def _exported(ref: str, kind: str) -> tuple[Path, dict[str, Any]]:
    found = export.find(ref)
    if found is None:
        raise FileNotFoundError(f"{ref}: no up-to-date ONNX export (run `aejob export-onnx {ref}`)")
    if found[1].get("kind") != kind:
        raise ValueError(f"{ref}: its export is a {found[1].get('kind')}, not a {kind}")
    return found


class OrtEmbedder(EmbedderBase):
    """The copy-detection embedder through ORT: the torch ``EmbedderEngine``'s vectors."""

    def __init__(self, checkpoint_ref: str = DEFAULT_EMBEDDER, threads: int = 0, regions: RegionSpec = REGIONS) -> None:
        path, side = _exported(checkpoint_ref, "embedder")
        self.net = OrtNet(path, threads)
        self.name, self.sha256 = str(side["name"]), str(side["source_sha256"])
        self.dim, self.input_size = int(side["dim"]), int(side["input_size"])
        self.max_aspect = float(side["max_aspect"])
        self.model_id = f"{self.name}:{self.sha256[:12]}"
        self.regions = regions

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.net(x=x.transpose(0, 3, 1, 2).astype(np.float32) / 255)


class OrtDenoiseEngine(DenoiserBase):
    """The denoiser (+ embedder) through ORT on CPU; the torch ``DenoiseEngine``'s outputs."""

    device = "cpu"

    def __init__(self, checkpoint_ref: str = DEFAULT_DENOISER, threads: int = 0, tile: int = 512,
                 overlap: int = 32, batch_size: int = 4, ensemble: int = 1, embedder: str = DEFAULT_EMBEDDER) -> None:
        path, side = _exported(checkpoint_ref, "denoiser")
        self.net = OrtNet(path, threads)
        self.name, self.sha256 = str(side["name"]), str(side["source_sha256"])
        self.multiple = int(side["multiple"])
        self.tile = max(self.multiple, tile // self.multiple * self.multiple)
        self.overlap = max(0, min(overlap, self.tile // 4))  # tiles must advance
        self.batch_size = max(1, batch_size)
        self.ensemble = check_ensemble(ensemble)
        self.embedder = OrtEmbedder(embedder, threads)
        self.embedding_dim = self.embedder.dim
        self.embedding_model = self.embedder.model_id

    def _predict(self, xb: np.ndarray, sb: np.ndarray, ensemble: int) -> np.ndarray:
        """As the torch engine's: views of one shape in one pass, each mapped back, averaged."""
        acc = np.zeros_like(xb)
        n = xb.shape[0]
        for views in views_by_parity(ensemble):
            batch = np.concatenate([np.rot90(xb[..., ::-1] if m else xb, t, axes=(-2, -1)) for t, m in views])
            out = self.net(x=batch, sigma=np.tile(sb, len(views)))
            for j, (t, m) in enumerate(views):
                back = np.rot90(out[j * n : (j + 1) * n], -t, axes=(-2, -1))
                acc += back[..., ::-1] if m else back
        return acc / np.float32(ensemble)


def _gpu_visible() -> bool:
    """Would torch's "auto" pick CUDA here? Without importing torch: an NVIDIA device node
    exists and CUDA_VISIBLE_DEVICES does not hide it (Ray sets it per actor)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _ort_allowed(device: str) -> bool:
    """Whether ORT may run here: not forced to torch, a CPU device, onnxruntime installed."""
    if os.environ.get(ENGINE_ENV, "").lower() == "torch" or device not in ("cpu", "auto"):
        return False
    if device == "auto" and _gpu_visible():
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_ready(checkpoint_ref: str, embedder: str, device: str = "auto") -> bool:
    """Whether :func:`denoise_engine` takes ORT for these checkpoints on ``device``."""
    return _ort_allowed(device) and export.find(checkpoint_ref) is not None and export.find(embedder) is not None


def denoise_engine(checkpoint_ref: str = DEFAULT_DENOISER, device: str = "auto", threads: int = 0, tile: int = 512,
                   overlap: int = 32, batch_size: int = 4, ensemble: int = 1,
                   embedder: str = DEFAULT_EMBEDDER) -> DenoiserBase:
    """The ORT engine on CPU when both checkpoints have up-to-date exports, else torch's. Each
    export is looked up (and its files hashed) once, by the engine that loads it."""
    forced = os.environ.get(ENGINE_ENV, "").lower() == "onnx"
    if forced or _ort_allowed(device):
        try:
            return OrtDenoiseEngine(checkpoint_ref, threads, tile, overlap, batch_size, ensemble, embedder)
        except FileNotFoundError:  # no up-to-date export of one of the two
            if forced:
                raise
    from pipeline.infer import DenoiseEngine

    return DenoiseEngine(checkpoint_ref, device=device, threads=threads, tile=tile, overlap=overlap,
                         batch_size=batch_size, ensemble=ensemble, embedder=embedder)
