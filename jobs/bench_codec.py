"""``aejob bench codec``: rate–distortion of the learned codec against JPEG and WebP.

Everything is measured in one run on the same images: real bitstream bytes for every method
(bpp = bytes·8 / (W·H), our header included), PSNR on the decoded uint8 image and MS-SSIM
(pytorch-msssim, images whose short side is at least 161 px). Curves are averaged per method
and setting over the images; BD-rates (Bjøntegaard: cubic fit of log-rate against PSNR over
the overlapping PSNR interval, integrated) are reported for aejob vs JPEG, WebP vs JPEG and
aejob vs WebP. Decode speed is timed on a 768x512 image with 2 torch threads.

On a folder of numbered photos only the held-out ones (041–049) are used, so a model is never
scored on its training images; any other folder (Kodak, CBSD68, ...) is used whole.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from PIL import Image

from models.codec import CodecEngine, macs_per_pixel, param_count
from models.data import list_images, load_rgb, photo_split
from models.metrics import psnr_uint8

log = logging.getLogger(__name__)

JPEG_QUALITIES = tuple(range(5, 96, 5))
WEBP_QUALITIES = tuple(range(5, 96, 5))
SPEED_SIZE = (768, 512)  # width, height


# ------------------------------------------------------------------------------- metrics
def bd_rate(
    rate_anchor: Any, psnr_anchor: Any, rate_test: Any, psnr_test: Any
) -> float:
    """Bjøntegaard delta rate of ``test`` against ``anchor`` in percent (negative: ``test``
    needs fewer bits for the same PSNR). NaN when the PSNR ranges do not overlap.

    log(rate) is fitted as a polynomial of PSNR (cubic; lower degree with fewer points) on each
    curve's points inside the overlapping PSNR interval plus the nearest point beyond each end,
    and the fits are integrated over the overlap.
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
    with torch.inference_mode():
        return float(_ms_ssim(t(a), t(b), data_range=255, size_average=True))


def _measure(img: np.ndarray, data: bytes, rec: np.ndarray) -> dict[str, float]:
    h, w = img.shape[:2]
    return {"bpp": len(data) * 8 / (w * h), "psnr": psnr_uint8(rec, img), "ms_ssim": ms_ssim(img, rec)}


def pil_roundtrip(img: np.ndarray, fmt: str, quality: int) -> tuple[bytes, np.ndarray]:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": quality}
    if fmt == "JPEG":
        kwargs["subsampling"] = "4:2:0"
    Image.fromarray(img).save(buf, format=fmt, **kwargs)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        rec = np.asarray(im.convert("RGB")).copy()
    return data, rec


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
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


def decode_speed(engine: CodecEngine, img: np.ndarray, repeats: int = 3) -> dict[str, float]:
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


def bench_images(data_dir: str | Path) -> list[Path]:
    held = photo_split(data_dir, "holdout")
    return held if held else list_images(data_dir)


# ------------------------------------------------------------------------------- the bench
def bench_codec(
    data_dir: str | Path, checkpoint: str, out_dir: str | Path, limit: int = 0,
    threads: int = 2,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engine = CodecEngine(checkpoint, threads=threads)
    files = bench_images(data_dir)
    if limit:
        files = files[:limit]
    if not files:
        raise SystemExit(f"no images in {data_dir}")
    rows: dict[str, list[dict[str, Any]]] = {"aejob": [], "jpeg": [], "webp": []}
    first_img = None
    t0 = time.time()
    for path in files:
        img = load_rgb(path)
        first_img = img if first_img is None else first_img
        for q in engine.qualities:
            data = engine.compress(img, q)
            rows["aejob"].append({"image": path.name, "quality": q,
                                  **_measure(img, data, engine.decompress(data))})
        for fmt, key, qualities in (("JPEG", "jpeg", JPEG_QUALITIES), ("WEBP", "webp", WEBP_QUALITIES)):
            for q in qualities:
                data, rec = pil_roundtrip(img, fmt, q)
                rows[key].append({"image": path.name, "quality": q, **_measure(img, data, rec)})
        log.info("%s done (%.0f s)", path.name, time.time() - t0)
    curves = {k: _average(v, "quality") for k, v in rows.items()}

    def bd(anchor: str, test: str, metric: str = "psnr") -> float:
        a, t = curves[anchor], curves[test]
        f = (lambda v: v) if metric == "psnr" else _msssim_db
        return bd_rate([p["bpp"] for p in a], [f(p[metric]) for p in a],
                       [p["bpp"] for p in t], [f(p[metric]) for p in t])

    bd_rates = {
        "aejob_vs_jpeg": bd("jpeg", "aejob"),
        "webp_vs_jpeg": bd("jpeg", "webp"),
        "aejob_vs_webp": bd("webp", "aejob"),
        "ms_ssim": {
            "aejob_vs_jpeg": bd("jpeg", "aejob", "ms_ssim"),
            "webp_vs_jpeg": bd("jpeg", "webp", "ms_ssim"),
            "aejob_vs_webp": bd("webp", "aejob", "ms_ssim"),
        },
    }
    assert first_img is not None
    speed = decode_speed(engine, first_img)
    model = engine.model
    macs = macs_per_pixel(model)
    result = {
        "data": str(data_dir),
        "images": [p.name for p in files],
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
            "macs_per_pixel": macs,
        },
        "settings": {
            "jpeg": f"Pillow {Image.__version__}, 4:2:0, qualities {JPEG_QUALITIES[0]}..{JPEG_QUALITIES[-1]}",
            "webp": f"Pillow {Image.__version__} default method, qualities "
                    f"{WEBP_QUALITIES[0]}..{WEBP_QUALITIES[-1]}",
            "bpp": "real stream bytes * 8 / (W*H), aejob header included",
        },
        "curves": curves,
        "bd_rate_percent": bd_rates,
        "speed": speed,
        "per_image": rows,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "codec_bench.json").write_text(json.dumps(result, indent=2))
    plot_rd(curves, out / "codec_rd.png", title=f"{Path(str(data_dir)).name}: {len(files)} images")
    print(format_table(result))
    return result


