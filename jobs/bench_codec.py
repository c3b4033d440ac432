"""``aejob bench codec``: rate–distortion of the learned codec(s) against JPEG, WebP and AVIF.

Everything is measured in one run on the same images: real bitstream bytes for every method
(bpp = bytes·8 / (W·H), our header included), PSNR on the decoded uint8 image and MS-SSIM
(pytorch-msssim, images whose short side is at least 161 px). Curves are averaged per method
and setting over the images; BD-rates (Bjøntegaard: cubic fit of log-rate against PSNR,
integrated) are reported for every learned codec against JPEG, WebP and AVIF, and for WebP vs
JPEG, AVIF vs JPEG and AVIF vs WebP, twice: over the curves' whole overlapping PSNR interval
(``bd_rate_percent``, as ever) and over the part of it where both curves lie within
0.15–2.5 bpp (``bd_rate_percent_clipped``, the range of issue #16). Encode and decode speed of
every codec is timed on one 768x512 image (torch and libavif with ``--threads``; Pillow's JPEG
and WebP coders are single-threaded), the classical codecs at the setting whose mean bpp on the
set is closest to the learned codec's default quality.

AVIF is Pillow's own plugin (libavif; aom encodes, dav1d decodes here) at pinned settings
(speed, chroma subsampling, threads: recorded in the JSON); without AVIF support in Pillow the
bench runs without it and says so.

On a folder of numbered photos only the held-out ones (041–049) are used, so a model is never
scored on its training images; any other folder (Kodak, CBSD68, ...) is used whole.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer
from PIL import Image

from models import avif as avif_codec
from models.avif import AvifSettings
from models.codec import CodecEngine, macs_per_pixel, param_count
from models.data import list_images, load_rgb, photo_split
from models.metrics import psnr_uint8
from models.restore import AvifRestoreCodec

log = logging.getLogger(__name__)

JPEG_QUALITIES = tuple(range(5, 96, 5))
WEBP_QUALITIES = tuple(range(5, 96, 5))
# libavif's quality 10..95 spans about 0.1–2.9 bpp on the held-out photos (0.17–4.9 on CBSD68)
AVIF_QUALITIES = (10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95)
AVIF_SPEED = avif_codec.SPEED
AVIF_SUBSAMPLING = avif_codec.SUBSAMPLING
CLIP_BPP = (0.15, 2.5)  # issue #16's rate range for the clipped BD-rates
SPEED_SIZE = (768, 512)  # width, height
CLASSICAL = ("jpeg", "webp", "avif")


# ------------------------------------------------------------------------------- metrics
def bd_rate(
    rate_anchor: Any, psnr_anchor: Any, rate_test: Any, psnr_test: Any,
    rate_range: tuple[float, float] | None = None,
) -> float:
    """Bjøntegaard delta rate of ``test`` against ``anchor`` in percent (negative: ``test``
    needs fewer bits for the same PSNR). NaN when the PSNR ranges do not overlap.

    log(rate) is fitted as a polynomial of PSNR (cubic; lower degree with fewer points) on each
    curve's points inside the overlapping PSNR interval plus the nearest point beyond each end,
    and the fits are integrated over the overlap.

    ``rate_range`` (lo, hi) bpp narrows the interval to the PSNRs at which both curves lie
    within it: each curve's PSNR at lo and at hi bpp (linear in log-rate between its points,
    its end points where it does not reach them) bound it.
    """
    curves = []
    for r, p in ((rate_anchor, psnr_anchor), (rate_test, psnr_test)):
        r, p = np.asarray(r, np.float64), np.asarray(p, np.float64)
        ok = np.isfinite(r) & np.isfinite(p) & (r > 0)
        order = np.argsort(p[ok])
        curves.append((np.log(r[ok][order]), p[ok][order]))
    if any(len(p) < 2 for _, p in curves):
        return float("nan")
    lo = max(p.min() for _, p in curves)
    hi = min(p.max() for _, p in curves)
    if rate_range is not None:
        r_lo, r_hi = math.log(rate_range[0]), math.log(rate_range[1])
        for lr, p in curves:
            by_rate = np.argsort(lr, kind="stable")
            lo = max(lo, float(np.interp(r_lo, lr[by_rate], p[by_rate])))
            hi = min(hi, float(np.interp(r_hi, lr[by_rate], p[by_rate])))
    if not hi > lo:
        return float("nan")
    avgs = []
    for lr, p in curves:
        inside = np.flatnonzero((p >= lo) & (p <= hi))
        below, above = np.flatnonzero(p < lo), np.flatnonzero(p > hi)
        idx = list(inside)
        if below.size:
            idx.insert(0, below[-1])
        if above.size:
            idx.append(above[0])
        idx = sorted(set(idx))
        deg = min(3, len(idx) - 1)
        poly = np.polynomial.Polynomial.fit(p[idx], lr[idx], deg)
        integral = poly.integ()
        avgs.append((integral(hi) - integral(lo)) / (hi - lo))
    return float((math.exp(avgs[1] - avgs[0]) - 1) * 100)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of two uint8 HxWx3 images (NaN when too small for 5 scales)."""
    if min(a.shape[:2]) < 161:
        return float("nan")
    from pytorch_msssim import ms_ssim as _ms_ssim

    t = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float()  # noqa: E731
    # one thread: its small convolutions ran 10x slower on 2 threads with other work on the
    # machine (0.78 s vs 0.08 s per 481x321 pair at load 6 on 2 cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return float(_ms_ssim(t(a), t(b), data_range=255, size_average=True))
    finally:
        torch.set_num_threads(threads)


