"""What every ``aejob train`` job shares: launching (in-process or Ray Train) and optimizer state
in safetensors (so a resumed run continues Adam's moments, without pickles)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaseTrainConfig:
    """What both ``aejob train`` jobs take; each job adds its own fields and defaults."""

    data: str
    out: str
    model: str = ""
    preset: str = "base"
    steps: int = 6000
    lr: float = 1e-3
    min_lr: float = 1e-5
    seed: int = 0
    threads: int = 0  # 0: torch default
    eval_every: int = 250
    save_every: int = 250
    max_minutes: float = 0.0  # 0: no wall-clock limit
    resume: str = ""
    release: str = ""  # also write a float16 release checkpoint here at the end
    limit_images: int = 0  # tests: use only the first N training photos
    eval_crop: int = 256


@dataclasses.dataclass
class Start:
    """Where a training run starts: a fresh model, or a checkpoint's weights and history."""

    model: Any
    config: Any
    step: int = 0
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    history_minutes: float = 0.0
    optim: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # Adam's saved state


def start_model(cfg: BaseTrainConfig, init_seed: int | None = None) -> Start:
    """``cfg.resume``'s model with its step, curve and minutes, or a fresh ``cfg.model`` of
    ``cfg.preset`` (initialised from ``init_seed`` when given: the same on every rank)."""
    from models import checkpoint, registry

    if cfg.resume:
        ck = checkpoint.load(cfg.resume)
        log.info("resumed %s at step %d", cfg.resume, int(ck.meta.get("steps", 0)))
        return Start(ck.model, ck.config, int(ck.meta.get("steps", 0)), list(ck.meta.get("curve", [])),
                     float(ck.meta.get("train_minutes", 0.0)), ck.meta.get("_extra_tensors", {}))
    if init_seed is not None:
        torch.manual_seed(init_seed)
    config = registry.make_config(cfg.model, cfg.preset)
    return Start(registry.build(cfg.model, config), config)


def training_data(data: str, files: list[Any]) -> dict[str, Any]:
    """The training record's data section: folder name, the photos used, the held-out ones."""
    from models.data import photo_split

    return {"folder": os.path.basename(os.path.normpath(data)), "files": [p.name for p in files],
            "holdout": [p.name for p in photo_split(data, "holdout")]}


def cosine_lr(step: int, lr: float, min_lr: float, steps: int, warmup: int = 100,
              time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``min_lr``; progress is the larger of step progress
    and ``time_frac`` (the share of a wall-clock budget used, so decay ends by a deadline)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, max((step - warmup) / max(1, steps - warmup), time_frac))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


class LRSchedule:
    """The learning rate of both training loops: ``cosine_lr`` over ``steps``.

    With ``max_minutes`` the progress is also driven by this run's wall clock (mapped onto the
    part of the schedule a resumed run has left), so on a busy machine the decay still ends by
    the deadline instead of being cut off at a high rate. A run resumed without Adam's moments
    (a float16 release has none) warms up again: Adam's first steps move every weight by about
    ``lr``, which would knock a trained model off its optimum.
    """

    def __init__(self, lr: float, min_lr: float, steps: int, warmup: int, max_minutes: float = 0.0,
                 start_step: int = 0, rewarm: bool = False) -> None:
        self.lr, self.min_lr, self.steps, self.warmup = lr, min_lr, steps, warmup
        self.max_minutes, self.start_step, self.rewarm = max_minutes, start_step, rewarm
        self.t0 = time.time()

    def time_frac(self, now: float | None = None) -> float:
        if not self.max_minutes:
            return 0.0
        s0, w = self.start_step, self.warmup
        done = (s0 - w) / max(1, self.steps - w) if s0 > w else 0.0
        used = ((time.time() if now is None else now) - self.t0) / (self.max_minutes * 60)
        return done + (1 - done) * min(1.0, used)

    def __call__(self, step: int, now: float | None = None) -> float:
        lr = cosine_lr(step, self.lr, self.min_lr, self.steps, self.warmup, self.time_frac(now))
        since = step - self.start_step
        if self.rewarm and self.start_step >= self.warmup and since < self.warmup:
            lr *= (since + 1) / self.warmup
        return lr


class PatchSampler:
    """Random crops with 90° rotations and flips from images held in memory (tiny images are
    reflect-padded up to the crop size)."""

    def __init__(self, images: list[np.ndarray], seed: int) -> None:
        self.images = images
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, n: int) -> torch.Tensor:
        out = np.empty((n, size, size, 3), np.uint8)
        for i in range(n):
            img = self.images[self.rng.integers(len(self.images))]
            h, w = img.shape[:2]
            if h < size or w < size:
                img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), "reflect")
                h, w = img.shape[:2]
            y, x = self.rng.integers(0, h - size + 1), self.rng.integers(0, w - size + 1)
            p = np.rot90(img[y : y + size, x : x + size], int(self.rng.integers(4)))
            if self.rng.random() < 0.5:
                p = p[:, ::-1]
            out[i] = p
        return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def worker_context() -> tuple[int, int, bool]:
    """(rank, world size, under Ray Train?) of the calling training loop."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), True
    except Exception:  # not inside a Ray Train worker: a plain in-process run
        return 0, 1, False


def optim_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_optim(opt: torch.optim.Optimizer, extras: dict[str, torch.Tensor]) -> bool:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in extras.items():
        if not k.startswith("opt."):
            continue
        _, i, name = k.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    if not state:
        return False
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return True


def launch(
    train_loop: Callable[[dict[str, Any]], dict[str, Any]],
    cfg: Any,
    workers: int,
    use_gpu: bool = False,
    name: str = "train",
) -> dict[str, Any]:
    """Run ``train_loop(config dict)`` in this process (workers=0) or on Ray Train's
    TorchTrainer with ``workers`` DDP workers (the same loop scales to a cluster)."""
    if "CBSD68" in os.path.abspath(cfg.data):
        raise SystemExit("CBSD68 is for evaluation only: never train on it")
    cfg_dict = dataclasses.asdict(cfg)
    for key in ("data", "out", "resume", "release", "init_from"):
        if cfg_dict.get(key):
            cfg_dict[key] = os.path.abspath(cfg_dict[key])
    if workers <= 0:
        return train_loop(cfg_dict)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        train_loop,  # type: ignore[arg-type]  # its return value is for in-process runs
        train_loop_config=cfg_dict,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": max(1, cfg.threads or 1)}
        ),
        run_config=RunConfig(storage_path=os.path.join(cfg_dict["out"], "ray"), name=name),
    )
    result = trainer.fit()
    return {"metrics": result.metrics}