def plot_rd(curves: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in curves.items():
        bpp = [p["bpp"] for p in pts]
        axes[0].plot(bpp, [p["psnr"] for p in pts], "o-", ms=3, label=name)
        axes[1].plot(bpp, [_msssim_db(p["ms_ssim"]) for p in pts], "o-", ms=3, label=name)
    for ax, ylabel in zip(axes, ("PSNR (dB)", "MS-SSIM (dB)"), strict=True):
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 2.0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for name, pts in result["curves"].items():
        if name != "aejob":
            pts = [p for p in pts if p["quality"] in (10, 25, 50, 75, 90)]
        lines.append(f"{name:6s} {'q':>4s} {'bpp':>7s} {'PSNR':>7s} {'MS-SSIM':>8s}")
        for p in pts:
            lines.append(f"{'':6s} {p['quality']:4d} {p['bpp']:7.3f} {p['psnr']:7.2f} "
                         f"{p['ms_ssim']:8.4f}")
    bd = result["bd_rate_percent"]
    lines.append(f"BD-rate (PSNR): aejob vs JPEG {bd['aejob_vs_jpeg']:+.1f}%, WebP vs JPEG "
                 f"{bd['webp_vs_jpeg']:+.1f}%, aejob vs WebP {bd['aejob_vs_webp']:+.1f}%")
    ms = bd["ms_ssim"]
    lines.append(f"BD-rate (MS-SSIM): aejob vs JPEG {ms['aejob_vs_jpeg']:+.1f}%, WebP vs JPEG "
                 f"{ms['webp_vs_jpeg']:+.1f}%, aejob vs WebP {ms['aejob_vs_webp']:+.1f}%")
    s, m = result["speed"], result["model"]
    lines.append(f"decode {s['decode_images_per_s']:.2f} images/s at {s['size']} "
                 f"({s['threads']} threads), encode {s['encode_images_per_s']:.2f} images/s; "
                 f"{m['params'] / 1e6:.2f}M params ({m['float16_mb']} MB fp16), MACs/pixel "
                 f"encoder {m['macs_per_pixel']['encoder']:.0f}, decoder "
                 f"{m['macs_per_pixel']['decoder']:.0f}")
    return "\n".join(lines)


def register(bench_app: typer.Typer) -> None:
    """Add ``aejob bench codec`` to the ``bench`` sub-command group."""

    @bench_app.command("codec")
    def bench_codec_cmd(
        data: Annotated[Path, typer.Option(help="Image folder (numbered photos: 041–049 only).")],
        checkpoint: Annotated[str, typer.Option(help="Codec checkpoint path or shipped name.")],
        out: Annotated[Path, typer.Option(help="Folder for codec_bench.json and the plot.")] = Path(
            "bench-results/codec"),
        limit: Annotated[int, typer.Option(help="Only the first N images (0: all).")] = 0,
        threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    ) -> None:
        """Rate–distortion (PSNR, MS-SSIM, BD-rate) against JPEG and WebP, and decode speed."""
        bench_codec(data, checkpoint, out, limit=limit, threads=threads)
