"""``aejob compress`` / ``aejob decompress``: learned archive compression through the same
Ray Data pipeline as ``aejob clean``, latent bitstreams stored in Parquet.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from models import checkpoint
from models.metrics import psnr_uint8
from pipeline import decode, runner, storage
from pipeline.batch import normalize, objects
from pipeline.infer import ok_rows, pixels_of

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
DEFAULT_CODEC = "codec-ctx"  # also the default of `aejob compress --checkpoint` (jobs/cli.py)


def compress_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("latent", pa.large_binary()),
        ("bpp", pa.float64()),
        ("psnr", pa.float64()),
        ("codec", pa.string()),
        ("note", pa.string()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        ("embedding", pa.list_(pa.float32(), embedding_dim)),
        ("embedding_model", pa.string()),
        ("model", pa.string()),
        ("checkpoint_sha256", pa.string()),
    ])


@dataclass(frozen=True)
class CompressConfig(runner.JobConfig):
    quality: int | None = None  # None: the checkpoint's default rate point
    checkpoint: str = DEFAULT_CODEC
    keep_if_smaller: bool = False


def prepare_batch(batch: Batch, options: decode.DecodeOptions, keep_source: bool) -> Batch:
    batch = normalize(batch)
    src = batch["data"].copy() if keep_source else None
    out = normalize(decode.decode_batch(batch, options))
    if src is not None:
        out["source_data"] = src
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """A stored row says inf for a lossless copy (never a made-up finite cap)."""
    return psnr_uint8(a, b, identical=float("inf"))


class CompressActor:
    """Loads the codec once; compresses decoded rows and measures what a user keeps (PSNR)."""

    def __init__(self, checkpoint_ref: str, quality: int | None, keep_if_smaller: bool,
                 threads: int = 0, device: str = "auto", batch_size: int = 1) -> None:
        from models.codec import CodecEngine

        del batch_size  # images are coded one at a time (each has its own size)
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        # The codec runs on CPU: entropy coding is CPU-bound and must be bit-exact anyway.
        del device
        self.engine = CodecEngine(checkpoint_ref, threads=threads, device="cpu")
        self.quality = quality if quality is not None else self.engine.default_quality
        self.keep_if_smaller = keep_if_smaller
        self.embedding_model = f"{self.engine.name}:latent-avg:{self.engine.sha256[:12]}"

    def __call__(self, batch: Batch) -> Batch:
        batch = normalize(batch)
        n = len(batch["key"])
        latent: list[object] = [None] * n
        bpp = np.full(n, np.nan)
        psnr = np.full(n, np.nan)
        codec: list[object] = [None] * n
        emb: list[object] = [None] * n
        status, error = batch["status"].copy(), batch["error"].copy()
        for i in ok_rows(batch):
            img = pixels_of(batch, i)
            try:
                data = self.engine.compress(img, self.quality)
                decoded = self.engine.decompress(data)
                src = batch["source_data"][i] if "source_data" in batch else None
                if self.keep_if_smaller and src is not None and len(src) <= len(data):
                    latent[i], codec[i], psnr[i] = bytes(src), "original", float("inf")
                else:
                    latent[i], codec[i], psnr[i] = data, "aejob", _psnr(decoded, img)
                bpp[i] = len(latent[i]) * 8 / (img.shape[0] * img.shape[1])  # type: ignore[arg-type]
                emb[i] = self.engine.embed(img).astype(np.float32).tobytes()
            except Exception as e:  # one image's failure is its row's error
                status[i], error[i] = "error", f"compress failed: {type(e).__name__}: {e}"
        out = {k: v for k, v in batch.items() if k not in ("pixels", "exif", "source_data")}
        out.update(
            latent=objects(latent), bpp=bpp, psnr=psnr, codec=objects(codec), embedding=objects(emb),
            embedding_model=objects([self.embedding_model if e is not None else None for e in emb]),
            model=objects([self.engine.name] * n), checkpoint_sha256=objects([self.engine.sha256] * n),
            status=status, error=error,
        )
        return out


def passthrough(batch: Batch) -> Batch:
    return normalize(batch)


def build_spec(cfg: CompressConfig, ray_opts: runner.RayOptions) -> runner.JobSpec:
    ck_path = checkpoint.resolve(cfg.checkpoint)
    meta = checkpoint.read_meta(ck_path)
    qualities = list(range(1, len(meta["config"]["lambdas"]) + 1))
    quality = cfg.quality if cfg.quality is not None else int(meta["config"]["default_quality"])
    if quality not in qualities:
        raise ValueError(f"--quality must be one of {qualities[0]}..{qualities[-1]} for this codec")
    fingerprint: dict[str, Any] = {
        "job": "compress", "quality": quality, "model": meta["name"], "checkpoint_sha256": meta["sha256"],
        "keep_if_smaller": cfg.keep_if_smaller, "image_column": cfg.image_column, "max_pixels": cfg.max_pixels,
    }
    dim = int(meta["config"]["latent_channels"])
    return runner.JobSpec(
        job="compress", src=cfg.src, dst=cfg.dst, schema=compress_schema(dim), fingerprint=fingerprint,
        prepare=partial(prepare_batch, options=decode.DecodeOptions(max_pixels=cfg.max_pixels),
                        keep_source=cfg.keep_if_smaller),
        actor_cls=CompressActor,
        actor_kwargs={"checkpoint_ref": str(ck_path), "quality": quality, "keep_if_smaller": cfg.keep_if_smaller,
                      "device": cfg.device},
        post=passthrough, image_column=cfg.image_column, shard_size=cfg.shard_size,
        max_error_rate=cfg.max_error_rate, limit=cfg.limit, overwrite=cfg.overwrite, ray=ray_opts,
        model_info={"name": meta["name"], "checkpoint": ck_path.name, "sha256": meta["sha256"],
                    "quality": quality, "metrics": meta.get("metrics")},
        config={**asdict(cfg), "checkpoint": str(ck_path), "quality": quality},
    )


# ---- decompress ---------------------------------------------------------------------------


class DecompressActor:
    """Decodes latent bitstreams (or original bytes) and writes image files under ``out``."""

    def __init__(self, checkpoint_ref: str, out: str, names: Any, fmt: str = "png",
                 threads: int = 0) -> None:
        from models.codec import CodecEngine

        if not isinstance(names, dict):  # an ObjectRef: the map is stored once, not per actor
            import ray

            names = ray.get(names)

        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        self.engine = CodecEngine(checkpoint_ref, threads=threads, device="cpu")
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


def checkpoint_for(manifest: dict[str, Any], shas: set[str]) -> str:
    """The checkpoint that decodes a compressed DST: the one its manifest names when that file
    is still there with the recorded sha256, else a shipped checkpoint with a sha256 the rows
    carry (an archive outlives the install that wrote it), else the default codec."""
    recorded = (manifest.get("config") or {}).get("checkpoint")
    candidates = [recorded] if recorded else []
    candidates += [str(p) for sha in sorted(shas) for p in checkpoint.shipped_with_sha256(sha)]
    for ref in candidates:
        try:
            path = checkpoint.resolve(ref)
            if not shas or checkpoint.read_meta(path).get("sha256") in shas:
                return str(path)
        except checkpoint.CheckpointError:
            continue
    return DEFAULT_CODEC


def decompress(dst: str, out: str, fmt: str = "png", max_error_rate: float = 1.0,
               ray_opts: runner.RayOptions | None = None) -> dict[str, Any]:
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.encode import EXTENSIONS
    from pipeline.export import UnsafeKey, dataset, output_names, safe_relpath

    ray_opts = ray_opts or runner.RayOptions()
    meta_rows = dataset(dst).to_table(columns=["key", "status", "checkpoint_sha256"]).to_pylist()
    safe = []
    unsafe = []
    for r in meta_rows:
        try:
            safe_relpath(r["key"])
            safe.append(r["key"])
        except UnsafeKey:
            unsafe.append(r["key"])
    names = output_names(safe, EXTENSIONS.get(fmt, ".png"))
    shas = {r["checkpoint_sha256"] for r in meta_rows if r["checkpoint_sha256"]}
    manifest = runner.read_json_safe(storage.join(dst, "_manifest.json")) or {}
    ck_ref = checkpoint_for(manifest, shas)
    runner.init_ray(ray_opts.address)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 2))
    cpus, threads = runner.actor_resources(ray_opts, cluster_cpus)
    fs, path = storage.resolve(dst)
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["key", "status", "error", "latent", "codec"])
    ds = ds.map_batches(
        DecompressActor, fn_constructor_kwargs={"checkpoint_ref": ck_ref, "out": out, "names": ray.put(names),
                                                "fmt": fmt, "threads": threads},
        compute=ActorPoolStrategy(min_size=ray_opts.num_actors, max_size=ray_opts.num_actors),
        batch_size=4, batch_format="numpy", num_cpus=cpus,
    )
    counts = {"ok": 0, "error": 0, "skipped": 0, "unsafe_keys": len(unsafe)}
    errors: dict[str, str] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, s, e in zip(b["key"], b["status"], b["error"]):
            counts[str(s)] = counts.get(str(s), 0) + 1
            if s == "error":
                errors[str(k)] = str(e)
    total = counts["ok"] + counts["error"]
    failed = max_error_rate < 1.0 and total > 0 and counts["error"] / total > max_error_rate
    report = {"dst": dst, "out": out, "format": fmt, "counts": counts, "errors": errors,
              "checkpoints": sorted(shas), "status": "failed" if failed else "succeeded",
              "reason": f"error rate {counts['error']}/{total} exceeds --max-error-rate {max_error_rate}"
              if failed else None}
    storage.write_bytes(storage.join(out, "_aejob_decompress.json"),
                        json.dumps(report, indent=2).encode())
    return report
