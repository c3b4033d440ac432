"""``aejob train embedder``: contrastive training of the copy-detection embedder.

Each batch samples one region ("base") from each of B different photos (001–040 and
photos-extra, never the held-out 041–049 or CBSD68), plus a few second regions, not overlapping
the first, of photos already in the batch (hard negatives: same photo, different content). Each
base yields two views through the augmentations that define a copy: crops down to a third of the
area, rotations up to ±15° (black corners or cropped inside), flips, resizing 0.3–1.0, colour
jitter ±30%, blur, JPEG q20–90, Gaussian noise σ ≤ 25. The loss is InfoNCE over the 2B views
(every other view in the batch is a negative; photos are distinct, so no false negatives but
the deliberate same-photo ones, which are different content).

Like ``jobs/train.py`` the loop runs in-process (``--workers 0``) or under Ray Train's
TorchTrainer; only rank 0 evaluates and writes checkpoints. The held-out evaluation (recall@1 of
distorted held-out photos among training-photo tiles) is for monitoring only. At the end the
dedup threshold is calibrated on training photos (``calibrate``) and recorded in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image, ImageEnhance, ImageFilter

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
from models import checkpoint
from models.data import list_images, load_rgb, photo_split
from models.embedder import CopyEmbedder, prepare
from models.regions import REGIONS, RegionSpec

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1


@dataclass(frozen=True)
class EmbedderTrainConfig(BaseTrainConfig):
    model: str = "copy-embedder"
    extra_data: str = ""  # a second folder of training photos, used whole (photos-extra)
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    batch: int = 64  # bases per batch (2 views each)
    hard_negatives: int = 12  # of those, second regions of photos already in the batch
    crop: int = 112  # training view size
    base: int = 160  # shorter side of a base region before its views are cut
    temperature: float = 0.07
    eval_every: int = 200
    save_every: int = 200
    photo_side: int = 640  # photos are held downscaled to this longer side
    aug_threads: int = 2


# ------------------------------------------------------------------------------- augmentations
def _rotate(im: Image.Image, angle: float, inner: bool) -> Image.Image:
    """Rotate about the centre; ``inner`` crops the largest centred rectangle of the same aspect
    holding no fill, otherwise the corners are black (both are common for copies)."""
    out = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    if not inner:
        return out
    w, h = im.size
    a = np.deg2rad(abs(angle))
    k = 1.0 / (np.cos(a) + max(w / h, h / w) * np.sin(a))  # scale of the valid inner rectangle
    cw, ch = max(8, int(w * k)), max(8, int(h * k))
    x, y = (w - cw) // 2, (h - ch) // 2
    return out.crop((x, y, x + cw, y + ch))


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as j:
        return j.convert("RGB")


def random_crop_box(w: int, h: int, rng: np.random.Generator, area: tuple[float, float],
                    aspect: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    a = rng.uniform(*area) * w * h
    r = float(np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]))))
    cw = int(min(w, max(8, round(np.sqrt(a * r)))))
    ch = int(min(h, max(8, round(np.sqrt(a / r)))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    return x, y, x + cw, y + ch


def copy_view(base: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """One random copy of ``base`` as a uint8 size x size x 3 array."""
    im = base
    if rng.random() < 0.8:  # crops down to a third of the area (the bench goes to a half)
        im = im.crop(random_crop_box(*im.size, rng, (0.33, 1.0)))
    if rng.random() < 0.5:
        im = _rotate(im, float(rng.uniform(-15, 15)), inner=bool(rng.random() < 0.5))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:  # resized copies: detail lost at 0.3–1.0 of the size
        s = rng.uniform(0.3, 1.0)
        im = im.resize((max(8, int(im.width * s)), max(8, int(im.height * s))), Image.Resampling.BILINEAR)
    im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    if rng.random() < 0.8:
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.65, 1.35))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.05:
        im = im.convert("L").convert("RGB")
    if rng.random() < 0.25:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.5:
        im = _jpeg(im, int(rng.integers(20, 91)))
    arr = np.asarray(im, dtype=np.uint8)
    if rng.random() < 0.35:
        noisy = arr.astype(np.float32) + rng.normal(0, rng.uniform(2, 25), arr.shape).astype(np.float32)
        arr = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return arr


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class PairSampler:
    """Batches of (view A, view B) pairs: one base region per distinct photo, plus
    ``hard`` second regions of batch photos that do not overlap the first."""

    def __init__(self, photos: list[Image.Image], cfg: EmbedderTrainConfig, seed: int) -> None:
        self.photos, self.cfg = photos, cfg
        self.rng = np.random.default_rng(seed)
        self.pool = ThreadPoolExecutor(max(1, cfg.aug_threads))  # PIL releases the GIL

    def _base(self, photo: Image.Image, rng: np.random.Generator, avoid: Box | None) -> tuple[Image.Image, Box]:
        w, h = photo.size
        box = random_crop_box(w, h, rng, (0.12, 1.0 if avoid is None else 0.4), (0.6, 1.6))
        for _ in range(20):
            if avoid is None or not _overlaps(box, avoid):
                break
            box = random_crop_box(w, h, rng, (0.08, 0.3), (0.6, 1.6))
        im = photo.crop(box)
        s = self.cfg.base / min(im.size)
        return im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.Resampling.BILINEAR), box

    def _pair(self, photo_idx: int, seed: int, avoid: Box | None) -> tuple[np.ndarray, np.ndarray, Box]:
        rng = np.random.default_rng(seed)
        base, box = self._base(self.photos[photo_idx], rng, avoid)
        return copy_view(base, rng, self.cfg.crop), copy_view(base, rng, self.cfg.crop), box

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_hard = min(self.cfg.hard_negatives, self.cfg.batch // 2)
        n_main = min(self.cfg.batch - n_hard, len(self.photos))
        chosen = self.rng.choice(len(self.photos), size=n_main, replace=False)
        seeds = self.rng.integers(0, 2**63 - 1, size=n_main + n_hard)
        main = list(self.pool.map(lambda t: self._pair(int(t[0]), int(t[1]), None), zip(chosen, seeds[:n_main])))
        again: list[int] = self.rng.choice(n_main, size=n_hard, replace=False).tolist() if n_hard else []
        hard = list(self.pool.map(lambda t: self._pair(int(chosen[t[0]]), int(t[1]), main[t[0]][2]),
                                  zip(again, seeds[n_main:])))
        pairs = main + hard
        a = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float().div_(255)
        b = torch.from_numpy(np.stack([p[1] for p in pairs])).permute(0, 3, 1, 2).float().div_(255)
        return a, b


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE over 2B normalised views; returns (loss, in-batch top-1 accuracy)."""
    z = torch.cat([za, zb])
    n = za.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    loss = F.cross_entropy(sim, target)
    acc = float((sim.argmax(1) == target).float().mean())
    return loss, acc


