"""``aejob train restore``: train the restoration filter of ``avif-restore-codec`` (models/restore.py).

Data: every training photo (001–040 of ``--data``, plus ``--extra-data`` whole) is AV1-coded
once per rung at the model's pinned libavif settings, whole (the filter learns the artifacts of
real full-image encodes, not of crops); the AVIF files are cached under ``OUT/avif/`` so a
resumed run does not encode again. Batches are crops at even offsets (the 2x2 phase of 4:2:0
chroma and of the filter's pixel-unshuffle stays put; no flips or rotations for the same
reason) of (decoded, original) pairs, rungs stratified over each batch; the loss is the mean
over the batch of each crop's MSE in dB, so every rung counts alike.

Held-out evaluation goes through the real codec path (AV1 encode of a center crop of each of
photos 041–049, filter, per-channel strengths fitted by the encoder) and logs, per rung, bpp
and PSNR of plain AVIF and of the restored decode.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from jobs.training import (
    BaseTrainConfig,
    LRSchedule,
    launch,
    optim_tensors,
    restore_optim,
    start_model,
    training_data,
    worker_context,
)
from models import avif, checkpoint
from models.data import list_images, load_rgb, photo_split
from models.metrics import psnr_uint8
from models.restore import NAME, AvifRestoreCodec, RestoreCodecConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreTrainConfig(BaseTrainConfig):
    model: str = NAME
    steps: int = 20000
    lr: float = 1e-3
    eval_every: int = 500
    save_every: int = 250
    warmup: int = 100
    batch: int = 16
    crop: int = 128
    clip_grad: float = 1.0
    eval_crop: int = 384
    extra_data: str = ""  # a second folder of training photos, used whole (photos-extra)
    device: str = "cpu"  # where the filter trains: cpu, cuda, or auto (cuda when there is one)
    processes: int = 0  # AV1 coding processes for the training set (0: one per CPU)
    # libavif speed recorded in the release's config (0: the model's own). An encoder-only
    # setting: the training set stays coded at the model's speed (AV1's tools and artifacts are
    # the same at every speed; a lower speed searches them harder) and any decoder reads both.
    release_speed: int = 0


def train_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return dev


def _code_rungs(job: tuple[str, str, tuple[int, ...], avif.AvifSettings]) -> list[np.ndarray]:
    """One photo AV1-coded at every rung (cached files reused): its decoded images."""
    path, cache, qualities, settings = job
    p = Path(path)
    speed, subsampling = settings.speed, settings.subsampling
    tune = f".{settings.tune}" if settings.tune else ""
    img: np.ndarray | None = None
    out = []
    for q in qualities:
        f = Path(cache) / f"{p.parent.name}-{p.stem}.q{q}.s{speed}.{subsampling.replace(':', '')}{tune}.avif"
        if not f.exists():
            img = load_rgb(p) if img is None else img
            tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
            tmp.write_bytes(avif.encode(img, q, settings))
            tmp.replace(f)
        out.append(avif.decode(f.read_bytes(), settings))
    return out


def coded_pairs(files: list[Path], config: RestoreCodecConfig, cache: Path,
                processes: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(originals, decoded[image][rung]) for ``files``; AVIF files cached in ``cache``. Photos
    are coded in ``processes`` worker processes, one libavif thread each (a whole photo per
    process scales better than libavif's own threads on small images)."""
    cache.mkdir(parents=True, exist_ok=True)
    settings = avif.AvifSettings(config.speed, config.subsampling, threads=1, tune=config.tune)
    jobs = [(str(p), str(cache), config.avif_qualities, settings) for p in files]
    t0 = time.time()
    decoded: list[list[np.ndarray]] = []
    with concurrent.futures.ProcessPoolExecutor(max(1, processes)) as pool:
        for i, rungs in enumerate(pool.map(_code_rungs, jobs)):
            decoded.append(rungs)
            if (i + 1) % 10 == 0:
                log.info("AV1-coded %d/%d training photos (%.0f s)", i + 1, len(files), time.time() - t0)
    return [load_rgb(p) for p in files], decoded


