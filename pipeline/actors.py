"""The model stage's Ray Data actors, one home for all of them: each loads its model once.

- ``DenoiseActor`` (``aejob clean``): denoiser + embedding, decoded rows in place;
- ``CompressActor`` (``aejob compress``): learned codec, bitstream + PSNR, bpp and the quality
  rung per row (fixed, or chosen per image by rate control);
- ``DecompressActor`` (``aejob decompress``): bitstreams back to image files.

Constructor arguments are plain values (an ``ObjectRef`` at most), so an actor that the pool
restarts after a crash is rebuilt from the same arguments. Threads come from the CPUs of the
node the actor runs on divided by the actors there (:func:`node_threads`), never from the
cluster's total. This module does not import torch: on CPU a ``DenoiseActor`` runs the ONNX
Runtime engine (``pipeline/ort_engine.py``) and its process never loads torch (~1 s sooner to
its first batch); the torch engines import it when they are built.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

from models.regions import DEFAULT_EMBEDDER
from pipeline import decode, storage
from pipeline.batch import normalize, objects, ok_rows, pixels_of
from pipeline.ort_engine import OrtDenoiseEngine, denoise_engine
from pipeline.tiling import DEFAULT_DENOISER, Sigma

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def threads_for(node_cpus: float, actors_on_node: int) -> int:
    """Torch threads for one of ``actors_on_node`` model actors sharing a node of ``node_cpus``."""
    return max(1, int(node_cpus // max(1, actors_on_node)))


def node_threads(actor_cpus: float, pool_max: int, actor_class: str) -> int:
    """Threads for this actor from its own node: CPUs there / model actors there.

    Actors there are counted through Ray's state API when the dashboard runs; else estimated as
    the pool's actors that fit on the node (``pool_max`` capped by CPUs / ``actor_cpus``).
    """
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node_cpus = next((float(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                      if n.get("NodeID") == node_id and n.get("Alive")), float(os.cpu_count() or 1))
    fit = int(node_cpus // actor_cpus) if actor_cpus > 0 else pool_max
    here = max(1, min(pool_max, fit))
    try:
        from ray.util.state import list_actors

        alive = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")],
                            raise_on_missing_output=False, timeout=5)
        counted = sum(1 for a in alive if actor_class in str(a.class_name))
        if counted:
            here = max(1, min(here, counted)) if counted < here else counted
    except Exception:  # no dashboard (local Ray without it): keep the estimate
        pass
    return threads_for(node_cpus, here)


def set_threads(threads: int, actor_cpus: float, pool_max: int, actor_class: str, torch_threads: bool = True) -> int:
    """``threads`` (an explicit setting) or the node's share; applied to torch unless
    ``torch_threads`` is False (an ORT engine takes its threads when its sessions are made).

    Ray gives fractional-CPU actors OMP_NUM_THREADS=1, so torch's threads are set explicitly.
    """
    if not threads:
        try:
            threads = node_threads(actor_cpus, pool_max, actor_class)
        except Exception:  # not inside Ray (a plain engine in tests)
            threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    if torch_threads:
        import torch

        torch.set_num_threads(threads)
    return threads


class _ModelActor:
    """Re-reads the node's share of threads now and then: pools grow and shrink with the cluster."""

    RECHECK_S = 60.0

    def _init_threads(self, threads: int, actor_cpus: float, pool_max: int, torch_threads: bool = True) -> None:
        self._fixed_threads = threads
        self._actor_cpus, self._pool_max = actor_cpus, pool_max
        self._torch_threads = torch_threads
        self.threads = set_threads(threads, actor_cpus, pool_max, type(self).__name__, torch_threads)
        self._checked = time.time()

    def _recheck_threads(self) -> None:
        # ORT sessions keep the thread count they were made with
        if self._fixed_threads or not self._torch_threads or time.time() - self._checked < self.RECHECK_S:
            return
        self._checked = time.time()
        self.threads = set_threads(0, self._actor_cpus, self._pool_max, type(self).__name__)


