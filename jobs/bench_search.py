"""``aejob bench search``: copy detection of aejob's embedder against pHash and raw pixels.

Everything is measured in one run on the same images:

- **Targets**: the held-out photos 041–049 and the 68 CBSD68 images (never trained on).
- **Distractors**: ``--distractors`` random crops (5–60% of the area, aspect 1:2–2:1, resized to
  a longer side of 160–512 px) of the *training* photos 001–040 and photos-extra: other
  pictures than the targets, so none overlaps a target.
- **Queries**: every target under every distortion class (``CLASSES``), applied at full
  resolution; the database is targets + distractors, and recall@k is whether the query's target
  is among its k nearest. pHash (imagehash, 64 bits, Hamming distance) ranks ties by their
  expected position (random tie-breaking); the pixel baseline is a 16x16 grey thumbnail,
  mean-removed and normalised, compared by cosine.
- **Dedup**: ``pipeline.index.duplicate_groups`` at the embedder's calibrated threshold over
  targets + all their copies + distractors; pair precision/recall, where pairs of distractors
  cut from the same photo are left out (they may overlap: neither right nor wrong).
- **Latency**: the database's real embeddings padded to ``--pad-to`` vectors with samples of a
  Gaussian fitted to them (mean and covariance, normalised), written as a DST and indexed by
  ``aejob index --kind hnsw``'s code; top-10 per query one at a time (model time excluded),
  recall against exact search, build time and size of ``_index``.
- **Cost**: embedder ms per image next to the denoiser's on the same CBSD68 images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import typer
from PIL import Image, ImageEnhance
from tqdm import tqdm

from models.data import list_images, load_rgb, photo_split
from models.embedder import EmbedderEngine
from pipeline import index as vindex

log = logging.getLogger(__name__)

Distort = Callable[[Image.Image, np.random.Generator], Image.Image]


# ------------------------------------------------------------------------------- distortions
def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as j:
        return j.convert("RGB")


def _resize(im: Image.Image, s: float) -> Image.Image:
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BILINEAR)


def _crop(im: Image.Image, keep: float, rng: np.random.Generator) -> Image.Image:
    """Keep ``keep`` of the area, same aspect, at a random position."""
    s = float(np.sqrt(keep))
    w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
    x = int(rng.integers(0, im.width - w + 1))
    y = int(rng.integers(0, im.height - h + 1))
    return im.crop((x, y, x + w, y + h))


def _noise(im: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im).astype(np.float32) + rng.normal(0, sigma, (im.height, im.width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _bright(im: Image.Image, amount: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(im).enhance(1 + amount * (1 if rng.random() < 0.5 else -1))


def _rot(im: Image.Image, deg: float, rng: np.random.Generator) -> Image.Image:
    """Rotation about the centre, same size, black corners (either direction)."""
    return im.rotate(deg * (1 if rng.random() < 0.5 else -1), resample=Image.Resampling.BILINEAR,
                     fillcolor=(0, 0, 0))


CLASSES: dict[str, tuple[str, Distort]] = {
    "jpeg_q30": ("single", lambda im, r: _jpeg(im, 30)),
    "resize_50": ("single", lambda im, r: _resize(im, 0.5)),
    "crop_10": ("single", lambda im, r: _crop(im, 0.9, r)),
    "noise_15": ("single", lambda im, r: _noise(im, 15, r)),
    "bright_20": ("single", lambda im, r: _bright(im, 0.20, r)),
    "rot_5": ("single", lambda im, r: _rot(im, 5, r)),
    "crop_30": ("harder", lambda im, r: _crop(im, 0.7, r)),
    "crop_50": ("harder", lambda im, r: _crop(im, 0.5, r)),
    "noise_30": ("harder", lambda im, r: _noise(im, 30, r)),
    "bright_35": ("harder", lambda im, r: _bright(im, 0.35, r)),
    "rot_10": ("harder", lambda im, r: _rot(im, 10, r)),
    "rot_15": ("harder", lambda im, r: _rot(im, 15, r)),
    "jpeg_q20": ("harder", lambda im, r: _jpeg(im, 20)),
    "combo_crop20_resize50_jpeg30": ("combo", lambda im, r: _jpeg(_resize(_crop(im, 0.8, r), 0.5), 30)),
    "combo_crop40_rot5_resize50_jpeg30": (
        "combo", lambda im, r: _jpeg(_resize(_rot(_crop(im, 0.6, r), 5, r), 0.5), 30)),
}
GOALS = {"single": 0.95, "harder": 0.95, "combo": 0.85}


# ------------------------------------------------------------------------------- descriptors
class Methods:
    """The three descriptors, computed together on each batch of images."""

    def __init__(self, engine: EmbedderEngine) -> None:
        import imagehash

        self.engine = engine
        self._phash = imagehash.phash

    def describe(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        emb = self.engine.embed([np.asarray(im) for im in images])
        ph = np.array([int(str(self._phash(im)), 16) for im in images], dtype=np.uint64)
        px = np.stack([self.pixels(im) for im in images])
        return {"aejob": emb, "phash": ph, "pixels": px}

    @staticmethod
    def pixels(im: Image.Image) -> np.ndarray:
        v = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX), np.float32).reshape(-1)
        v = v - v.mean()
        return v / max(float(np.linalg.norm(v)), 1e-6)


def _popcount(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    out = np.zeros(x.shape, np.int64)
    for s in range(0, 64, 8):
        out += np.array([bin(i).count("1") for i in range(256)], np.int64)[((x >> np.uint64(s)) & np.uint64(255))
                                                                          .astype(np.int64)]
    return out


def recall_at(method: str, q: np.ndarray, db: np.ndarray, truth: np.ndarray, ks: tuple[int, ...] = (1, 10)
              ) -> dict[int, np.ndarray]:
    """Per query, the probability that its target is in the top k (ties broken at random)."""
    out = {k: np.zeros(len(q)) for k in ks}
    for s in range(0, len(q), 256):
        qs = q[s : s + 256]
        if method == "phash":
            score = -_popcount(qs[:, None] ^ db[None, :]).astype(np.float64)  # higher is closer
        else:
            score = (qs @ db.T).astype(np.float64)
        t = truth[s : s + 256]
        true = score[np.arange(len(qs)), t][:, None]
        better = (score > true).sum(1)
        ties = (score == true).sum(1) - 1
        for k in ks:
            out[k][s : s + len(qs)] = np.clip((k - better) / (ties + 1), 0, 1)
    return out


# ------------------------------------------------------------------------------- data
def _targets(data: str, cbsd: str) -> list[tuple[str, Image.Image]]:
    files = photo_split(data, "holdout") + (list_images(cbsd) if cbsd else [])
    return [(p.name, Image.fromarray(load_rgb(p))) for p in files]


def distractor_stream(sources: list[Image.Image], n: int, seed: int, chunk: int = 256):  # type: ignore[no-untyped-def]
    """Chunks of (image, source photo index) crops of the training photos."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < n:
        batch = []
        for _ in range(min(chunk, n - made)):
            k = int(rng.integers(len(sources)))
            ph = sources[k]
            area = rng.uniform(0.05, 0.6) * ph.width * ph.height
            r = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            w = int(min(ph.width, max(32, np.sqrt(area * r))))
            h = int(min(ph.height, max(32, np.sqrt(area / r))))
            x, y = int(rng.integers(0, ph.width - w + 1)), int(rng.integers(0, ph.height - h + 1))
            im = ph.crop((x, y, x + w, y + h))
            s = rng.uniform(160, 512) / max(w, h)
            if s < 1:
                im = _resize(im, s)
            batch.append((im, k))
        made += len(batch)
        yield batch