class PairSampler:
    """Crops at even offsets of (decoded at a rung, original), the rungs of a batch a shuffled
    cycle over all of them. The images live on ``device`` as uint8 (on a GPU the crops are cut
    there: no host copies per step)."""

    def __init__(self, originals: list[np.ndarray], decoded: list[list[np.ndarray]], seed: int,
                 device: torch.device | str = "cpu") -> None:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).permute(2, 0, 1).to(device)

        self.device = torch.device(device)
        self.originals = [t(a) for a in originals]
        self.decoded = [[t(a) for a in rungs] for rungs in decoded]
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, n: int, rungs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.rng.permutation(np.arange(n) % rungs)
        base, orig = [], []
        for i in range(n):
            k = int(self.rng.integers(len(self.originals)))
            img = self.originals[k]
            h, w = img.shape[1:]
            y = 2 * int(self.rng.integers(0, (h - size) // 2 + 1))
            x = 2 * int(self.rng.integers(0, (w - size) // 2 + 1))
            orig.append(img[:, y : y + size, x : x + size])
            base.append(self.decoded[k][q[i]][:, y : y + size, x : x + size])

        def f(crops: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(crops).float().div_(255).contiguous(memory_format=torch.channels_last)

        return f(base), f(orig), torch.from_numpy(q).to(self.device)


def evaluate(model: AvifRestoreCodec, crops: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per rung over ``crops``: bpp, PSNR of plain AVIF, PSNR of the codec's real decode."""
    was = model.training
    model.eval()
    out = []
    settings = model.settings()
    for q in range(1, model.config.num_qualities + 1):
        bpps, base_db, ours_db = [], [], []
        for img in crops:
            data = model.compress(img, q)
            base = avif.decode(model.parse(data)[2], settings)
            bpps.append(len(data) * 8 / (img.shape[0] * img.shape[1]))
            base_db.append(psnr_uint8(base, img))
            ours_db.append(psnr_uint8(model.decompress(data), img))
        out.append({"quality": q, "bpp": round(float(np.mean(bpps)), 4), "psnr_avif": round(float(np.mean(base_db)), 3),
                    "psnr": round(float(np.mean(ours_db)), 3),
                    "gain_db": round(float(np.mean(ours_db) - np.mean(base_db)), 3)})
    model.train(was)
    return out


def holdout_crops(data: str, crop: int) -> list[np.ndarray]:
    out = []
    for p in photo_split(data, "holdout"):
        img = load_rgb(p)
        h, w = img.shape[:2]
        c = min(crop, h, w) // 2 * 2
        y, x = (h - c) // 4 * 2, (w - c) // 4 * 2
        out.append(img[y : y + c, x : x + c].copy())
    return out


def train_loop(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    cfg = RestoreTrainConfig(**cfg_dict)
    rank, world, in_ray = worker_context()
    if in_ray:
        import ray.train
        import ray.train.torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = photo_split(cfg.data, "train")
    if cfg.extra_data:
        files += list_images(cfg.extra_data)
    if cfg.limit_images:
        files = files[: cfg.limit_images]
    if not files:
        raise SystemExit(f"no training photos (001–040) in {cfg.data}")

    start = start_model(cfg, init_seed=cfg.seed)
    model, config, step, curve = start.model, start.config, start.step, start.curve
    if not isinstance(model, AvifRestoreCodec):
        raise SystemExit(f"{cfg.model} is not {NAME}")
    device = train_device(cfg.device)
    originals, decoded = coded_pairs(files, config, out / "avif", cfg.processes or os.cpu_count() or 1)
    eval_crops = holdout_crops(cfg.data, cfg.eval_crop) if rank == 0 else []
    model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest conv kernels once
    sampler = PairSampler(originals, decoded, seed=(cfg.seed * 1000 + rank) * 1_000_003 + step, device=device)
    del originals, decoded
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    restored = bool(cfg.resume) and restore_optim(opt, start.optim)
    lr_at = LRSchedule(cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup, cfg.max_minutes, step,
                       rewarm=bool(cfg.resume) and not restored)
    ddp_model: torch.nn.Module = model
    if in_ray and world > 1:
        ddp_model = ray.train.torch.prepare_model(model)
    t0 = time.time()
    losses: list[float] = []

    def minutes() -> float:
        return round(start.history_minutes + (time.time() - t0) / 60, 2)

    def save(release: bool = False) -> None:
        avif_meta = model.settings(threads=2).describe(config.avif_qualities)
        target = Path(cfg.release) if release else out / "last"
        shipped = config
        if release and cfg.release_speed:
            shipped = dataclasses.replace(config, speed=cfg.release_speed)
            avif_meta.update(speed=cfg.release_speed, training_set_speed=config.speed)
        meta = {
            "kind": "codec", "steps": step, "train_minutes": minutes(),
            "train_config": dataclasses.asdict(cfg),
            "training_data": {**training_data(cfg.data, files), "files": [f"{p.parent.name}/{p.name}" for p in files]},
            "qualities": list(range(1, config.num_qualities + 1)),
            "avif": avif_meta,
            "metrics": {"holdout": curve[-1].get("holdout") if curve else None},
            "curve": curve,
        }
        checkpoint.save(target, NAME, shipped, model, meta, dtype=torch.float16 if release else None,
                        extra_tensors=None if release else optim_tensors(opt))

    def record() -> None:
        point: dict[str, Any] = {"step": step, "minutes": minutes(), "lr": lr_at(step),
                                 "loss_db": round(float(np.mean(losses)), 4) if losses else None}
        losses.clear()
        if rank == 0:
            # through the real (CPU) codec path, on a copy when the filter trains elsewhere
            on_cpu = model if device.type == "cpu" else copy.deepcopy(model).cpu()
            point["holdout"] = evaluate(on_cpu, eval_crops) if eval_crops else []
            curve.append(point)
            log.info("step %d %s", step, json.dumps(point))
        if in_ray:
            ray.train.report({k: v for k, v in point.items() if k != "holdout"})

    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    while step < cfg.steps and time.time() < deadline:
        base, orig, q = sampler.batch(cfg.crop, cfg.batch, config.num_qualities)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        mse = ((ddp_model(base, q) - orig) ** 2).mean(dim=(1, 2, 3))
        loss = (10 * torch.log10(mse.clamp_min(1e-10))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % cfg.eval_every == 0:
            record()
        if rank == 0 and step % cfg.save_every == 0:
            save()
    if rank == 0:
        if not curve or curve[-1]["step"] != step:
            record()
        save()
        if cfg.release:
            save(release=True)
    return {"steps": step, "curve": curve}


def run(cfg: RestoreTrainConfig, workers: int, use_gpu: bool = False) -> dict[str, Any]:
    if cfg.extra_data and "CBSD68" in str(Path(cfg.extra_data).resolve()):
        raise SystemExit("CBSD68 is for evaluation only: never train on it")
    if cfg.extra_data:
        cfg = dataclasses.replace(cfg, extra_data=str(Path(cfg.extra_data).resolve()))
    avif.require()
    return launch(train_loop, cfg, workers, use_gpu, name="train-restore")


def register(train_app: typer.Typer) -> None:
    @train_app.command("restore")
    def train_restore(
        data: Annotated[Path, typer.Option(help="Folder of training photos (001–040 are used).")],
        extra_data: Annotated[Path | None, typer.Option(help="A second folder of training photos, used whole.")] = None,
        out: Annotated[Path, typer.Option(help="Run folder for checkpoints, the AVIF cache and the curve.")]
        = Path("runs/restore"),
        preset: Annotated[str, typer.Option(help="Filter size: a preset of avif-restore-codec (tiny, base).")] = "base",
        steps: Annotated[int, typer.Option(help="Total optimizer steps (cosine schedule length).")] = 20000,
        lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
        batch: Annotated[int, typer.Option(help="Crops per batch (best a multiple of the rungs).")] = 16,
        crop: Annotated[int, typer.Option(help="Crop size in pixels (even).")] = 128,
        seed: Annotated[int, typer.Option(help="Seed for crops and init.")] = 0,
        threads: Annotated[int, typer.Option(help="torch threads per worker (0: default).")] = 0,
        workers: Annotated[int, typer.Option(help="Ray Train workers; 0 trains in this process.")] = 0,
        resume: Annotated[Path | None, typer.Option(help="Checkpoint to resume from.")] = None,
        release: Annotated[Path | None, typer.Option(help="Also write a float16 release checkpoint here.")] = None,
        max_minutes: Annotated[float, typer.Option(help="Stop (and save) after this many minutes.")] = 0.0,
        eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations.")] = 500,
        save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 250,
        limit_images: Annotated[int, typer.Option(help="Use only the first N training photos (tests).")] = 0,
        eval_crop: Annotated[int, typer.Option(help="Side of the held-out center crops.")] = 384,
        device: Annotated[str, typer.Option(help="Where the filter trains: cpu, cuda, or auto.")] = "cpu",
        processes: Annotated[int, typer.Option(help="AV1 coding processes for the training set (0: one per CPU).")] = 0,
        release_speed: Annotated[int, typer.Option(help="libavif encoder speed (0..10) the release encodes with "
                                                   "(0: the model's; the training set keeps the model's).")] = 0,
    ) -> None:
        """Train the learned restoration filter of the AVIF-based codec (avif-restore-codec)."""
        if crop % 2:
            raise typer.BadParameter("--crop must be even")
        try:
            avif.check_speed(release_speed)
        except ValueError as e:
            raise typer.BadParameter(f"--release-speed: {e}") from None
        cfg = RestoreTrainConfig(
            data=str(data), out=str(out), preset=preset, steps=steps, lr=lr, batch=batch, crop=crop,
            seed=seed, threads=threads, resume=str(resume or ""), release=str(release or ""),
            max_minutes=max_minutes, eval_every=eval_every, save_every=save_every,
            limit_images=limit_images, eval_crop=eval_crop, extra_data=str(extra_data or ""),
            device=device, processes=processes, release_speed=release_speed,
        )
        result = run(cfg, workers=workers, use_gpu=workers > 0 and device != "cpu")
        typer.echo(f"done: {result.get('steps', '')} steps; checkpoints in {out}")