def _measure(img: np.ndarray, data: bytes, rec: np.ndarray) -> dict[str, float]:
    h, w = img.shape[:2]
    return {"bpp": len(data) * 8 / (w * h), "psnr": psnr_uint8(rec, img), "ms_ssim": ms_ssim(img, rec)}


def avif_available() -> bool:
    return avif_codec.available()


def pil_encode(img: np.ndarray, fmt: str, quality: int, avif: AvifSettings | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": quality}
    if fmt == "JPEG":
        kwargs["subsampling"] = "4:2:0"
    if fmt == "AVIF":
        return avif_codec.encode(img, quality, avif)
    Image.fromarray(img).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pil_decode(data: bytes, avif: AvifSettings | None = None) -> np.ndarray:
    with avif_codec.decode_threads((avif or AvifSettings()).threads), Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).copy()


def pil_roundtrip(img: np.ndarray, fmt: str, quality: int,
                  avif: AvifSettings | None = None) -> tuple[bytes, np.ndarray]:
    data = pil_encode(img, fmt, quality, avif)
    return data, pil_decode(data, avif)


def _average(rows: list[dict[str, float]], key: str) -> list[dict[str, float]]:
    out = []
    for setting in sorted({r[key] for r in rows}):
        sel = [r for r in rows if r[key] == setting]
        point: dict[str, float] = {key: setting}
        for m in ("bpp", "psnr", "ms_ssim"):
            vals = [r[m] for r in sel if np.isfinite(r[m])]
            point[m] = float(np.mean(vals)) if vals else float("nan")
        out.append(point)
    return out


def _msssim_db(v: float) -> float:
    return -10 * math.log10(1 - v) if np.isfinite(v) and v < 1 else float("nan")


