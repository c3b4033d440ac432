"""``aejob train denoiser``: residual U-Net training on random photo patches.

The loop (``train_loop``) is one function that runs either under Ray Train's TorchTrainer
(``--workers N``: DDP over N CPU/GPU workers on a cluster) or in-process (``--workers 0``, for
quick local runs and tests). Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.training import (
    BaseTrainConfig,
    LRSchedule,
    PatchSampler,
    launch,
    optim_tensors,
    restore_optim,
    start_model,
    training_data,
    worker_context,
)
from models import checkpoint
from models.data import load_rgb, photo_split
from models.noise import add_awgn_uint8, degrade

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig(BaseTrainConfig):
    model: str = "resunet-denoiser"
    pixels_per_batch: int = 32 * 64 * 64  # batch size scales with the patch size
    patch_sizes: tuple[int, ...] = (64, 96, 128)
    sigma_max: float = 55.0
    extra: dict[str, Any] = field(default_factory=dict)


def holdout_set(data: str, crop: int, sigma: float = 25.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Center crops of the held-out photos with fixed-seed clipped AWGN: (noisy, clean)."""
    pairs = []
    for i, p in enumerate(photo_split(data, "holdout")):
        img = load_rgb(p)
        h, w = img.shape[:2]
        c = min(crop, h, w) // 8 * 8
        y, x = (h - c) // 2, (w - c) // 2
        clean = img[y : y + c, x : x + c]
        noisy = add_awgn_uint8(clean, sigma, seed=1000 + i)
        t = lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255  # noqa: E731
        pairs.append((t(noisy), t(clean)))
    return pairs


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a8 = torch.round(a.clamp(0, 1) * 255)
    b8 = torch.round(b.clamp(0, 1) * 255)
    mse = float(((a8 - b8) ** 2).mean())
    return 99.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def evaluate(model: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.inference_mode():
        vals = [psnr(model(noisy), clean) for noisy, clean in pairs]
    model.train()
    return float(np.mean(vals)) if vals else float("nan")


def train_loop(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    cfg = TrainConfig(**{**cfg_dict, "patch_sizes": tuple(cfg_dict["patch_sizes"])})
    rank, world, in_ray = worker_context()
    if in_ray:
        import ray.train
        import ray.train.torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    files = photo_split(cfg.data, "train")
    if cfg.limit_images:
        files = files[: cfg.limit_images]
    if not files:
        raise SystemExit(f"no training photos (001–040) in {cfg.data}")
    images = [load_rgb(p) for p in files]
    sampler = PatchSampler(images, seed=cfg.seed * 1000 + rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
    eval_pairs = holdout_set(cfg.data, cfg.eval_crop) if rank == 0 else []

    start = start_model(cfg)
    model, config, step, curve, history_minutes = (start.model, start.config, start.step, start.curve,
                                                   start.history_minutes)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    restored = bool(cfg.resume) and restore_optim(opt, start.optim)
    if restored:
        log.info("optimizer state restored")
    ddp_model: torch.nn.Module = model
    if in_ray and world > 1:
        ddp_model = ray.train.torch.prepare_model(model)

    t0 = time.time()
    losses: list[float] = []

    def save(tag: str, dtype: torch.dtype | None = None, path: Path | None = None) -> None:
        meta = {
            "kind": "denoiser",
            "steps": step,
            "train_minutes": history_minutes + (time.time() - t0) / 60,
            "train_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
            "training_data": training_data(cfg.data, files),
            "metrics": {"holdout_psnr_sigma25": curve[-1]["holdout_psnr"] if curve else None},
            "curve": curve,
        }
        target = path or out / tag
        extra = optim_tensors(opt) if dtype is None else None
        checkpoint.save(target, cfg.model, config, model, meta, dtype=dtype, extra_tensors=extra)

    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    lr_at = LRSchedule(cfg.lr, cfg.min_lr, cfg.steps, 100, cfg.max_minutes, step,
                       rewarm=bool(cfg.resume) and not restored)

    lr = cfg.lr
    while step < cfg.steps and time.time() < deadline:
        size = cfg.patch_sizes[step % len(cfg.patch_sizes)]
        n = max(1, cfg.pixels_per_batch // (size * size))
        clean = sampler.batch(size, n)
        noisy, cond = degrade(clean, gen, sigma_max=cfg.sigma_max)
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.l1_loss(ddp_model(noisy, cond), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            point = {
                "step": step,
                "minutes": round(history_minutes + (time.time() - t0) / 60, 2),
                "loss": round(float(np.mean(losses)), 5),
                "lr": lr,
            }
            losses = []
            if rank == 0:
                point["holdout_psnr"] = round(evaluate(model, eval_pairs), 3)
                curve.append(point)
                log.info("step %d %s", step, json.dumps(point))
            if in_ray:
                ray.train.report(point)
        if rank == 0 and step % cfg.save_every == 0:
            save("last")
    if rank == 0:
        if not curve or curve[-1]["step"] != step:
            point = {"step": step, "minutes": round(history_minutes + (time.time() - t0) / 60, 2),
                     "loss": round(float(np.mean(losses)) if losses else float("nan"), 5),
                     "holdout_psnr": round(evaluate(model, eval_pairs), 3)}
            curve.append(point)
        save("last")
        if cfg.release:
            save("release", dtype=torch.float16, path=Path(cfg.release))
    return {"steps": step, "curve": curve}


def run(cfg: TrainConfig, workers: int, use_gpu: bool = False) -> dict[str, Any]:
    """Train in-process (workers=0) or on Ray Train with ``workers`` DDP workers."""
    return launch(train_loop, cfg, workers, use_gpu, name="train")

