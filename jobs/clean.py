"""``aejob clean``: denoise every image of SRC into a Parquet dataset at DST."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from models import checkpoint
from pipeline import actors, decode, encode, infer, ort_engine, runner, schemas, stages


@dataclass(frozen=True)
class CleanConfig(runner.JobConfig):
    format: str = "png"
    quality: int | None = None
    sigma: float | str | None = None  # None: auto (estimated per image); "blind"; or a level
    checkpoint: str = infer.DEFAULT_DENOISER
    tile: int = 512
    ensemble: int = 1  # rotated/mirrored views averaged per tile (1, 2, 4, 8)
    embedder: str = "embedder-base"  # copy-detection embedder for the `embedding` column
    regions: bool = True  # also the vectors of 5 half-area windows (`region_embeddings`, finds crops)


def build_spec(cfg: CleanConfig, ray_opts: runner.RayOptions) -> runner.JobSpec:
    ck_path = checkpoint.resolve(cfg.checkpoint)
    meta = checkpoint.read_meta(ck_path)
    enc = encode.EncodeOptions(cfg.format, cfg.quality)
    fingerprint: dict[str, Any] = {
        "job": "clean",
        "format": cfg.format,
        "quality": enc.resolved_quality(),
        "sigma": "auto" if cfg.sigma is None else cfg.sigma if isinstance(cfg.sigma, str) else float(cfg.sigma),
        "model": meta["name"],
        "checkpoint_sha256": meta["sha256"],
        "image_column": cfg.image_column,
        "max_pixels": cfg.max_pixels,
    }
    if cfg.ensemble != 1:  # only then: datasets made before the option still resume
        fingerprint["ensemble"] = cfg.ensemble
    emb_path, emb_id, dim = schemas.embedding_info(cfg.embedder)
    fingerprint["embedding_model"] = emb_id  # an index never mixes two vector spaces
    return runner.JobSpec(
        job="clean",
        config=cfg,
        schema=schemas.clean_schema(dim),
        fingerprint=fingerprint,
        prepare=partial(stages.clean_prepare, options=decode.DecodeOptions(max_pixels=cfg.max_pixels)),
        actor_cls=actors.DenoiseActor,
        actor_kwargs={"checkpoint_ref": str(ck_path), "sigma": cfg.sigma, "device": cfg.device,
                      "tile": cfg.tile, "ensemble": cfg.ensemble, "embedder": emb_path,
                      "regions": cfg.regions},
        post=partial(encode.encode_batch, options=enc),
        probe=partial(probe, str(ck_path), cfg.ensemble, emb_path, cfg.regions),
        ray=ray_opts,
        actor_calls=actor_calls(str(ck_path), emb_path, cfg.device, ray_opts.num_gpus),
        model_info={"name": meta["name"], "checkpoint": ck_path.name, "sha256": meta["sha256"],
                    "steps": meta.get("steps"), "metrics": meta.get("metrics")},
        resolved={**asdict(cfg), "checkpoint": str(ck_path), "quality": enc.resolved_quality()},
    )


ORT_CALLS = 2  # concurrent model calls per CPU actor on the ORT engine (see actors.DenoiseActor)


def actor_calls(checkpoint_ref: str, embedder: str, device: str, num_gpus: float) -> int:
    """Model calls a denoise actor runs at once: two on CPU with the ORT engine (its threads split
    between them), one on a GPU or with the torch engine (one batch fills the device)."""
    return ORT_CALLS if not num_gpus and ort_engine.onnx_ready(checkpoint_ref, embedder, device) else 1


def probe(checkpoint_ref: str, ensemble: int, embedder: str, regions: bool, threads: int) -> float:
    """Images/s of one denoise actor on a 768x512 photo-like image (for --dry-run's estimate)."""
    import time

    from models.noise import add_awgn_uint8
    from pipeline.noise_level import estimate_sigma

    rng = np.random.default_rng(0)
    img = add_awgn_uint8(np.repeat(np.linspace(0, 255, 768, dtype=np.uint8)[None, :, None], 512, 0)
                         .repeat(3, 2), 15.0, seed=int(rng.integers(1 << 16)))
    from pipeline.ort_engine import denoise_engine

    eng = denoise_engine(checkpoint_ref, device="cpu", threads=threads, ensemble=ensemble, embedder=embedder)
    eng.denoise_one(img[:64, :64])  # warm-up
    t = time.perf_counter()
    eng.vectors(eng.clean([img], sigma=estimate_sigma(img)), regions)  # what the actor does per image
    encode.encode_image(img, encode.EncodeOptions("png"))
    return 1.0 / (time.perf_counter() - t)