def _speed_image(img: np.ndarray) -> np.ndarray:
    w, h = SPEED_SIZE
    if img.shape[0] >= h and img.shape[1] >= w:
        y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        return img[y : y + h, x : x + w].copy()
    return np.array(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


def decode_speed(engine: CodecEngine, img: np.ndarray, repeats: int = 3) -> dict[str, Any]:
    """Images/s for decompress (and compress) of a 768x512 image at the default quality."""
    img = _speed_image(img)
    data = engine.compress(img)
    engine.decompress(data)  # warm-up
    dec, enc = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.decompress(data)
        dec.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.compress(img)
        enc.append(time.perf_counter() - t)
    return {
        "size": f"{SPEED_SIZE[0]}x{SPEED_SIZE[1]}", "threads": torch.get_num_threads(),
        "quality": engine.default_quality, "bpp": len(data) * 8 / (img.shape[0] * img.shape[1]),
        "decode_s": float(np.median(dec)), "decode_images_per_s": float(1 / np.median(dec)),
        "encode_s": float(np.median(enc)), "encode_images_per_s": float(1 / np.median(enc)),
    }


def pil_speed(img: np.ndarray, fmt: str, quality: int, avif: AvifSettings | None = None,
              repeats: int = 5) -> dict[str, Any]:
    """Images/s of Pillow's encoder and decoder (to an RGB array) of ``fmt`` on a 768x512 image."""
    img = _speed_image(img)
    data = pil_encode(img, fmt, quality, avif)
    pil_decode(data, avif)  # warm-up
    dec, enc = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        pil_decode(data, avif)
        dec.append(time.perf_counter() - t)
        t = time.perf_counter()
        pil_encode(img, fmt, quality, avif)
        enc.append(time.perf_counter() - t)
    return {
        "size": f"{SPEED_SIZE[0]}x{SPEED_SIZE[1]}",
        "threads": (avif or AvifSettings()).threads if fmt == "AVIF" else 1,  # libjpeg/libwebp: one
        "quality": quality, "bpp": len(data) * 8 / (img.shape[0] * img.shape[1]),
        "decode_s": float(np.median(dec)), "decode_images_per_s": float(1 / np.median(dec)),
        "encode_s": float(np.median(enc)), "encode_images_per_s": float(1 / np.median(enc)),
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def bench_images(data_dir: str | Path) -> list[Path]:
    held = photo_split(data_dir, "holdout")
    return held if held else list_images(data_dir)


def learned_labels(engines: Sequence[CodecEngine]) -> list[str]:
    """Curve names: ``aejob`` for the first codec (the JSON's keys since the first release),
    the checkpoint's file name for the others."""
    labels: list[str] = []
    for i, e in enumerate(engines):
        label = "aejob" if i == 0 else Path(str(e.path)).stem
        while label in labels or label in CLASSICAL:
            label += "'"
        labels.append(label)
    return labels


def bd_rates(curves: dict[str, list[dict[str, float]]], learned: Sequence[str],
             rate_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """Every learned codec vs JPEG, WebP and AVIF, and the classical codecs against each other,
    on PSNR and on MS-SSIM (in dB); NaN where a curve is missing."""

    def bd(anchor: str, test: str, metric: str) -> float:
        if anchor not in curves or test not in curves:
            return float("nan")
        a, t = curves[anchor], curves[test]
        f = (lambda v: v) if metric == "psnr" else _msssim_db
        return bd_rate([p["bpp"] for p in a], [f(p[metric]) for p in a],
                       [p["bpp"] for p in t], [f(p[metric]) for p in t], rate_range)

    pairs = [(name, anchor) for name in learned for anchor in CLASSICAL]
    pairs += [("webp", "jpeg"), ("avif", "jpeg"), ("avif", "webp")]
    out: dict[str, Any] = {f"{t}_vs_{a}": bd(a, t, "psnr") for t, a in pairs}
    out["ms_ssim"] = {f"{t}_vs_{a}": bd(a, t, "ms_ssim") for t, a in pairs}
    if rate_range is not None:
        out["range_bpp"] = list(rate_range)
    return out


# ------------------------------------------------------------------------------- the bench
def bench_codec(
    data_dir: str | Path, checkpoint: str | Sequence[str], out_dir: str | Path, limit: int = 0,
    threads: int = 2, avif: AvifSettings | None = None, use_avif: bool = True, suffix: str = "",
    speed_repeats: int = 3,
) -> dict[str, Any]:
    """``checkpoint``: one codec or several (the first is ``aejob`` in the JSON). ``suffix`` is
    appended to the file names (``codec_bench{suffix}.json``, ``codec_rd{suffix}.png``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    if not checkpoints:
        raise ValueError("no codec checkpoint given")
    engines = [CodecEngine(c, threads=threads) for c in checkpoints]
    labels = learned_labels(engines)
    avif = avif or AvifSettings(threads=threads)
    if use_avif and not avif_available():
        log.warning("this Pillow has no AVIF support (PIL.features.check('avif') is False): AVIF left out")
        use_avif = False
    files = bench_images(data_dir)
    if limit:
        files = files[:limit]
    if not files:
        raise SystemExit(f"no images in {data_dir}")
    classical = [("JPEG", "jpeg", JPEG_QUALITIES), ("WEBP", "webp", WEBP_QUALITIES)]
    if use_avif:
        classical.append(("AVIF", "avif", AVIF_QUALITIES))
    # an AVIF-based codec's base layer alone (its AV1 payload decoded without the filter, the
    # same stream bytes): what the filter adds, and what the base layer's settings add over AVIF
    bases = {label: f"{label}-base" for label, e in zip(labels, engines, strict=True)
             if isinstance(e.model, AvifRestoreCodec)}
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in [*labels, *bases.values()]}
    rows.update({key: [] for _, key, _ in classical})
    first_img = None
    t0 = time.time()
    for path in files:
        img = load_rgb(path)
        first_img = img if first_img is None else first_img
        for label, engine in zip(labels, engines, strict=True):
            for q in engine.qualities:
                data = engine.compress(img, q)
                rows[label].append({"image": path.name, "quality": q,
                                    **_measure(img, data, engine.decompress(data))})
                if label in bases:
                    base = avif_codec.decode(engine.model.parse(data)[2], engine.model.settings())
                    rows[bases[label]].append({"image": path.name, "quality": q, **_measure(img, data, base)})
        for fmt, key, qualities in classical:
            for q in qualities:
                data, rec = pil_roundtrip(img, fmt, q, avif)
                rows[key].append({"image": path.name, "quality": q, **_measure(img, data, rec)})
        log.info("%s done (%.0f s)", path.name, time.time() - t0)
    curves = {k: _average(v, "quality") for k, v in rows.items()}
    bd_overlap = bd_rates(curves, [*labels, *bases.values()])
    bd_clipped = bd_rates(curves, [*labels, *bases.values()], CLIP_BPP)
    assert first_img is not None
    speeds: dict[str, dict[str, Any]] = {}
    load_before = _load_average()
    for label, engine in zip(labels, engines, strict=True):
        speeds[label] = decode_speed(engine, first_img, repeats=speed_repeats)
    # the classical codecs at their setting nearest (in mean bpp over the set) to the learned
    # codec's default quality
    ref = next(p["bpp"] for p in curves[labels[0]] if p["quality"] == engines[0].default_quality)
    for fmt, key, _ in classical:
        near = min(curves[key], key=lambda p: abs(math.log(p["bpp"] / ref)))
        repeats = speed_repeats if fmt == "AVIF" else 5 * speed_repeats  # JPEG, WebP: milliseconds
        speeds[key] = {**pil_speed(first_img, fmt, int(near["quality"]), avif, repeats=repeats),
                       "matched_to": f"{labels[0]} q{engines[0].default_quality}: mean {ref:.3f} bpp on the set"}
    load = {"before": load_before, "after": _load_average(), "cpus": os.cpu_count()}
    learned = {label: learned_info(engine) for label, engine in zip(labels, engines, strict=True)}
    result = {
        "data": str(data_dir),
        "images": [p.name for p in files],
        "checkpoint": learned[labels[0]]["checkpoint"],
        "model": learned[labels[0]]["model"],
        "learned": learned,
        "settings": {
            "jpeg": f"Pillow {Image.__version__}, 4:2:0, qualities {JPEG_QUALITIES[0]}..{JPEG_QUALITIES[-1]}",
            "webp": f"Pillow {Image.__version__} default method, qualities "
                    f"{WEBP_QUALITIES[0]}..{WEBP_QUALITIES[-1]}",
            "avif": avif.describe(AVIF_QUALITIES) if use_avif else None,
            "bpp": "real stream bytes * 8 / (W*H), aejob header included",
            "bd_rate": "bd_rate_percent: over the curves' whole overlapping PSNR interval; "
                       f"bd_rate_percent_clipped: over the part where both lie within {CLIP_BPP[0]}-"
                       f"{CLIP_BPP[1]} bpp",
            "speed": f"one {SPEED_SIZE[0]}x{SPEED_SIZE[1]} crop of the first image, median of repeats; "
                     f"torch and libavif with {threads} threads, Pillow's JPEG and WebP coders single-threaded",
            # 1-minute load average around the speed runs: other work on the machine slows them
            "speed_load_average": load,
        },
        "curves": curves,
        "bd_rate_percent": bd_overlap,
        "bd_rate_percent_clipped": bd_clipped,
        "speed": speeds[labels[0]],
        "speed_all": speeds,
        "per_image": rows,
        "seconds": round(time.time() - t0, 1),
    }
    (out / f"codec_bench{suffix}.json").write_text(json.dumps(result, indent=2))
    plot_rd(curves, out / f"codec_rd{suffix}.png", title=f"{Path(str(data_dir)).name}: {len(files)} images")
    print(format_table(result))
    return result


def learned_info(engine: CodecEngine) -> dict[str, Any]:
    model = engine.model
    if isinstance(model, AvifRestoreCodec):  # AV1 codes; the filter runs in the encoder (strengths) and decoder
        macs = macs_per_pixel(model)["decoder"]
        return {
            "checkpoint": {"path": str(engine.path), "sha256": engine.sha256, "name": engine.name},
            "model": {"params": param_count(model), "params_decoder": param_count(model),
                      "params_encoder": param_count(model), "float16_mb": round(param_count(model) * 2 / 2**20, 2),
                      "macs_per_pixel": {"encoder": macs, "decoder": macs},
                      "base_layer": model.settings().describe(model.config.avif_qualities)},
            "default_quality": engine.default_quality,
        }
    return {
        "checkpoint": {"path": str(engine.path), "sha256": engine.sha256, "name": engine.name},
        "model": {
            "params": param_count(model),
            # a hyperprior's h_s (and a context model) run on both sides; h_a only in the
            # encoder, a post-filter only in the decoder
            "params_decoder": sum(param_count(model, p) for p in ("g_s", "h_s", "ctx", "ep", "post")
                                  if getattr(model, p, None) is not None),
            "params_encoder": sum(param_count(model, p) for p in ("g_a", "h_a", "h_s", "ctx", "ep")
                                  if getattr(model, p, None) is not None),
            "float16_mb": round(param_count(model) * 2 / 2**20, 2),
            "macs_per_pixel": macs_per_pixel(model),
        },
        "default_quality": engine.default_quality,
    }


def plot_rd(curves: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in curves.items():
        pts = [p for p in pts if p["bpp"] <= 3.0]
        bpp = [p["bpp"] for p in pts]
        axes[0].plot(bpp, [p["psnr"] for p in pts], "o-", ms=3, label=name)
        axes[1].plot(bpp, [_msssim_db(p["ms_ssim"]) for p in pts], "o-", ms=3, label=name)
    for ax, ylabel in zip(axes, ("PSNR (dB)", "MS-SSIM (dB)"), strict=True):
        for x in CLIP_BPP:
            ax.axvline(x, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"bits per pixel (dotted: {CLIP_BPP[0]}-{CLIP_BPP[1]})")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 2.7)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: settings printed per classical codec (every rung of a learned codec is printed)
TABLE_QUALITIES = {"jpeg": (10, 25, 50, 75, 90, 95), "webp": (10, 25, 50, 75, 90, 95),
                   "avif": (10, 30, 50, 70, 80, 90, 95)}
NAMES = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.1f}%"


def format_table(result: dict[str, Any]) -> str:
    lines = []
    curves = result["curves"]
    learned = [k for k in curves if k not in CLASSICAL]
    for name, pts in curves.items():
        if name in TABLE_QUALITIES:
            pts = [p for p in pts if p["quality"] in TABLE_QUALITIES[name]]
        lines.append(f"{name:6s} {'q':>4s} {'bpp':>7s} {'PSNR':>7s} {'MS-SSIM':>8s}")
        for p in pts:
            lines.append(f"{'':6s} {p['quality']:4d} {p['bpp']:7.3f} {p['psnr']:7.2f} "
                         f"{p['ms_ssim']:8.4f}")
    for key, what in (("bd_rate_percent", "overlap"), ("bd_rate_percent_clipped", "clipped")):
        bd = result.get(key)
        if not bd:
            continue
        if what == "clipped":
            lo, hi = bd["range_bpp"]
            what = f"{lo}-{hi} bpp"
        for metric, table in (("PSNR", bd), ("MS-SSIM", bd["ms_ssim"])):
            parts = [f"{n} vs {NAMES[a]} {_pct(table.get(f'{n}_vs_{a}'))}" for n in learned for a in CLASSICAL]
            parts += [f"{NAMES[t]} vs {NAMES[a]} {_pct(table.get(f'{t}_vs_{a}'))}"
                      for t, a in (("webp", "jpeg"), ("avif", "jpeg"), ("avif", "webp"))]
            lines.append(f"BD-rate ({metric}, {what}): " + ", ".join(parts))
    tops = []
    for name, pts in curves.items():
        top = max(pts, key=lambda p: p["psnr"])
        tops.append(f"{name} q{top['quality']} {top['psnr']:.2f} dB at {top['bpp']:.3f} bpp")
    lines.append("top PSNR: " + "; ".join(tops))
    speeds = result.get("speed_all") or {learned[0]: result["speed"]}
    s0 = next(iter(speeds.values()))
    load = result.get("settings", {}).get("speed_load_average") or {}
    note = (f", 1-min load average {load['before']}/{load['after']} on {load['cpus']} CPUs"
            if load.get("before") is not None else "")
    lines.append(f"speed at {s0['size']} (images/s{note}):")
    for name, s in speeds.items():
        plural = "s" if s["threads"] != 1 else ""
        lines.append(f"  {name:6s} encode {s['encode_images_per_s']:6.2f}  decode {s['decode_images_per_s']:6.2f}"
                     f"  (q{s['quality']}, {s['bpp']:.3f} bpp, {s['threads']} thread{plural})")
    for name, info in (result.get("learned") or {learned[0]: {"model": result["model"]}}).items():
        m = info["model"]
        lines.append(f"{name}: {m['params'] / 1e6:.2f}M params ({m['float16_mb']} MB fp16), MACs/pixel "
                     f"encoder {m['macs_per_pixel']['encoder']:.0f}, decoder {m['macs_per_pixel']['decoder']:.0f}")
    return "\n".join(lines)


def register(bench_app: typer.Typer) -> None:
    """Add ``aejob bench codec`` to the ``bench`` sub-command group."""

    @bench_app.command("codec")
    def bench_codec_cmd(
        data: Annotated[Path, typer.Option(help="Image folder (numbered photos: 041–049 only).")],
        checkpoint: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - typer needs Optional
            help="Codec checkpoint path or shipped name; repeat to compare several (the first is 'aejob' "
                 "in the JSON). Default: codec-avif.")] = None,
        out: Annotated[Path, typer.Option(help="Folder for codec_bench.json and the plot.")] = Path(
            "bench-results/codec"),
        suffix: Annotated[str, typer.Option(help="Appended to the file names: codec_bench{suffix}.json, "
                                                 "codec_rd{suffix}.png (e.g. _cbsd68).")] = "",
        limit: Annotated[int, typer.Option(help="Only the first N images (0: all).")] = 0,
        threads: Annotated[int, typer.Option(help="torch threads, and libavif's encoder/decoder threads.")] = 2,
        speed_repeats: Annotated[int, typer.Option(help="Timed runs per codec for the speed (median; "
                                                        "JPEG and WebP: 5x as many).")] = 3,
        avif: Annotated[bool, typer.Option(help="Include AVIF (Pillow's libavif).")] = True,
        avif_speed: Annotated[int, typer.Option(help="libavif encoder speed 0 (slowest) .. 10.")] = AVIF_SPEED,
        avif_subsampling: Annotated[str, typer.Option(help="AVIF chroma subsampling: 4:2:0, 4:2:2 or 4:4:4.")]
        = AVIF_SUBSAMPLING,
    ) -> None:
        """Rate–distortion (PSNR, MS-SSIM, BD-rate) against JPEG, WebP and AVIF, and encode/decode speed."""
        from jobs.compress import DEFAULT_CODEC

        if avif_subsampling not in ("4:2:0", "4:2:2", "4:4:4"):
            raise typer.BadParameter("--avif-subsampling must be 4:2:0, 4:2:2 or 4:4:4")
        if not 0 <= avif_speed <= 10:
            raise typer.BadParameter("--avif-speed must be within 0..10")
        bench_codec(data, checkpoint or [DEFAULT_CODEC], out, limit=limit, threads=threads,
                    avif=AvifSettings(speed=avif_speed, subsampling=avif_subsampling, threads=threads),
                    use_avif=avif, suffix=suffix, speed_repeats=max(1, speed_repeats))
