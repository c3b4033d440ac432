"""``aejob train codec``: rate–distortion training of the variable-rate codecs (``--model``
factorized-codec, hyperprior-codec or checkerboard-codec; ``--init-from`` starts one from
another's transforms).

One run trains every quality level: each batch holds crops at all qualities (stratified: the
qualities of a batch are a shuffled cycle over 1..N), and each sample's loss is
``λ_q·255²·MSE + bpp`` with the λ of its quality, where bpp is the (noisy-latent) estimate of
the entropy models (the latent's and, for the hyperprior, the side latent's). Like
``jobs/train.py``, the loop runs in-process (``--workers 0``) or under Ray Train's
TorchTrainer (DDP); only rank 0 evaluates and writes checkpoints.

Held-out evaluation codes center crops of photos 041–049 into real bitstreams (integer tables
rebuilt from the current density) and logs bytes-based bpp and PSNR per quality. Every
checkpoint carries its integer entropy tables, so any of them can be loaded by ``CodecEngine``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
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
    PatchSampler,
    launch,
    optim_tensors,
    restore_optim,
    start_model,
    training_data,
    worker_context,
)
from models import checkpoint, registry
from models.codec import FactorizedCodec
from models.data import load_rgb, photo_split
from models.hyperprior import HyperpriorCodec
from models.metrics import psnr_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecTrainConfig(BaseTrainConfig):
    model: str = "factorized-codec"
    steps: int = 40000
    lr: float = 5e-4  # 2e-3 diverged in smoke runs; 1e-3 was fastest over the first 200 steps
    eval_every: int = 1000
    save_every: int = 500
    warmup: int = 200
    entropy_lr_mult: float = 10.0  # learning-rate factor for the densities and gain vectors
    batch: int = 12  # a multiple of the number of qualities keeps every batch balanced
    crop: int = 128
    clip_grad: float = 1.0
    eval_limit: int = 0  # evaluate on the first N held-out photos only (0: all)
    init_from: str = ""  # start a fresh model from another codec checkpoint's transforms
    # Only the entropy models (h_a, h_s, densities) learn for the first N steps: a new
    # hyperprior learns the latents of an --init-from codec before the transforms and gains move
    # (unfrozen at step 0 they are knocked far off by the rates of a random hyper-synthesis).
    freeze_steps: int = 0
    # With --init-from into a model with more latent channels: the new channels' rate counts
    # from 0 up to fully over the first N steps, so the synthesis learns to use them before the
    # rate term can prune them (counted from the start they are switched off within 1k steps).
    rate_ramp_steps: int = 0
    # Learning-rate factor of a context model (ctx, ep): it starts from scratch beside trained
    # transforms and hyperprior, which a high learning rate only knocks off their optimum.
    context_lr_mult: float = 1.0
    # "rd": rate–distortion training. "post": train only the decoder post-filter of a codec
    # whose other weights are kept (from --init-from), on what the decoder really sees
    # (rounded latents), for the mean PSNR over the qualities; rates are unchanged.
    stage: str = "rd"

    def __post_init__(self) -> None:
        if self.stage not in ("rd", "post"):
            raise ValueError(f"stage must be 'rd' or 'post', not {self.stage!r}")


def holdout_crops(data: str, crop: int, limit: int = 0) -> list[np.ndarray]:
    """Center crops (uint8 HxWx3) of the held-out photos 041–049."""
    files = photo_split(data, "holdout")
    if limit:
        files = files[:limit]
    out = []
    for p in files:
        img = load_rgb(p)
        h, w = img.shape[:2]
        c = min(crop, h, w)
        y, x = (h - c) // 2, (w - c) // 2
        out.append(img[y : y + c, x : x + c].copy())
    return out


def evaluate(model: FactorizedCodec, crops: list[np.ndarray]) -> dict[str, Any]:
    """Real bitstreams: per quality, mean bpp (from bytes) and mean PSNR over ``crops``."""
    was_training = model.training
    model.eval()
    model.update_tables()
    per_q = []
    for q in range(1, model.config.num_qualities + 1):
        bpps, psnrs = [], []
        for img in crops:
            data = model.compress(img, q)
            rec = model.decompress(data)
            bpps.append(len(data) * 8 / (img.shape[0] * img.shape[1]))
            psnrs.append(psnr_uint8(rec, img))
        per_q.append({"quality": q, "bpp": round(float(np.mean(bpps)), 4),
                      "psnr": round(float(np.mean(psnrs)), 3)})
    model.train(was_training)
    return {"per_quality": per_q}


def _distortion_and_rate(model: torch.nn.Module, x: torch.Tensor, quality: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(MSE per sample, bits per element of each likelihood, bpp per sample in full)."""
    out = model(x, quality)
    h, w = x.shape[-2:]
    mse = ((out["x_hat"] - x) ** 2).mean(dim=(1, 2, 3))
    bits = {k: -torch.log2(lik) for k, lik in out["likelihoods"].items()}
    bpp = torch.stack([b.sum(dim=(1, 2, 3)) for b in bits.values()]).sum(0) / (h * w)
    return mse, bits, bpp


