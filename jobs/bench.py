"""``aejob bench denoise``: the learned denoiser against classical baselines, side by side.

Every method sees the same noisy inputs (clipped, rounded uint8 AWGN with a fixed seed per
image and σ) in the same process, and is scored the same way: PSNR and SSIM of the uint8
output against the clean image, seconds of the ``denoise`` call only. BM3D is slow, so it runs
on the first ``bm3d_limit`` images, and every other method is also reported on that subset.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from models.metrics import psnr_uint8

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("noisy", "gaussian", "median", "nlm", "bm3d", "aejob")
DEFAULT_SIGMAS = (15.0, 25.0, 50.0)
PSNR_CAP = 99.0  # identical images (σ=0 input) score this instead of infinity
NOISE = ("additive white Gaussian noise on uint8 images, clipped to [0, 255] and rounded "
         "(models.noise.add_awgn_uint8); seed = seed*100000 + image_index*100 + int(sigma)")


def noise_seed(seed: int, image_index: int, sigma: float) -> int:
    return seed * 100000 + image_index * 100 + int(sigma)


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    return psnr_uint8(ref, out, PSNR_CAP)


def ssim(ref: np.ndarray, out: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(ref, out, channel_axis=-1, data_range=255))


def parse_sigmas(value: str | Sequence[float]) -> list[float]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for v in items:
        if isinstance(v, str) and not v.strip():
            continue
        try:
            s = float(v)
        except ValueError:
            raise ValueError(f"sigma {v!r} is not a number") from None
        if not 0 <= s <= 255:
            raise ValueError(f"sigma {s} is outside 0–255")
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("no sigma given")
    return out


def parse_methods(value: str | Sequence[str]) -> list[str]:
    from models.baselines import METHOD_NAMES

    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for m in (x.strip() for x in items):
        if not m:
            continue
        if m not in METHOD_NAMES:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(METHOD_NAMES)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no method given")
    return out


def _skey(sigma: float) -> str:
    return f"{sigma:g}"


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(img[y : y + size, x : x + size])


def _png_data_uri(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _load_engine(ref: str, threads: int, device: str, tries: int = 3) -> Any:
    """The model, retrying briefly: a training run may be rewriting the checkpoint right now
    (tensor file replaced, sidecar not yet), which reads as a sha256 mismatch for a moment."""
    from models.checkpoint import CheckpointError
    from pipeline.infer import DenoiseEngine

    for attempt in range(tries):
        try:
            return DenoiseEngine(ref, device=device, threads=threads)
        except CheckpointError as e:
            if "sha256 mismatch" not in str(e) or attempt == tries - 1:
                raise
            log.warning("checkpoint changed while loading (%s); retrying", e)
            time.sleep(2.0)
    raise AssertionError("unreachable")


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("aejob", "numpy", "torch", "scikit-image", "scipy", "bm3d", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _checkpoint_info(ref: str, engine: Any) -> dict[str, Any]:
    """Sidecar facts of the checkpoint: those the loaded engine verified when there is one."""
    from models import checkpoint as ck

    info: dict[str, Any] = {"ref": ref}
    try:
        meta = dict(engine.meta) if engine is not None else ck.read_meta(ref)
        info["path"] = str(ck.resolve(ref))
    except ck.CheckpointError as e:
        info.update(sha256=None, error=str(e))
        return info
    info["sha256"] = meta.get("sha256")
    for k in ("name", "kind", "steps", "train_minutes", "holdout_psnr"):
        if k in meta:
            info[k] = meta[k]
    if engine is not None and engine.sha256 != info["sha256"]:
        log.warning("checkpoint sidecar sha256 differs from the loaded file's")
        info["loaded_sha256"] = engine.sha256
    return info


def _machine(threads: int) -> dict[str, Any]:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "loadavg_start": load,
        "versions": _versions(),
    }


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    secs = sum(r["seconds"] for r in rows)
    return {
        "n": len(rows),
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "psnr_vs_input": float(np.mean([r["psnr_vs_input"] for r in rows])),
        "seconds_per_image": secs / len(rows),
        "images_per_s": len(rows) / secs if secs > 0 else None,
    }


def bench_denoise(
    data: str,
    sigmas: Sequence[float],
    methods: Sequence[str],
    limit: int = 0,
    out_dir: str = "bench-results",
    checkpoint: str = "denoiser-base",
    bm3d_limit: int = 12,
    seed: int = 0,
    threads: int = 2,
    examples: int = 3,
    crop: int = 128,
    device: str = "cpu",
    show: bool = True,
) -> dict[str, Any]:
    """Run the denoise benchmark; write ``bench_denoise.json`` and ``.html`` into ``out_dir``.

    ``limit``/``bm3d_limit`` <= 0 mean all images. Classical methods and ``aejob-sigma`` get
    the true σ; ``aejob`` runs blind. Returns the JSON document.
    """
    import torch

    from models import baselines
    from models.data import list_images, load_rgb
    from models.noise import add_awgn_uint8
    from pipeline.infer import estimate_sigma

    sigmas = parse_sigmas(sigmas)
    methods = parse_methods(methods)
    if "bm3d" in methods and not baselines.bm3d_available():
        raise ImportError("the bm3d baseline needs the optional 'bm3d' package: "
                          "pip install aejob[bm3d] (or leave bm3d out of --methods)")
    paths = list_images(data)
    if limit > 0:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no images in {data}")
    n = len(paths)
    # the BM3D subset (without bm3d there is none: every method runs on every image)
    n_sub = n if bm3d_limit <= 0 or "bm3d" not in methods else min(bm3d_limit, n)
    if threads > 0:
        torch.set_num_threads(threads)

    engine = None
    if any(m.startswith("aejob") for m in methods):
        engine = _load_engine(checkpoint, threads, device)
    impl = {m: baselines.get_method(m, checkpoint=checkpoint, engine=engine) for m in methods}
    limited = {m for m in methods if m == "bm3d"}  # methods run on the subset only

    def run_on(m: str, i: int) -> bool:
        return m not in limited or i < n_sub

    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    machine = _machine(threads)
    images: list[dict[str, Any]] = []
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {_skey(s): [] for s in sigmas} for m in methods}
    est: dict[str, list[float]] = {_skey(s): [] for s in sigmas}
    shots: list[dict[str, Any]] = []  # crops for the HTML page
    n_examples = min(max(0, examples), n)
    total = sum(len(sigmas) * sum(run_on(m, i) for m in methods) for i in range(n))

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    log.info("bench denoise: %d images from %s (bm3d on %d), sigmas %s, methods %s",
             n, data, n_sub if "bm3d" in methods else 0, ",".join(map(_skey, sigmas)),
             ",".join(methods))
    t_start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as progress:
        task = progress.add_task("denoise bench", total=total)
        for i, p in enumerate(paths):
            clean = load_rgb(p)
            images.append({"index": i, "name": p.name, "height": int(clean.shape[0]),
                           "width": int(clean.shape[1]), "in_bm3d_subset": i < n_sub})
            for s in sigmas:
                k = _skey(s)
                noisy = add_awgn_uint8(clean, s, seed=noise_seed(seed, i, s))
                est[k].append(estimate_sigma(noisy))
                shot: dict[str, Any] | None = None
                if i < n_examples:
                    shot = {"image": p.name, "sigma": s, "clean": _center_crop(clean, crop),
                            "noisy": _center_crop(noisy, crop), "outputs": {}}
                    shots.append(shot)
                if i == 0 and s == sigmas[0]:  # warm-up: first-call costs are not timed
                    small = _center_crop(noisy, 64)
                    for meth in impl.values():
                        meth.denoise(small, None if meth.blind else s)
                for m, meth in impl.items():
                    if not run_on(m, i):
                        continue
                    progress.update(task, description=f"{p.name} σ={k} {m}")
                    t0 = time.perf_counter()
                    out = meth.denoise(noisy, None if meth.blind else s)
                    dt = time.perf_counter() - t0
                    row = {"image": p.name, "index": i, "psnr": psnr(clean, out),
                           "ssim": ssim(clean, out), "psnr_vs_input": psnr(noisy, out),
                           "seconds": dt}
                    results[m][k].append(row)
                    log.debug("%s σ=%s %s: %.2f dB %.4f %.3fs", p.name, k, m, row["psnr"],
                              row["ssim"], dt)
                    if shot is not None:
                        shot["outputs"][m] = (_center_crop(out, crop), row["psnr"])
                    progress.advance(task)
    wall = time.perf_counter() - t_start

    summary: list[dict[str, Any]] = []
    per_method: dict[str, Any] = {}
    for m in methods:
        per_method[m] = {"method": impl[m].describe(), "sigmas": {}}
        for s in sigmas:
            k = _skey(s)
            rows = results[m][k]
            entry: dict[str, Any] = {"per_image": rows}
            if len(rows) == n:
                entry["all"] = _means(rows)
                summary.append({"method": m, "sigma": s, "set": "all", **entry["all"]})
            sub = [r for r in rows if r["index"] < n_sub]
            if sub and n_sub < n:
                entry["subset"] = _means(sub)
            per_method[m]["sigmas"][k] = entry
    if n_sub < n:
        for m in methods:
            for s in sigmas:
                sub_means = per_method[m]["sigmas"][_skey(s)].get("subset")
                if sub_means:
                    summary.append({"method": m, "sigma": s, "set": "subset", **sub_means})

    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    doc: dict[str, Any] = {
        "benchmark": "denoise",
        "config": {
            "data": str(data), "sigmas": sigmas, "methods": methods, "limit": limit,
            "bm3d_limit": bm3d_limit, "seed": seed, "threads": threads, "device": device,
            "checkpoint": checkpoint, "noise": NOISE,
            "sigma_given": {m: ("none (blind)" if impl[m].blind else "true sigma")
                            for m in methods if m != "noisy"},
            "metrics": ("PSNR (dB, 255 peak, uint8 output vs clean, per image then mean; "
                        f"identical images score {PSNR_CAP}); SSIM (skimage, channel_axis=-1, "
                        "data_range=255); seconds: wall clock of the denoise call only, after "
                        "one untimed warm-up call per method on a 64x64 crop"),
        },
        "machine": machine,
        "checkpoint": _checkpoint_info(checkpoint, engine),
        "images": images,
        "subset": {"n": n_sub, "images": [im["name"] for im in images[:n_sub]],
                   "rule": "first bm3d_limit images (sorted by name); all without bm3d"},
        "estimated_sigma": {k: {"mean": float(np.mean(v)), "per_image": v} for k, v in est.items()},
        "results": per_method,
        "summary": summary,
        "wall_seconds": wall,
    }
    json_path = out_path / "bench_denoise.json"
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=False))
    table = render_table(doc)
    html_path = out_path / "bench_denoise.html"
    html_path.write_text(render_html(doc, shots, crop))
    log.info("wrote %s and %s (%.1f s)", json_path, html_path, wall)
    if show:
        console = Console()
        console.print(table)
        for line in render_notes(doc):
            console.print(line, highlight=False, markup=False)
    return doc


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    ips = r["images_per_s"]
    # the input itself has no speed worth a number (it is a copy)
    speed = "—" if r["method"] == "noisy" or not ips else f"{ips:.3g}"
    return f"{r['psnr']:.2f} / {r['ssim']:.4f} / {speed}"


def _table_rows(doc: dict[str, Any]) -> tuple[list[float], list[tuple[str, list[str]]]]:
    sigmas = doc["config"]["sigmas"]
    n_all = len(doc["images"])
    n_sub = doc["subset"]["n"]
    by: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
    order: list[tuple[str, str]] = []
    for r in doc["summary"]:
        key = (r["method"], r["set"])
        if key not in by:
            by[key] = {}
            order.append(key)
        by[key][r["sigma"]] = r
    rows = []
    for m, st in order:
        label = m if st == "all" else f"{m} (first {n_sub})"
        if st == "all" and n_sub < n_all:
            label = f"{m} (all {n_all})"
        rows.append((label, [_cell(by[(m, st)].get(s)) for s in sigmas]))
    return sigmas, rows


def render_table(doc: dict[str, Any]) -> Table:
    """method x sigma; each cell "PSNR dB / SSIM / images per s"."""
    from rich.table import Table

    sigmas, rows = _table_rows(doc)
    table = Table(title=f"denoise bench · {Path(doc['config']['data']).name} · "
                        f"{len(doc['images'])} images")
    table.add_column("method (images)")
    for s in sigmas:
        table.add_column(f"σ={s:g}: PSNR / SSIM / img/s", justify="right")
    prev_set = None
    for label, cells in rows:
        cur = "subset" if "(first" in label else "all"
        if prev_set is not None and cur != prev_set:
            table.add_section()
        prev_set = cur
        table.add_row(label, *cells)
    return table


def render_notes(doc: dict[str, Any]) -> list[str]:
    """The lines printed under the table: noise, σ estimates, checkpoint, machine."""
    ck = doc["checkpoint"]
    m = doc["machine"]
    est = ", ".join(f"σ={k}: {v['mean']:.1f}" for k, v in doc["estimated_sigma"].items())
    given = ", ".join(f"{k}: {v}" for k, v in doc["config"]["sigma_given"].items())
    start = m.get("loadavg_start")
    load = f", 1-min load average at start {start[0]:.3g} (timings share the CPUs)" if start else ""
    return [
        f"noise: clipped, rounded uint8 AWGN, seed {doc['config']['seed']}; "
        f"mean estimated σ: {est}",
        f"σ given: {given}",
        f"checkpoint {ck.get('ref')} sha256 {str(ck.get('sha256') or '-')[:12]}"
        + (f" ({ck['steps']} steps)" if "steps" in ck else ""),
        f"torch threads {m['torch_threads']}, {m['cpus_usable']} CPUs{load}",
    ]


def render_html(doc: dict[str, Any], shots: list[dict[str, Any]], crop: int) -> str:
    esc = html.escape
    sigmas, rows = _table_rows(doc)
    head = "".join(f"<th>σ={s:g}</th>" for s in sigmas)
    body = "".join(
        f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
        for label, cells in rows)
    est = ", ".join(f"σ={k}: {v['mean']:.2f}" for k, v in doc["estimated_sigma"].items())
    methods = doc["config"]["methods"]
    figs = []
    for shot in shots:
        cells = [("clean", shot["clean"], None), ("noisy input", shot["noisy"], None)]
        for m in methods:
            if m == "noisy":
                continue
            got = shot["outputs"].get(m)
            cells.append((m, got[0] if got else None, got[1] if got else None))
        noisy_psnr = shot["outputs"].get("noisy")
        tds = []
        for name, img, score in cells:
            if name == "noisy input" and noisy_psnr is not None:
                score = noisy_psnr[1]
            cap = esc(name) + (f"<br>{score:.2f} dB" if score is not None else "")
            if img is None:
                tds.append(f"<td><div class=na>not run</div>{cap}</td>")
            else:
                tds.append(f"<td><img src='{_png_data_uri(img)}' alt='{esc(name)}'><br>{cap}</td>")
        figs.append(f"<h3>{esc(shot['image'])} · σ={shot['sigma']:g}</h3>"
                    f"<table class=crops><tr>{''.join(tds)}</tr></table>")
    ck = doc["checkpoint"]
    machine = doc["machine"]
    subset = (f"; BM3D and the rows marked 'first {doc['subset']['n']}' on the first "
              f"{doc['subset']['n']}" if doc["subset"]["n"] < len(doc["images"]) else "")
    info = {
        "checkpoint": f"{ck.get('ref')} sha256 {ck.get('sha256')}"
                      + (f", {ck['steps']} steps" if "steps" in ck else ""),
        "noise": doc["config"]["noise"],
        "sigma given to each method": ", ".join(f"{k}: {v}" for k, v in
                                                doc["config"]["sigma_given"].items()),
        "metrics": doc["config"]["metrics"],
        "machine": f"{machine['platform']}, {machine['cpus_usable']} usable CPUs, torch threads "
                   f"{machine['torch_threads']}, load {machine.get('loadavg_start')}",
        "versions": ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
    }
    info_html = "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in info.items())
    return f"""<!doctype html><meta charset=utf-8><title>aejob denoise bench</title>