# ------------------------------------------------------------------------------- parts
def dedup_eval(db_vecs: np.ndarray, labels: np.ndarray, threshold: float, k: int = 10) -> dict[str, Any]:
    """Pair precision/recall at ``threshold``. labels: ≥ 0 target id (the target and its
    copies), < 0: -(1 + source photo) of a distractor; pairs of distractors cut from one photo
    are left out (they may overlap: neither right nor wrong).

    ``groups``: of the groups ``aejob dedup`` writes (``duplicate_groups``, rows in database
    order so that the originals are the kept members), every pair in a group is a predicted
    duplicate. ``pairs``: every pair of the database scoring ≥ threshold (exact), the decision
    the threshold makes before any grouping."""
    n = len(db_vecs)
    idx = vindex.SearchIndex({"kind": "flat", "embedding_model": "bench"}, np.arange(n, dtype=np.uint64),
                             [str(i) for i in range(n)], [""] * n, db_vecs)
    _, tc = np.unique(labels[labels >= 0], return_counts=True)
    positives = int(sum(c * (c - 1) // 2 for c in tc))
    tp = fp = 0
    groups = vindex.duplicate_groups(idx, threshold, k)
    for g in groups:
        values, counts = np.unique(labels[g], return_counts=True)
        same = int(sum(c * (c - 1) // 2 for c in counts))
        tp += int(sum(c * (c - 1) // 2 for v, c in zip(values, counts) if v >= 0))
        fp += len(g) * (len(g) - 1) // 2 - same
    ptp = pfp = 0
    cols = np.arange(n)[None, :]
    for s in range(0, n, 1024):
        sims = db_vecs[s : s + 1024] @ db_vecs.T
        li, lj = labels[s : s + 1024][:, None], labels[None, :]
        hit = (sims >= threshold) & (np.arange(s, s + len(sims))[:, None] < cols)
        same = li == lj
        ptp += int((hit & same & (li >= 0)).sum())
        pfp += int((hit & ~same).sum())
    return {"threshold": threshold, "true_pairs": positives,
            "groups": {"count": len(groups), "found_true_pairs": tp, "false_pairs": fp,
                       "precision": round(tp / max(1, tp + fp), 4), "recall": round(tp / max(1, positives), 4)},
            "pairs": {"found_true_pairs": ptp, "false_pairs": pfp, "precision": round(ptp / max(1, ptp + pfp), 4),
                      "recall": round(ptp / max(1, positives), 4)}}


def latency_eval(real: np.ndarray, queries: np.ndarray, pad_to: int, seed: int, workdir: str) -> dict[str, Any]:
    """HNSW over ``pad_to`` vectors built by pipeline.index from a DST; single-query top-10."""
    rng = np.random.default_rng(seed)
    n_pad = max(0, pad_to - len(real))
    mu = real.mean(0)
    cov = np.cov(real, rowvar=False)
    pad = rng.multivariate_normal(mu, cov, size=n_pad).astype(np.float32)
    base = np.concatenate([real, pad]).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    dst = os.path.join(workdir, "dst")
    os.makedirs(dst, exist_ok=True)
    dim = base.shape[1]
    for part, s in enumerate(range(0, len(base), 25_000)):
        b = base[s : s + 25_000]
        pq.write_table(pa.table({
            "key": pa.array([f"v{i:07d}" for i in range(s, s + len(b))]),
            "status": pa.array(["ok"] * len(b)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), dim),
            "embedding_model": pa.array(["bench"] * len(b)),
            "source_sha256": pa.array([str(i) for i in range(s, s + len(b))]),
        }), os.path.join(dst, f"part-{part}.parquet"))
    t0 = time.time()
    summary = vindex.build(dst, kind="hnsw")
    build_s = time.time() - t0
    idx = vindex.load(dst)
    exact = vindex.exact_topk(idx.vectors, queries, 10)
    times, overlap, top1 = [], [], []
    for i in range(len(queries)):
        t = time.perf_counter()
        hits = idx.search(queries[i : i + 1], 10)[0]
        times.append(time.perf_counter() - t)
        got = {r for r, _ in hits}
        want = {r for r, _ in exact[i]}
        overlap.append(len(got & want) / 10)
        top1.append(hits[0][0] == exact[i][0][0])
    ms = np.asarray(times) * 1000
    return {"vectors": len(base), "real_vectors": len(real), "padded_vectors": n_pad, "dim": dim,
            "hnsw": (vindex.read_meta(dst) or {}).get("hnsw"), "build_s": round(build_s, 2),
            "index_bytes": summary["bytes"], "queries": len(queries),
            "latency_ms_median": round(float(np.median(ms)), 4),
            "latency_ms_p95": round(float(np.percentile(ms, 95)), 4),
            "recall_at_10_vs_exact": round(float(np.mean(overlap)), 4),
            "top1_agrees_with_exact": round(float(np.mean(top1)), 4)}


def cost_eval(engine: EmbedderEngine, images: list[np.ndarray], threads: int, n_denoise: int = 8) -> dict[str, Any]:
    """Embedder vs denoiser ms per image on the same images, same threads, side by side: after
    an untimed pass, each image is embedded (best of 3) and denoised right after, and medians are
    reported, so that load from other processes hits both alike (one-off stalls of ~0.5 s per
    call were seen here while other jobs ran)."""
    torch.set_num_threads(threads)
    engine.embed(images)
    emb: list[float] = []
    for im in images:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            engine.embed([im])
            best = min(best, time.perf_counter() - t)
        emb.append(best * 1000)
    out: dict[str, Any] = {"threads": threads, "images": len(images), "size": list(images[0].shape[:2]),
                           "embedder_ms_per_image": round(float(np.median(emb)), 2),
                           "embedder_ms_mean": round(float(np.mean(emb)), 2)}
    try:
        from pipeline.infer import DenoiseEngine

        den = DenoiseEngine("denoiser-base", device="cpu", threads=threads)
        few = images[:n_denoise]
        den.denoise(few[:2])
        pairs = []
        for im in few:
            t = time.perf_counter()
            engine.embed([im])
            te = time.perf_counter() - t
            t = time.perf_counter()
            den.denoise([im])
            pairs.append((te * 1000, (time.perf_counter() - t) * 1000))
        e_ms, d_ms = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
        out.update(side_by_side_images=len(few), side_by_side_embedder_ms=round(e_ms, 2),
                   denoiser_ms_per_image=round(d_ms, 1), embedder_share_of_denoiser=round(e_ms / d_ms, 4))
    except Exception as e:  # the denoiser is being rebuilt elsewhere; the embedder's cost still stands
        log.warning("denoiser timing skipped: %s", e)
    return out


# ------------------------------------------------------------------------------- the bench
def bench_search(data: str, extra: str, cbsd: str, checkpoint: str, distractors: int, pad_to: int,
                 threads: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    t_start = time.time()
    load_start = os.getloadavg()[0]
    engine = EmbedderEngine(checkpoint, threads=threads, device="cpu")
    methods = Methods(engine)
    targets = _targets(data, cbsd)
    sources_files = photo_split(data, "train") + (list_images(extra) if extra else [])
    sources = [Image.fromarray(load_rgb(p)) for p in sources_files]
    log.info("%d targets, %d distractors from %d training photos", len(targets), distractors, len(sources))

    db: dict[str, list[np.ndarray]] = {"aejob": [], "phash": [], "pixels": []}
    d = methods.describe([im for _, im in targets])
    for m in db:
        db[m].append(d[m])
    src_of: list[int] = []
    with tqdm(total=distractors, desc="distractors", unit="img") as bar:
        for chunk in distractor_stream(sources, distractors, seed):
            d = methods.describe([im for im, _ in chunk])
            for m in db:
                db[m].append(d[m])
            src_of.extend(k for _, k in chunk)
            bar.update(len(chunk))
    dbm = {m: np.concatenate(v) for m, v in db.items()}

    rng = np.random.default_rng(seed + 1)
    per_class: dict[str, dict[str, Any]] = {}
    copies: list[np.ndarray] = []
    copy_labels: list[int] = []
    all_q: list[np.ndarray] = []
    for name, (group, fn) in tqdm(CLASSES.items(), desc="query classes"):
        qs = [fn(im, rng) for _, im in targets]
        d = methods.describe(qs)
        truth = np.arange(len(targets))
        row: dict[str, Any] = {"group": group, "queries": len(qs)}
        for m in ("aejob", "phash", "pixels"):
            r = recall_at(m, d[m], dbm[m], truth)
            row[m] = {"recall_at_1": round(float(r[1].mean()), 4), "recall_at_10": round(float(r[10].mean()), 4)}
        per_class[name] = row
        copies.append(d["aejob"])
        copy_labels.extend(range(len(targets)))
        all_q.append(d["aejob"])
        log.info("%s: %s", name, json.dumps(row))

    threshold = float(engine.meta.get("dedup_threshold") or 0.0)
    labels = np.concatenate([np.arange(len(targets)), -1 - np.asarray(src_of), np.asarray(copy_labels)])
    dedup_vecs = np.concatenate([dbm["aejob"], *copies])
    dedup: dict[str, Any] = dedup_eval(dedup_vecs, labels, threshold) if threshold else {"skipped": "no threshold"}
    sweep = {f"{t:.2f}": {kind: {m: v[m] for m in ("precision", "recall")} for kind, v in r.items()
                          if kind in ("groups", "pairs")}
             for t in (0.6, 0.7, 0.75, 0.85, 0.9) for r in [dedup_eval(dedup_vecs, labels, t)]}

    with tempfile.TemporaryDirectory() as tmp:
        latency = latency_eval(dbm["aejob"], np.concatenate(all_q), pad_to, seed, tmp)
    n_holdout = len(photo_split(data, "holdout"))  # targets: held-out photos first, then CBSD68
    cost_imgs = [np.asarray(im) for _, im in targets[n_holdout:]][:24] or [np.asarray(im) for _, im in targets][:24]
    cost = cost_eval(engine, cost_imgs, threads)

    summary = {}
    for m in ("aejob", "phash", "pixels"):
        for g in ("single", "harder", "combo"):
            vals = [r[m]["recall_at_1"] for r in per_class.values() if r["group"] == g]
            summary[f"{m}_{g}_min_recall_at_1"] = round(min(vals), 4)
    goals = {f"aejob_{g}": summary[f"aejob_{g}_min_recall_at_1"] >= v for g, v in GOALS.items()}
    goals["dedup_precision_0.95"] = float(dedup.get("groups", {}).get("precision", 0.0)) >= 0.95
    goals["latency_5ms"] = latency["latency_ms_median"] <= 5
    return {
        "checkpoint": {"ref": checkpoint, "model_id": engine.model_id, "steps": engine.meta.get("steps"),
                       "train_minutes": engine.meta.get("train_minutes")},
        "targets": {"count": len(targets), "holdout_photos": len(photo_split(data, "holdout")),
                    "cbsd68": len(targets) - len(photo_split(data, "holdout"))},
        "distractors": {"count": distractors, "from": [Path(data).name + " 001-040"] + ([Path(extra).name] if extra
                                                                                          else []),
                        "source_photos": len(sources)},
        "database_size": int(len(dbm["aejob"])),
        "classes": per_class, "summary": summary, "goals_met": goals,
        "dedup": dedup, "dedup_sweep": sweep, "latency": latency, "cost": cost,
        "threads": threads, "seconds": round(time.time() - t_start, 1),
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2),
                         "cpus": os.cpu_count()},
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'class':36s} {'group':7s} " + " ".join(f"{m + ' R@1':>11s} {m + ' R@10':>12s}"
                                                     for m in ("aejob", "phash", "pixels"))]
    for name, r in result["classes"].items():
        lines.append(f"{name:36s} {r['group']:7s} " + " ".join(
            f"{r[m]['recall_at_1']:11.3f} {r[m]['recall_at_10']:12.3f}" for m in ("aejob", "phash", "pixels")))
    dd, lat, cost = result["dedup"], result["latency"], result["cost"]
    for kind in ("groups", "pairs"):
        d = dd.get(kind, {})
        lines.append(f"dedup @ {dd.get('threshold')} ({kind}): precision {d.get('precision')} recall {d.get('recall')}")
    lines.append(f"HNSW over {lat['vectors']:,} vectors: top-10 {lat['latency_ms_median']:.3f} ms median "
                 f"({lat['latency_ms_p95']:.3f} p95), recall@10 vs exact {lat['recall_at_10_vs_exact']:.4f}, "
                 f"build {lat['build_s']:.1f} s, {lat['index_bytes'] / 1e6:.1f} MB")
    lines.append(f"embedder {cost['embedder_ms_per_image']} ms/image (median); side by side "
                 f"{cost.get('side_by_side_embedder_ms')} ms vs denoiser {cost.get('denoiser_ms_per_image')} ms "
                 f"per image ({cost['threads']} threads)")
    return "\n".join(lines)


def register(bench_app: typer.Typer) -> None:
    """Add ``aejob bench search``."""

    @bench_app.command("search")
    def bench_search_cmd(
        data: Annotated[Path, typer.Option(help="Numbered photos: 041–049 are targets, 001–040 distractor sources.")],
        extra: Annotated[Path | None, typer.Option(help="More distractor sources (training photos).")] = None,
        cbsd: Annotated[Path | None, typer.Option(help="More targets (CBSD68: evaluation only).")] = None,
        checkpoint: Annotated[str, typer.Option(help="Embedder checkpoint (path or shipped name).")] = "embedder-base",
        distractors: Annotated[int, typer.Option(help="Distractor crops in the database.")] = 10_000,
        pad_to: Annotated[int, typer.Option(
            help="Vectors in the latency test (padded with fitted samples).")] = 100_000,
        threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
        seed: Annotated[int, typer.Option(help="Seed for distractors and distortions.")] = 0,
        out: Annotated[Path, typer.Option(help="JSON results.")] = Path("bench-results/bench_search.json"),
    ) -> None:
        """Copy detection recall per distortion class (aejob vs pHash vs pixels), dedup, latency."""
        result = bench_search(str(data), str(extra or ""), str(cbsd or ""), checkpoint, distractors, pad_to,
                              threads, seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        typer.echo(format_table(result))
        typer.echo(f"results: {out}")