def post_loss(model: torch.nn.Module, x: torch.Tensor, quality: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over the batch of the post-filtered output's MSE in dB (every quality counts alike
    in PSNR); also (mse, bpp) per sample, as :func:`rd_loss`."""
    mse, _, bpp = _distortion_and_rate(model, x, quality)
    return (10 * torch.log10(mse.clamp_min(1e-10))).mean(), mse.detach(), bpp.detach()


def rd_loss(
    model: torch.nn.Module, x: torch.Tensor, quality: torch.Tensor, lambdas: torch.Tensor,
    y_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over the batch of λ_q·255²·MSE + bpp; also returns (mse, bpp) per sample (bpp
    in full). ``y_weight`` (M,) weighs each latent channel's bits in the loss."""
    mse, bits, bpp = _distortion_and_rate(model, x, quality)
    h, w = x.shape[-2:]
    rate = bpp
    if y_weight is not None:
        rate = bpp - ((1 - y_weight)[None, :, None, None] * bits["y"]).sum(dim=(1, 2, 3)) / (h * w)
    loss = (lambdas[quality - 1] * 255**2 * mse + rate).mean()
    return loss, mse.detach(), bpp.detach()


@functools.lru_cache(maxsize=4)
def _latent_channels(ref: str) -> int:
    return int(checkpoint.read_meta(ref)["config"]["latent_channels"])


def new_channel_weights(model: FactorizedCodec, cfg: CodecTrainConfig, step: int) -> torch.Tensor | None:
    """Per-channel rate weights during ``cfg.rate_ramp_steps``: 1 for the channels the
    ``--init-from`` codec had, step/ramp for those added by widening; None when all count fully."""
    if not cfg.rate_ramp_steps or not cfg.init_from or step >= cfg.rate_ramp_steps:
        return None
    m_src = _latent_channels(cfg.init_from)
    weight = torch.ones(model.config.latent_channels)
    weight[m_src:] = step / cfg.rate_ramp_steps
    return weight


def param_groups(model: FactorizedCodec, cfg: CodecTrainConfig) -> list[dict[str, Any]]:
    """Transforms at ``lr``; the small density MLPs and the gain vectors learn faster (they
    must move far from their initialisation, and Adam's steps are ~lr in parameter units).
    ``freeze`` marks what stays fixed for ``cfg.freeze_steps``. (Parameter order is that of
    earlier releases — transforms, gains, densities — so their optimizer states still load.)"""
    gains = [model.log_gain, model.log_inv_gain]
    density = list(model.density.parameters())
    hyper = [p for name in ("h_a", "h_s") if hasattr(model, name)
             for p in getattr(model, name).parameters()]
    context = [p for name in ("ctx", "ep") if hasattr(model, name)
               for p in getattr(model, name).parameters()]
    other = {id(p) for p in (*gains, *density, *hyper, *context)}
    transforms = [p for p in model.parameters() if id(p) not in other]
    groups = [
        {"params": transforms, "lr_mult": 1.0, "freeze": True},
        {"params": hyper, "lr_mult": 1.0, "freeze": False},
        {"params": gains, "lr_mult": cfg.entropy_lr_mult, "freeze": True},
        {"params": density, "lr_mult": cfg.entropy_lr_mult, "freeze": False},
        {"params": context, "lr_mult": cfg.context_lr_mult, "freeze": False},
    ]
    return [g for g in groups if g["params"]]