<style>body{{font-family:sans-serif;margin:1em}} td,th{{padding:3px 8px;text-align:center}}
table.summary td:first-child{{text-align:left}} table.summary{{border-collapse:collapse}}
table.summary tr:nth-child(even){{background:#f2f2f2}}
.crops img{{width:{2 * crop}px;image-rendering:pixelated}}
.na{{width:{2 * crop}px;height:{2 * crop}px;background:#eee;line-height:{2 * crop}px}}</style>
<h1>aejob denoise bench — {esc(Path(doc['config']['data']).name)}</h1>
<p>{len(doc['images'])} images{subset}.
Cells: PSNR dB / SSIM / images per second. Mean estimated σ: {esc(est)}.</p>
<table class=summary><tr><th>method</th>{head}</tr>{body}</table>
<ul>{info_html}</ul>
<h2>Centre crops ({crop}x{crop}, shown at 2x; dB is the whole image's PSNR)</h2>
{''.join(figs)}
"""


def register(bench_app: typer.Typer) -> None:
    """Add ``denoise`` to the ``aejob bench`` sub-app."""

    @bench_app.command("denoise")
    def denoise(
        data: Annotated[Path, typer.Option("--data", help="Folder of clean images (e.g. CBSD68).",
                                           exists=True, file_okay=False)],
        sigma: Annotated[str, typer.Option("--sigma", help="Noise levels, comma list, 0–255 "
                                           "units (0: clean input, 'do no harm').")] = "15,25,50",
        methods: Annotated[str, typer.Option("--methods", help="Comma list of noisy, gaussian, "
                                             "median, nlm, bm3d, aejob, aejob-sigma (bm3d is "
                                             "dropped when not installed unless asked for "
                                             "explicitly).")] = ",".join(DEFAULT_METHODS),
        limit: Annotated[int, typer.Option("--limit", help="First N images only (0: all).")] = 0,
        bm3d_limit: Annotated[int, typer.Option("--bm3d-limit", help="BM3D runs on the first N "
                                                "images; every method is also reported on "
                                                "them (0: all).")] = 12,
        checkpoint: Annotated[str, typer.Option("--checkpoint", help="Denoiser checkpoint (path "
                                                "or shipped name).")] = "denoiser-base",
        out: Annotated[Path, typer.Option("--out", help="Folder for bench_denoise.json and "
                                          ".html.")] = Path("bench-results"),
        threads: Annotated[int, typer.Option("--threads", help="torch threads (0: torch's "
                                             "default).")] = 2,
        seed: Annotated[int, typer.Option("--seed", help="Noise seed.")] = 0,
        examples: Annotated[int, typer.Option("--examples", help="Images shown as crops in the "
                                              "HTML page.")] = 3,
    ) -> None:
        """Denoising quality (PSNR, SSIM) and speed: aejob against classical baselines."""
        from models.baselines import bm3d_available

        try:
            sigmas = parse_sigmas(sigma)
            names = parse_methods(methods)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        if methods == ",".join(DEFAULT_METHODS) and not bm3d_available():
            log.warning("bm3d is not installed (pip install aejob[bm3d]): skipping it")
            names = [m for m in names if m != "bm3d"]
        try:
            bench_denoise(str(data), sigmas, names, limit=limit, out_dir=str(out),
                          checkpoint=checkpoint, bm3d_limit=bm3d_limit, seed=seed,
                          threads=threads, examples=examples)
        except ImportError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