class DenoiseActor(_ModelActor):
    """Ray Data callable class: loads the checkpoint once, denoises decoded rows in place.

    ``calls`` > 1: Ray Data runs that many calls of this actor at once (``build_dataset``), each on
    ``threads // calls`` intra-op threads. On CPU the ORT engine gains from it: one 2-thread call
    ends every operator by spin-waiting for its second thread, and beside the CPU stages' process
    that thread is often descheduled (CBSD68 model work beside a single-threaded load at 48%
    duty: 14.0 s and 23.4 CPU-s for one 2-thread call at a time, 12.0 s and 20.9 CPU-s for two
    1-thread calls). The engine has no per-call state, so concurrent calls are safe. With fewer
    threads than calls (many actors on a node), only ``threads`` calls run the model at once.
    """

    def __init__(
        self,
        checkpoint_ref: str = DEFAULT_DENOISER,
        sigma: float | str | None = None,
        threads: int = 0,
        device: str = "auto",
        tile: int = 512,
        batch_size: int = 4,
        ensemble: int = 1,
        embedder: str = DEFAULT_EMBEDDER,
        actor_cpus: float = 1.0,
        pool_max: int = 1,
        regions: bool = True,
        calls: int = 1,
    ) -> None:
        # the count first; a torch engine applies it to torch itself, an ORT one to its sessions
        self._init_threads(threads, actor_cpus, pool_max, torch_threads=False)
        self.regions = regions
        self.calls = max(1, calls)
        per_call = max(1, self.threads // self.calls)
        self.parallel = max(1, min(self.calls, self.threads))  # calls in the model at once
        self._slots = threading.BoundedSemaphore(self.parallel)
        self.engine = denoise_engine(checkpoint_ref, device=device, threads=per_call, tile=tile,
                                     batch_size=batch_size, ensemble=ensemble, embedder=embedder)
        self._torch_threads = not isinstance(self.engine, OrtDenoiseEngine)  # rechecked: torch only
        self.sigma = sigma
        log.info("denoiser %s on %s (%s), %d threads: %d call(s) at once of %d", self.engine.name,
                 self.engine.device, "onnxruntime" if isinstance(self.engine, OrtDenoiseEngine) else "torch",
                 self.threads, self.calls, per_call)

    def __call__(self, batch: Batch) -> Batch:
        self._recheck_threads()
        batch = normalize(batch)
        n = len(batch["key"])
        idx = ok_rows(batch)
        emb: list[object] = [None] * n
        regions: list[object] = [None] * n
        pixels = list(batch["pixels"])
        if idx:
            sigma: Sigma = self.sigma
            if sigma is None and "noise_sigma" in batch:  # auto: the CPU stage already estimated it
                sigma = [float(batch["noise_sigma"][i]) for i in idx]
            with self._slots:
                cleaned = self.engine.clean([pixels_of(batch, i) for i in idx], sigma)
                vecs, reg = self.engine.vectors(cleaned, self.regions)
            for j, i in enumerate(idx):
                pixels[i] = cleaned[j].tobytes()
                emb[i] = vecs[j].tobytes()  # bytes in flight: Ray's tensor columns reject nulls
                regions[i] = reg[j].tobytes() if reg is not None else None
        batch["pixels"] = objects(pixels)
        batch["embedding"] = objects(emb)
        batch["region_embeddings"] = objects(regions)
        batch["embedding_model"] = objects([self.engine.embedding_model if e is not None else None for e in emb])
        batch["model"] = objects([self.engine.name] * n)
        batch["checkpoint_sha256"] = objects([self.engine.sha256] * n)
        return batch


class CompressActor(_ModelActor):
    """Loads the codec once; compresses decoded rows and measures what a user keeps (PSNR)."""

    def __init__(self, checkpoint_ref: str, quality: int | None, keep_if_smaller: bool,
                 threads: int = 0, device: str = "auto", batch_size: int = 1, actor_cpus: float = 1.0,
                 pool_max: int = 1, embedder: str = DEFAULT_EMBEDDER, target_psnr: float | None = None,
                 max_bpp: float | None = None, avif_speed: int | None = None, regions: bool = True) -> None:
        from models.codec import CodecEngine
        from models.embedder import EmbedderEngine
        from pipeline.infer import pick_device

        del batch_size  # images are coded one at a time (each has its own size)
        self._init_threads(threads, actor_cpus, pool_max)
        # On a GPU only the encoder's transforms run there; entropy coding and the decode that
        # measures PSNR stay on CPU (bit-exact table choice), see models.codec.CodecEngine.
        self.engine = CodecEngine(checkpoint_ref, threads=self.threads, device=str(pick_device(device)),
                                  avif_speed=avif_speed)
        # rate control (target_psnr / max_bpp) picks the rung per image; else one fixed rung
        self.target_psnr, self.max_bpp = target_psnr, max_bpp
        controlled = target_psnr is not None or max_bpp is not None
        self.quality = None if controlled else quality if quality is not None else self.engine.default_quality
        self.keep_if_smaller = keep_if_smaller
        self.embedder = EmbedderEngine(embedder, device="cpu")  # the same vectors as `aejob clean`
        self.embedding_model = self.embedder.model_id
        self.regions = regions

    def __call__(self, batch: Batch) -> Batch:
        self._recheck_threads()
        batch = normalize(batch)
        n = len(batch["key"])
        latent: list[object] = [None] * n
        bpp = np.full(n, np.nan)
        psnr = np.full(n, np.nan)
        quality = np.full(n, np.nan)  # the rung coded at (NaN -> null: error row, or the source kept)
        codec: list[object] = [None] * n
        emb: list[object] = [None] * n
        regions: list[object] = [None] * n
        status, error = batch["status"].copy(), batch["error"].copy()
        for i in ok_rows(batch):
            img = pixels_of(batch, i)
            try:
                coded = self.engine.compress_controlled(img, self.quality, self.target_psnr, self.max_bpp)
                data = coded.data
                src = batch["source_data"][i] if "source_data" in batch else None
                if self.keep_if_smaller and src is not None and len(src) <= len(data):
                    latent[i], codec[i], psnr[i] = bytes(src), "original", float("inf")
                else:
                    latent[i], codec[i], psnr[i], quality[i] = data, "aejob", coded.psnr, coded.quality
                bpp[i] = len(latent[i]) * 8 / (img.shape[0] * img.shape[1])  # type: ignore[arg-type]
                vec, reg = self.embedder.vectors([img], self.regions)
                emb[i], regions[i] = vec[0].tobytes(), reg[0].tobytes() if reg is not None else None
            except Exception as e:  # one image's failure is its row's error
                status[i], error[i] = "error", f"compress failed: {type(e).__name__}: {e}"
        out = {k: v for k, v in batch.items() if k not in ("pixels", "exif", "source_data")}
        out.update(
            latent=objects(latent), bpp=bpp, psnr=psnr, quality=quality, codec=objects(codec),
            embedding=objects(emb), region_embeddings=objects(regions),
            embedding_model=objects([self.embedding_model if e is not None else None for e in emb]),
            model=objects([self.engine.name] * n), checkpoint_sha256=objects([self.engine.sha256] * n),
            status=status, error=error,
        )
        return out


class DecompressActor(_ModelActor):
    """Decodes latent bitstreams (or original bytes) and writes image files under ``out``."""

    def __init__(self, checkpoint_ref: str, out: str, names: Any, fmt: str = "png",
                 threads: int = 0, actor_cpus: float = 1.0, pool_max: int = 1) -> None:
        from models.codec import CodecEngine

        if not isinstance(names, dict):  # an ObjectRef: the map is stored once, not per actor
            import ray

            names = ray.get(names)
        self._init_threads(threads, actor_cpus, pool_max)
        self.engine = CodecEngine(checkpoint_ref, threads=self.threads, device="cpu")
        self.out, self.names, self.fmt = out, names, fmt

    def __call__(self, batch: Batch) -> Batch:
        from pipeline.encode import EncodeOptions, encode_image

        batch = normalize(batch)
        n = len(batch["key"])
        status, error = [], []
        for i in range(n):
            key = str(batch["key"][i])
            rel = self.names.get(key)
            if batch["status"][i] != "ok" or rel is None:
                status.append("skipped")
                error.append(batch["error"][i] if batch["status"][i] != "ok" else "unsafe key")
                continue
            try:
                data = batch["latent"][i]
                if data is None:
                    raise ValueError("no latent bytes")
                if batch["codec"][i] == "original":
                    img = decode.decode_image(bytes(data)).pixels
                else:
                    img = self.engine.decompress(bytes(data))
                storage.write_bytes(storage.join(self.out, rel), encode_image(np.ascontiguousarray(img),
                                                                                EncodeOptions(self.fmt)))
                status.append("ok")
                error.append(None)
            except Exception as e:
                status.append("error")
                error.append(f"{type(e).__name__}: {e}")
        return {"key": batch["key"], "status": objects(status), "error": objects(error)}