def group_lr(group: dict[str, Any], lr: float, step: int, cfg: CodecTrainConfig) -> float:
    """A group's learning rate at ``step``: 0 while frozen, then ramped up over ``warmup``."""
    if not group["freeze"] or step >= cfg.freeze_steps + cfg.warmup or not cfg.freeze_steps:
        return lr * group["lr_mult"]
    if step < cfg.freeze_steps:
        return 0.0
    return lr * group["lr_mult"] * (step - cfg.freeze_steps + 1) / cfg.warmup


def init_from(model: FactorizedCodec, ref: str) -> list[str]:
    """Start ``model`` from codec checkpoint ``ref``: copy every tensor whose name and shape
    match (e.g. a factorized codec's transforms into a hyperprior one; a hyperprior's side
    density too), and widen those that grew (more latent channels, see :func:`widen`). Gain
    vectors are interpolated over log λ when the two ladders differ (extrapolated at the ends),
    so each new rate point starts near the old one with the closest λ. Returns the copied names."""
    src = checkpoint.load(ref)
    if not isinstance(src.model, FactorizedCodec):
        raise SystemExit(f"{ref} is not a codec checkpoint")
    theirs = src.model.state_dict()
    ours = model.state_dict()
    # the densities model different latents unless both have a hyperprior (or neither has)
    same_kind = isinstance(src.model, HyperpriorCodec) == isinstance(model, HyperpriorCodec)
    take = {k: v for k, v in theirs.items()
            if k in ours and v.shape == ours[k].shape and (same_kind or not k.startswith("density."))}
    if tuple(src.config.lambdas) != tuple(model.config.lambdas):
        lam_src = np.log(np.asarray(src.config.lambdas))
        lam_dst = np.log(np.asarray(model.config.lambdas))
        # piecewise linear in log λ; beyond the ends, the end segments continued
        i = np.clip(np.searchsorted(lam_src, lam_dst) - 1, 0, len(lam_src) - 2)
        t = ((lam_dst - lam_src[i]) / (lam_src[i + 1] - lam_src[i]))[:, None]
        for key in ("log_gain", "log_inv_gain"):
            g = theirs[key].double().numpy()  # (Q_src, M)
            theirs[key] = torch.from_numpy(g[i] + t * (g[i + 1] - g[i])).float()
            if theirs[key].shape == ours[key].shape:
                take[key] = theirs[key]
    take.update(widen(model, theirs, set(take)))
    model.load_state_dict(take, strict=False)
    log.info("initialised %d tensors from %s", len(take), ref)
    return sorted(take)


