"""``aejob compress`` / ``aejob decompress``: learned archive compression through the same
Ray Data pipeline as ``aejob clean``, latent bitstreams stored in Parquet.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from models import avif, checkpoint
from pipeline import actors, decode, runner, schemas, stages, storage

log = logging.getLogger(__name__)

DEFAULT_CODEC = "codec-avif"  # also the default of `aejob compress --checkpoint` (jobs/cli.py)


@dataclass(frozen=True)
class CompressConfig(runner.JobConfig):
    quality: int | None = None  # None: the checkpoint's default rate point (or rate control)
    target_psnr: float | None = None  # rate control: smallest rung reaching this PSNR, per image
    max_bpp: float | None = None  # rate control: highest rung within this many bits per pixel
    checkpoint: str = DEFAULT_CODEC
    avif_speed: int | None = None  # AVIF-based codecs: libavif's encoder speed (None: the checkpoint's)
    keep_if_smaller: bool = False
    embedder: str = "embedder-base"  # copy-detection embedder for the `embedding` column (as clean)
    regions: bool = True  # also the vectors of 5 half-area windows (as clean)


def build_spec(cfg: CompressConfig, ray_opts: runner.RayOptions) -> runner.JobSpec:
    ck_path = checkpoint.resolve(cfg.checkpoint)
    meta = checkpoint.read_meta(ck_path)
    # the rungs: one per λ of a learned codec, one per libavif quality of avif-restore-codec
    rungs = meta["config"].get("lambdas") or meta["config"].get("avif_qualities") or []
    qualities = list(range(1, len(rungs) + 1))
    rate_control = rate_control_settings(cfg)
    quality: int | None = None
    if cfg.avif_speed is not None:
        if "avif_qualities" not in meta["config"]:
            raise ValueError("--avif-speed applies to AVIF-based codecs (codec-avif) only")
        avif.check_speed(cfg.avif_speed)
    if rate_control is None:
        quality = cfg.quality if cfg.quality is not None else int(meta["config"]["default_quality"])
        if quality not in qualities:
            raise ValueError(f"--quality must be one of {qualities[0]}..{qualities[-1]} for this codec")
    fingerprint: dict[str, Any] = {
        "job": "compress", "quality": quality, "model": meta["name"], "checkpoint_sha256": meta["sha256"],
        "keep_if_smaller": cfg.keep_if_smaller, "image_column": cfg.image_column, "max_pixels": cfg.max_pixels,
    }
    if rate_control is not None:  # only then: a fixed-quality DST keeps the fingerprint it always had
        fingerprint["rate_control"] = rate_control
    emb_path, emb_id, dim = schemas.embedding_info(cfg.embedder)
    fingerprint["embedding_model"] = emb_id
    return runner.JobSpec(
        job="compress", config=cfg, schema=schemas.compress_schema(dim), fingerprint=fingerprint,
        prepare=partial(stages.compress_prepare, options=decode.DecodeOptions(max_pixels=cfg.max_pixels),
                        keep_source=cfg.keep_if_smaller),
        actor_cls=actors.CompressActor,
        actor_kwargs={"checkpoint_ref": str(ck_path), "quality": quality, "keep_if_smaller": cfg.keep_if_smaller,
                      "device": cfg.device, "embedder": emb_path, "target_psnr": cfg.target_psnr,
                      "max_bpp": cfg.max_bpp, "avif_speed": cfg.avif_speed, "regions": cfg.regions},
        post=stages.passthrough, ray=ray_opts,
        probe=partial(probe, str(ck_path), quality, cfg.target_psnr, cfg.max_bpp, cfg.avif_speed),
        model_info={"name": meta["name"], "checkpoint": ck_path.name, "sha256": meta["sha256"],
                    "quality": quality, "qualities": qualities, "rate_control": rate_control,
                    "metrics": meta.get("metrics")},
        resolved={**asdict(cfg), "checkpoint": str(ck_path), "quality": quality, "rate_control": rate_control},
    )


def rate_control_settings(cfg: CompressConfig) -> dict[str, Any] | None:
    """The run's rate control (validated), or None for a fixed quality."""
    if cfg.target_psnr is None and cfg.max_bpp is None:
        return None
    if cfg.quality is not None:
        raise ValueError("--quality fixes the rung: it cannot go with --target-psnr or --max-bpp")
    for opt, v in (("--target-psnr", cfg.target_psnr), ("--max-bpp", cfg.max_bpp)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{opt} must be a positive number, got {v}")
    mode = "target_psnr+max_bpp" if cfg.target_psnr is not None and cfg.max_bpp is not None else (
        "target_psnr" if cfg.target_psnr is not None else "max_bpp")
    return {"mode": mode, "target_psnr": cfg.target_psnr, "max_bpp": cfg.max_bpp,
            "rule": RATE_CONTROL_RULES[mode], "search": "binary search over the quality rungs, per image"}


RATE_CONTROL_RULES = {
    "target_psnr": "smallest quality whose decoded image reaches target_psnr dB (none: the top quality)",
    "max_bpp": "highest quality whose stream is at most max_bpp bits per pixel (none: the lowest quality)",
    "target_psnr+max_bpp": "smallest quality reaching target_psnr among those within max_bpp "
                           "(none: the highest within max_bpp; none within: the lowest quality)",
}


def probe(checkpoint_ref: str, quality: int | None, target_psnr: float | None, max_bpp: float | None,
          avif_speed: int | None, threads: int) -> float:
    """Images/s of one codec actor on a 768x512 image: encode + the decode that measures PSNR,
    and with rate control every rung its search tries."""
    import time

    from models.codec import CodecEngine

    y, x = np.mgrid[0:512, 0:768]
    img = np.stack([(x % 256), (y % 256), ((x + y) % 256)], -1).astype(np.uint8)
    eng = CodecEngine(checkpoint_ref, threads=threads, avif_speed=avif_speed)
    t = time.perf_counter()
    eng.compress_controlled(img, quality, target_psnr, max_bpp)
    return 1.0 / (time.perf_counter() - t)


# ---- decompress ---------------------------------------------------------------------------


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
    ap = runner.actor_plan(ray_opts, *runner.cluster_resources())
    fs, path = storage.resolve(dst)
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["key", "status", "error", "latent", "codec"])
    ds = ds.map_batches(
        actors.DecompressActor,
        fn_constructor_kwargs={"checkpoint_ref": ck_ref, "out": out, "names": ray.put(names), "fmt": fmt,
                               "threads": ap.threads, "actor_cpus": ap.cpus, "pool_max": ap.max_size},
        compute=ActorPoolStrategy(min_size=ap.min_size, max_size=ap.max_size),
        batch_size=4, batch_format="numpy", num_cpus=ap.cpus,
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