# ------------------------------------------------------------------------------- evaluation
def load_photos(files: list[Path], side: int) -> list[Image.Image]:
    out = []
    for p in files:
        im = Image.fromarray(load_rgb(p))
        s = side / max(im.size)
        if s < 1:
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR, reducing_gap=None)
        out.append(im)
    return out


def embed_arrays(model: CopyEmbedder, images: list[np.ndarray], batch: int = 32) -> np.ndarray:
    """The engine's preprocessing (``prepare``) + the model, in eval mode, float32."""
    cfg = model.config
    return _embed_prepared(model, [prepare(im, cfg.input_size, cfg.max_aspect) for im in images], batch)


def embed_windows(model: CopyEmbedder, images: list[np.ndarray], spec: RegionSpec = REGIONS,
                  batch: int = 32) -> np.ndarray:
    """The engine's region vectors (``EmbedderEngine.embed_regions``): float32 [N, R, dim]."""
    cfg = model.config
    wins = []
    for im in images:
        p = prepare(im, spec.size, cfg.max_aspect)
        wins += [p[y : y + h, x : x + w] for y, x, h, w in spec.boxes(*p.shape[:2])]
    return _embed_prepared(model, wins, batch).reshape(len(images), spec.count, cfg.dim)


def _embed_prepared(model: CopyEmbedder, prepared: list[np.ndarray], batch: int) -> np.ndarray:
    cfg = model.config
    was = model.training
    model.eval()
    out = np.zeros((len(prepared), cfg.dim), np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault(p.shape, []).append(i)
    with torch.inference_mode():
        for idx in groups.values():
            for j in range(0, len(idx), batch):
                c = idx[j : j + batch]
                x = torch.from_numpy(np.stack([prepared[i] for i in c])).permute(0, 3, 1, 2).float().div_(255)
                out[c] = model(x).numpy()
    model.train(was)
    return out


def eval_set(holdout: list[Image.Image], train_photos: list[Image.Image], n_tiles: int = 300,
             seed: int = 1234) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(database, queries, true database index per query): held-out photos hidden among tiles of
    training photos; queries are hard copies of the held-out ones (crop to half, rotation 12°,
    noise σ 25, JPEG q25, and all four at once)."""
    rng = np.random.default_rng(seed)
    db = [np.asarray(im) for im in holdout]
    for _ in range(n_tiles):
        ph = train_photos[int(rng.integers(len(train_photos)))]
        db.append(np.asarray(ph.crop(random_crop_box(*ph.size, rng, (0.05, 0.5), (0.5, 2.0)))))
    queries, truth = [], []
    for i, im in enumerate(holdout):
        crop = im.crop(random_crop_box(*im.size, rng, (0.5, 0.5)))
        rot = _rotate(im, 12.0, inner=False)
        arr = np.asarray(im).astype(np.float32)
        noisy = Image.fromarray(np.clip(np.rint(arr + rng.normal(0, 25, arr.shape)), 0, 255).astype(np.uint8))
        jpg = _jpeg(im, 25)
        combo = _jpeg(_rotate(crop, 5.0, inner=False).resize((crop.width // 2, crop.height // 2)), 30)
        for q in (crop, rot, noisy, jpg, combo):
            queries.append(np.asarray(q))
            truth.append(i)
    return db, queries, truth


def evaluate(model: CopyEmbedder, data: tuple[list[np.ndarray], list[np.ndarray], list[int]]) -> dict[str, float]:
    db, queries, truth = data
    if not db or not queries:
        return {}
    d = embed_arrays(model, db)
    q = embed_arrays(model, queries)
    sims = q @ d.T
    order = np.argsort(-sims, axis=1)
    t = np.asarray(truth)
    pos = sims[np.arange(len(t)), t]
    return {"holdout_recall_at_1": round(float(np.mean(order[:, 0] == t)), 4),
            "holdout_pos_sim": round(float(np.mean(pos)), 4),
            "holdout_neg_max": round(float(np.mean(np.sort(sims, 1)[:, -2])), 4)}


def calibrate(model: CopyEmbedder, photos: list[Image.Image], n: int = 600, seed: int = 99) -> dict[str, Any]:
    """The dedup threshold, from training photos only: n crops (distinct photos cycle), each
    with one bench-like copy. Cross-photo pairs are negatives; the threshold is just above the
    largest of them (about 1 false pair in n²/2 pairs), and the copies' recall at it is recorded.
    ``dedup_threshold_regions``: the same for an index with region vectors (``models/regions.py``)."""
    rng = np.random.default_rng(seed)
    crops, copies, owner = [], [], []
    for i in range(n):
        k = i % len(photos)
        ph = photos[k]
        base = ph.crop(random_crop_box(*ph.size, rng, (0.2, 0.8), (0.6, 1.6)))
        crops.append(np.asarray(base))
        copies.append(copy_view(base, rng, max(64, min(base.size))))
        owner.append(k)
    e = embed_arrays(model, crops)
    c = embed_arrays(model, copies)
    own = np.asarray(owner)
    sims = e @ e.T
    neg = sims[own[:, None] != own[None, :]]
    pos = np.sum(e * c, axis=1)
    threshold = float(np.max(neg)) + 0.01
    # The same pairs scored as an index with region vectors scores them (pipeline.index): a pair
    # scores the max of either's full vector against the other's full and region vectors.
    e_all = np.concatenate([e[:, None], embed_windows(model, crops)], 1)  # [n, 1 + R, dim]
    c_all = np.concatenate([c[:, None], embed_windows(model, copies)], 1)
    directed = np.einsum("id,jrd->ijr", e, e_all).max(-1)
    neg_r = np.maximum(directed, directed.T)[own[:, None] != own[None, :]]
    pos_r = np.maximum(np.einsum("id,ird->ir", e, c_all).max(1), np.einsum("id,ird->ir", c, e_all).max(1))
    threshold_r = float(np.max(neg_r)) + 0.01
    return {"dedup_threshold": round(threshold, 4), "calib_neg_max": round(float(np.max(neg)), 4),
            "calib_neg_p9999": round(float(np.quantile(neg, 0.9999)), 4),
            "calib_pos_median": round(float(np.median(pos)), 4),
            "calib_pos_recall_at_threshold": round(float(np.mean(pos >= threshold)), 4),
            "calib_crops": n, "calib_negative_pairs": int(neg.size // 2),
            "dedup_threshold_regions": round(threshold_r, 4), "calib_regions_neg_max": round(float(np.max(neg_r)), 4),
            "calib_regions_neg_p9999": round(float(np.quantile(neg_r, 0.9999)), 4),
            "calib_regions_pos_median": round(float(np.median(pos_r)), 4),
            "calib_regions_pos_recall_at_threshold": round(float(np.mean(pos_r >= threshold_r)), 4),
            "calib_regions_layout": REGIONS.layout_id()}


# ------------------------------------------------------------------------------- loop
def training_files(cfg: EmbedderTrainConfig) -> list[Path]:
    files = photo_split(cfg.data, "train")
    if cfg.extra_data:
        files += list_images(cfg.extra_data)
    if cfg.limit_images:
        files = files[: cfg.limit_images]
    if any("CBSD68" in str(p) for p in files):
        raise SystemExit("CBSD68 is for evaluation only: never train on it")
    return files


def train_loop(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    cfg = EmbedderTrainConfig(**cfg_dict)
    rank, world, in_ray = worker_context()
    if in_ray and not logging.getLogger().handlers:  # a Ray Train worker: keep the progress lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if in_ray:
        import ray.train
        import ray.train.torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = training_files(cfg)
    if len(files) < 2:
        raise SystemExit(f"need at least 2 training photos, found {len(files)}")
    photos = load_photos(files, cfg.photo_side)
    holdout = load_photos(photo_split(cfg.data, "holdout"), cfg.photo_side) if rank == 0 else []
    eval_data = eval_set(holdout, photos) if holdout else ([], [], [])

    start = start_model(cfg, init_seed=cfg.seed)
    model, config, step, curve, history_minutes = (start.model, start.config, start.step, start.curve,
                                                   start.history_minutes)
    if not isinstance(model, CopyEmbedder):
        raise SystemExit(f"{cfg.model} is not an embedder model")
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    # the data stream continues (differently) after a resume instead of repeating
    sampler = PairSampler(photos, cfg, seed=(cfg.seed * 1000 + rank) * 1_000_003 + step)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    restored = bool(cfg.resume) and restore_optim(opt, start.optim)
    lr_at = LRSchedule(cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup, cfg.max_minutes, step,
                       rewarm=bool(cfg.resume) and not restored)
    ddp_model: torch.nn.Module = model
    if in_ray and world > 1:
        ddp_model = ray.train.torch.prepare_model(model)

    t0 = time.time()
    stats: dict[str, list[float]] = {"loss": [], "acc": []}
    calib: dict[str, Any] = {}

    def minutes() -> float:
        return round(history_minutes + (time.time() - t0) / 60, 2)

    def save(release: bool = False) -> None:
        meta = {
            "kind": "embedder",
            "steps": step,
            "train_minutes": minutes(),
            "train_config": dataclasses.asdict(cfg),
            "training_data": {**training_data(cfg.data, files),
                              "extra_folder": Path(cfg.extra_data).name if cfg.extra_data else None},
            "metrics": {**({k: v for k, v in curve[-1].items() if k.startswith("holdout")} if curve else {}),
                        **calib},
            "dedup_threshold": calib.get("dedup_threshold"),
            # for indexes with region vectors (a pair scores its best window): calibrated alike
            "dedup_threshold_regions": calib.get("dedup_threshold_regions"),
            "curve": curve,
        }
        target = Path(cfg.release) if release else out / "last"
        checkpoint.save(target, cfg.model, config, model, meta, dtype=torch.float16 if release else None,
                        extra_tensors=None if release else optim_tensors(opt))

    def record() -> None:
        point: dict[str, Any] = {"step": step, "minutes": minutes(), "lr": round(lr_at(step), 6),
                                 **{k: round(float(np.mean(v)), 4) if v else None for k, v in stats.items()}}
        for v in stats.values():
            v.clear()
        if rank == 0:
            point.update(evaluate(model, eval_data))
            curve.append(point)
            log.info("step %d %s", step, json.dumps(point))
        if in_ray:
            ray.train.report({k: v for k, v in point.items()})

    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    while step < cfg.steps and time.time() < deadline:
        a, b = sampler.batch()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = torch.cat([a, b]).contiguous(memory_format=torch.channels_last)
        z = ddp_model(x)
        loss, acc = info_nce(z[: a.shape[0]], z[a.shape[0]:], cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        stats["loss"].append(float(loss.detach()))
        stats["acc"].append(acc)
        step += 1
        if step % cfg.eval_every == 0:
            record()
        if rank == 0 and step % cfg.save_every == 0:
            save()
    if rank == 0:
        if not curve or curve[-1]["step"] != step:
            record()
        calib.update(calibrate(model, photos))
        log.info("calibration %s", json.dumps(calib))
        save()
        if cfg.release:
            save(release=True)
    return {"steps": step, "curve": curve, "calibration": calib}


def run(cfg: EmbedderTrainConfig, workers: int, use_gpu: bool = False) -> dict[str, Any]:
    """Train in-process (workers=0) or on Ray Train with ``workers`` DDP workers."""
    if cfg.extra_data and "CBSD68" in str(Path(cfg.extra_data).resolve()):
        raise SystemExit("CBSD68 is for evaluation only: never train on it")
    if cfg.extra_data:
        cfg = dataclasses.replace(cfg, extra_data=str(Path(cfg.extra_data).resolve()))
    return launch(train_loop, cfg, workers, use_gpu, name="train-embedder")


def register(train_app: typer.Typer) -> None:
    """Add ``aejob train embedder`` to the ``train`` sub-command group."""

    @train_app.command("embedder")
    def train_embedder(
        data: Annotated[Path, typer.Option(help="Folder of numbered photos (001–040 train; 041–049 monitor only).")],
        extra_data: Annotated[Path | None, typer.Option(help="A second folder of training photos, used whole.")] = None,
        out: Annotated[Path, typer.Option(help="Run folder for checkpoints and the curve.")] = Path("runs/embedder"),
        preset: Annotated[str, typer.Option(help="Model size: tiny or base.")] = "base",
        steps: Annotated[int, typer.Option(help="Total optimizer steps (cosine schedule length).")] = 3000,
        lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-3,
        batch: Annotated[int, typer.Option(help="Base regions per batch (two views each).")] = 64,
        hard_negatives: Annotated[int, typer.Option(
            help="Of those, second regions of photos already in the batch.")] = 12,
        crop: Annotated[int, typer.Option(help="Training view size in pixels.")] = 112,
        temperature: Annotated[float, typer.Option(help="InfoNCE temperature.")] = 0.07,
        seed: Annotated[int, typer.Option(help="Seed for regions, augmentations and init.")] = 0,
        threads: Annotated[int, typer.Option(help="torch threads per worker (0: default).")] = 0,
        workers: Annotated[int, typer.Option(help="Ray Train workers; 0 trains in this process.")] = 1,
        gpu: Annotated[bool, typer.Option(help="One GPU per Ray Train worker.")] = False,
        resume: Annotated[Path | None, typer.Option(help="Checkpoint to resume from.")] = None,
        release: Annotated[Path | None, typer.Option(help="Also write a float16 release checkpoint here.")] = None,
        max_minutes: Annotated[float, typer.Option(help="Stop (and save) after this many minutes.")] = 0.0,
        eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations.")] = 200,
        save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
        limit_images: Annotated[int, typer.Option(help="Use only the first N training photos (tests).")] = 0,
    ) -> None:
        """Train the copy-detection embedder contrastively on copies of training photos."""
        cfg = EmbedderTrainConfig(
            data=str(data), extra_data=str(extra_data or ""), out=str(out), preset=preset, steps=steps, lr=lr,
            batch=batch, hard_negatives=hard_negatives, crop=crop, temperature=temperature, seed=seed,
            threads=threads, resume=str(resume or ""), release=str(release or ""), max_minutes=max_minutes,
            eval_every=eval_every, save_every=save_every, limit_images=limit_images,
        )
        result = run(cfg, workers=workers, use_gpu=gpu)
        steps_done = result.get("steps", (result.get("metrics") or {}).get("step", "?"))  # in-process / Ray Train
        typer.echo(f"done: {steps_done} steps; checkpoints in {out}")