def widen(model: FactorizedCodec, theirs: dict[str, torch.Tensor], done: set[str]) -> dict[str, torch.Tensor]:
    """Tensors of ``model`` grown from smaller ones in ``theirs`` (Net2Net-style, same depth,
    more channels) so that the widened model reconstructs what the old one did: new input
    channels of a layer get zero weights; new output channels keep their fresh initialisation,
    so the new latent channels carry random features of the usual size and the zero weights
    reading them get gradients at once. (Started small — near-zero latents at the smallest
    coding scale, free — they stayed unused: moving off 0 costs bits before it buys quality.)
    The hyper-synthesis' last layer holds (mean, log-scale) halves, each widened in place; new
    channels start at mean 0 and the old channels' average scale. New gain columns start at
    each quality's average gain; the rate term then turns them down where they don't pay."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    last_hs = getattr(model, "h_s", [None])[-1]
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            continue
        key = f"{name}.weight"
        if key in done or key not in theirs:
            continue
        old, new = theirs[key], ours[key].clone()
        if old.dim() != new.dim() or any(a > b for a, b in zip(old.shape, new.shape, strict=True)):
            continue
        o_dim, i_dim = (1, 0) if isinstance(mod, torch.nn.ConvTranspose2d) else (0, 1)
        new.narrow(i_dim, old.shape[i_dim], new.shape[i_dim] - old.shape[i_dim]).zero_()
        bias = ours[f"{name}.bias"].clone()
        old_bias = theirs[f"{name}.bias"]
        # (source rows, destination rows) of the output channels kept
        if mod is last_hs:
            h_old, h_new = old.shape[o_dim] // 2, new.shape[o_dim] // 2
            new.zero_()
            bias[:h_new] = 0.0
            bias[h_new:] = old_bias[h_old:].mean()
            spans = [(slice(0, h_old), slice(0, h_old)), (slice(h_old, 2 * h_old), slice(h_new, h_new + h_old))]
        else:
            n = old.shape[o_dim]
            spans = [(slice(0, n), slice(0, n))]
        n_in = old.shape[i_dim]
        for src, dst in spans:
            if o_dim == 0:
                new[dst, :n_in] = old[src]
            else:
                new[:n_in, dst] = old[:, src]
            bias[dst] = old_bias[src]
        out[key], out[f"{name}.bias"] = new, bias
    for key in ("log_gain", "log_inv_gain"):
        old, new = theirs[key], ours[key]
        if key not in done and old.shape[0] == new.shape[0] and old.shape[1] < new.shape[1]:
            grown = old.mean(dim=1, keepdim=True).repeat(1, new.shape[1])
            grown[:, : old.shape[1]] = old
            out[key] = grown
    return out


def train_loop(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    cfg = CodecTrainConfig(**cfg_dict)
    rank, world, in_ray = worker_context()
    if in_ray:
        import ray.train
        import ray.train.torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    files = photo_split(cfg.data, "train")
    if cfg.limit_images:
        files = files[: cfg.limit_images]
    if not files:
        raise SystemExit(f"no training photos (001–040) in {cfg.data}")
    images = [load_rgb(p) for p in files]
    eval_crops = holdout_crops(cfg.data, cfg.eval_crop, cfg.eval_limit) if rank == 0 else []

    start = start_model(cfg, init_seed=cfg.seed)  # same init on every rank
    model, config, step, curve, history_minutes = (start.model, start.config, start.step, start.curve,
                                                   start.history_minutes)
    if not isinstance(model, FactorizedCodec):
        raise SystemExit(f"{cfg.model} is not a codec model")
    if cfg.init_from and not cfg.resume:
        init_from(model, cfg.init_from)
    # channels-last: PyTorch's CPU convolutions train faster in it (small preset, 2 threads: 0.37 → 0.29 s/step)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # Data and noise streams continue (differently) after a resume instead of repeating.
    torch.manual_seed(cfg.seed * 7919 + rank * 104729 + step)
    sampler = PatchSampler(images, seed=(cfg.seed * 1000 + rank) * 1_000_003 + step)
    qrng = np.random.default_rng((cfg.seed + 17) * 1000 + rank + step)
    post_only = cfg.stage == "post"
    if post_only:
        if model.post is None:
            raise SystemExit("--stage post needs a model with a post-filter (a preset with post_channels)")
        model.requires_grad_(False)
        model.post.requires_grad_(True)
        groups = [{"params": list(model.post.parameters()), "lr_mult": 1.0, "freeze": False}]
    else:
        groups = param_groups(model, cfg)
    model.train(not post_only)  # the post stage sees rounded latents, as the decoder does
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    restored = bool(cfg.resume) and restore_optim(opt, start.optim)
    if restored:
        log.info("optimizer state restored")
    lr_at = LRSchedule(cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup, cfg.max_minutes, step,
                       rewarm=bool(cfg.resume) and not restored)
    ddp_model: torch.nn.Module = model
    if in_ray and world > 1:
        ddp_model = ray.train.torch.prepare_model(model)
    nq = config.num_qualities
    lambdas = torch.tensor(config.lambdas, dtype=torch.float32)

    t0 = time.time()
    stats: dict[str, list[float]] = {"loss": [], "bpp": [], "psnr": []}

    def minutes() -> float:
        return round(history_minutes + (time.time() - t0) / 60, 2)

    def save(tag: str, release: bool = False) -> None:
        m = model
        if release:  # tables for exactly the weights the float16 file holds
            m = registry.build(cfg.model, config)  # type: ignore[assignment]
            m.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        m.eval()
        m.update_tables()
        model.train(not post_only)
        meta = {
            "kind": "codec",
            "steps": step,
            "train_minutes": minutes(),
            "train_config": dataclasses.asdict(cfg),
            "training_data": training_data(cfg.data, files),
            "qualities": list(range(1, nq + 1)),
            "metrics": {"holdout": curve[-1].get("holdout") if curve else None},
            "curve": curve,
        }
        # a release stores the float weights only: its integer networks are rebuilt from them
        # exactly on load (half the size of storing both)
        extra = m.coding_tensors(integer_networks=not release)
        if not release:
            extra.update(optim_tensors(opt))
        target = Path(cfg.release) if release else out / tag
        checkpoint.save(target, cfg.model, config, m, meta,
                        dtype=torch.float16 if release else None, extra_tensors=extra)

    def record() -> None:
        point: dict[str, Any] = {
            "step": step, "minutes": minutes(), "lr": lr_at(step),
            **{k: round(float(np.mean(v)), 4) if v else None for k, v in stats.items()},
        }
        for v in stats.values():
            v.clear()
        if rank == 0:
            point["holdout"] = evaluate(model, eval_crops)["per_quality"] if eval_crops else []
            curve.append(point)
            log.info("step %d %s", step, json.dumps(point))
        if in_ray:
            ray.train.report({k: v for k, v in point.items() if k != "holdout"})

    def set_frozen(frozen: bool) -> None:  # frozen weights need no gradients: faster steps
        for g in opt.param_groups:
            if g["freeze"]:
                for p in g["params"]:
                    p.requires_grad_(not frozen)

    if step < cfg.freeze_steps:
        set_frozen(True)
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    bad_steps = 0
    while step < cfg.steps and time.time() < deadline:
        if step == cfg.freeze_steps and cfg.freeze_steps:
            set_frozen(False)
        x = sampler.batch(cfg.crop, cfg.batch).contiguous(memory_format=torch.channels_last)
        quality = torch.from_numpy(qrng.permutation(np.arange(cfg.batch) % nq) + 1)
        for g in opt.param_groups:
            g["lr"] = group_lr(g, lr_at(step), step, cfg)
        if post_only:
            loss, mse, bpp = post_loss(ddp_model, x, quality)
        else:
            loss, mse, bpp = rd_loss(ddp_model, x, quality, lambdas, new_channel_weights(model, cfg, step))
        if not torch.isfinite(loss) and world == 1:  # skip the batch, keep the weights
            bad_steps += 1
            log.warning("step %d: non-finite loss, batch skipped (%d so far)", step, bad_steps)
            if bad_steps > 20:
                raise FloatingPointError("training diverged: more than 20 non-finite losses")
            step += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        stats["loss"].append(float(loss.detach()))
        stats["bpp"].append(float(bpp.mean()))
        stats["psnr"].append(float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()))
        step += 1
        if step % cfg.eval_every == 0:
            record()
        if rank == 0 and step % cfg.save_every == 0:
            save("last")
    if rank == 0:
        if not curve or curve[-1]["step"] != step:
            record()
        save("last")
        if cfg.release:
            save("release", release=True)
    return {"steps": step, "curve": curve}


def run(cfg: CodecTrainConfig, workers: int, use_gpu: bool = False) -> dict[str, Any]:
    """Train in-process (workers=0) or on Ray Train with ``workers`` DDP workers."""
    return launch(train_loop, cfg, workers, use_gpu, name="train-codec")


def register(train_app: typer.Typer) -> None:
    """Add ``aejob train codec`` to the ``train`` sub-command group."""

    @train_app.command("codec")
    def train_codec(
        data: Annotated[
            Path, typer.Option(help="Folder of training photos (001–040 are used).")
        ],
        out: Annotated[
            Path, typer.Option(help="Run folder for checkpoints and the curve.")
        ] = Path("runs/codec"),
        model: Annotated[
            str, typer.Option(help="Codec architecture: factorized-codec, hyperprior-codec or "
                              "checkerboard-codec.")
        ] = "factorized-codec",
        preset: Annotated[
            str, typer.Option(help="Model size, a preset of --model (e.g. tiny, small, base; wide and "
                              "wide-post for the hyperprior and checkerboard codecs).")
        ] = "base",
        steps: Annotated[
            int, typer.Option(help="Total optimizer steps (cosine schedule length).")
        ] = 40000,
        lr: Annotated[
            float, typer.Option(help="Peak learning rate.")
        ] = 5e-4,
        batch: Annotated[
            int, typer.Option(help="Crops per batch (best a multiple of the number of qualities).")
        ] = 12,
        crop: Annotated[
            int, typer.Option(help="Crop size in pixels (a multiple of 16).")
        ] = 128,
        seed: Annotated[
            int, typer.Option(help="Seed for crops, noise and init.")
        ] = 0,
        threads: Annotated[
            int, typer.Option(help="torch threads per worker (0: default).")
        ] = 0,
        workers: Annotated[
            int, typer.Option(help="Ray Train workers; 0 trains in this process.")
        ] = 0,
        gpu: Annotated[
            bool, typer.Option(help="One GPU per Ray Train worker.")
        ] = False,
        resume: Annotated[
            Path | None, typer.Option(help="Checkpoint to resume from.")
        ] = None,
        release: Annotated[
            Path | None, typer.Option(help="Also write a float16 release checkpoint here.")
        ] = None,
        max_minutes: Annotated[
            float, typer.Option(help="Stop (and save) after this many minutes.")
        ] = 0.0,
        eval_every: Annotated[
            int, typer.Option(help="Steps between held-out evaluations.")
        ] = 1000,
        save_every: Annotated[
            int, typer.Option(help="Steps between checkpoints.")
        ] = 500,
        limit_images: Annotated[
            int, typer.Option(help="Use only the first N training photos (tests).")
        ] = 0,
        init: Annotated[
            Path | None, typer.Option(
                "--init-from", help="Start from another codec checkpoint's transforms (matching "
                "tensors; gains interpolated over λ).")
        ] = None,
        warmup: Annotated[
            int, typer.Option(help="Learning-rate warmup steps.")
        ] = 200,
        freeze_steps: Annotated[
            int, typer.Option(help="Train only the entropy models for the first N steps (with --init-from).")
        ] = 0,
        rate_ramp_steps: Annotated[
            int, typer.Option(help="With --init-from into more latent channels: ramp the new channels' "
                              "rate in over the first N steps.")
        ] = 0,
        context_lr_mult: Annotated[
            float, typer.Option(help="Learning-rate factor of a checkerboard context model (ctx, ep).")
        ] = 1.0,
        stage: Annotated[
            str, typer.Option(help="rd: rate–distortion training; post: only the decoder post-filter "
                              "(of a preset with one), the rest kept from --init-from.")
        ] = "rd",
    ) -> None:
        """Train the variable-rate factorized-prior codec (all quality levels in one model)."""
        cfg = CodecTrainConfig(
            data=str(data), out=str(out), model=model, preset=preset, steps=steps, lr=lr, batch=batch,
            crop=crop, seed=seed, threads=threads, resume=str(resume or ""),
            release=str(release or ""), max_minutes=max_minutes, eval_every=eval_every,
            save_every=save_every, limit_images=limit_images, init_from=str(init or ""),
            warmup=warmup, freeze_steps=freeze_steps, rate_ramp_steps=rate_ramp_steps,
            context_lr_mult=context_lr_mult, stage=stage,
        )
        result = run(cfg, workers=workers, use_gpu=gpu)
        typer.echo(f"done: {result.get('steps', '')} steps; checkpoints in {out}")
