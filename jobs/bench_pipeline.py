"""``aejob bench pipeline``: the clean job end to end vs the bare model loop, side by side.

Both run on the same noisy images with the same torch threads in one invocation:
- bare loop: the job's per-image work in one process, nothing else (the ceiling): decode,
  noise estimate, denoise, embedding with its region vectors, PNG encode; its engine is the one
  the job's ``DenoiseActor`` builds (same denoiser and embedder checkpoints, tile, batch size,
  ensemble, threads; on CPU);
- job: ``aejob clean`` on local Ray from a folder to a Parquet DST (everything included:
  listing, Ray Data stages, actor start and model loads, writer, markers, commit, manifest).

What is timed, on each side: from the start of the work to its last output, fixed costs
included. The bare loop's timer starts before it builds its engine (loading both models, as a
user's script would); the job's timer is ``runner.run_job`` (the actor's model loads happen
inside it). Imports (torch, Ray) and ``ray.init`` (a local Ray is started once per process;
on a cluster it only connects) are outside both timers; ``ray_init_s`` reports the latter (on
2 cores the processes it starts are still booting when it returns, and that CPU falls inside
the job's timer).
``bare_setup_s`` is the bare loop's engine build, ``job_first_row_s`` the job's time to its
first row delivered to the driver (listing, plan, Ray Data start-up, actor start, model loads,
one batch through every stage), so the fixed costs of both sides can be read next to the rates.
PSNR of the job's output is measured against the clean originals (noisy vs cleaned).
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image

log = logging.getLogger(__name__)


def bench_pipeline(data: str, sigma: float, limit: int, checkpoint: str, threads: int,
                   out_dir: str, num_actors: int = 1, batch_size: int = 4) -> dict[str, Any]:
    from jobs.clean import CleanConfig, build_spec
    from models.data import list_images, load_rgb
    from models.metrics import psnr_uint8 as _psnr
    from models.noise import add_awgn_uint8
    from pipeline import decode as decode_mod
    from pipeline import runner
    from pipeline.encode import EncodeOptions, encode_image
    from pipeline.export import dataset
    from pipeline.infer import DenoiseEngine, Sigma
    from pipeline.noise_level import estimate_sigma

    load_at_start = os.getloadavg()[0]  # a loaded machine makes both rates (and the ratio) meaningless
    files = list_images(data)[: limit or None]
    work = Path(tempfile.mkdtemp(prefix="aejob-bench-"))
    src = work / "noisy"
    src.mkdir()
    truth: dict[str, np.ndarray] = {}
    for i, p in enumerate(files):
        clean = load_rgb(p)
        truth[p.name] = clean
        Image.fromarray(add_awgn_uint8(clean, sigma, seed=1000 + i)).save(src / p.name)

    # the job's spec: the bare loop builds its engine from the actor's own arguments
    dst = work / "out"
    spec = build_spec(CleanConfig(src=str(src), dst=str(dst), checkpoint=checkpoint),
                      runner.RayOptions(num_actors=num_actors, threads=threads, batch_size=batch_size))
    cfg = spec.config
    assert isinstance(cfg, CleanConfig)
    kw = spec.actor_kwargs
    dec_opts = decode_mod.DecodeOptions(max_pixels=cfg.max_pixels)
    enc_opts = EncodeOptions(cfg.format, cfg.quality)

    # 1) bare loop, same threads; the timer includes building the engine (both model loads)
    t = time.perf_counter()
    eng = DenoiseEngine(kw["checkpoint_ref"], device="cpu", threads=threads, tile=kw["tile"],
                        batch_size=batch_size, ensemble=kw["ensemble"], embedder=kw["embedder"])
    bare_setup_s = time.perf_counter() - t
    bare_psnr = []
    for p in sorted(src.iterdir()):
        dec = decode_mod.decode_image(p.read_bytes(), dec_opts)
        # auto sigma: estimated per image (the job does it in its CPU decode stage)
        level: Sigma = [estimate_sigma(dec.pixels)] if kw["sigma"] is None else kw["sigma"]
        out = eng.clean([dec.pixels], level)[0]
        eng.embed_with_regions([out])  # full + region vectors, as the actor computes them
        encode_image(out, enc_opts, dec.exif)
        bare_psnr.append(_psnr(out, truth[p.name]))
    bare_s = time.perf_counter() - t

    # 2) the job on local Ray
    t = time.perf_counter()
    runner.init_ray()
    ray_init_s = time.perf_counter() - t
    t = time.perf_counter()
    result = runner.run_job(spec, progress=False)
    job_s = time.perf_counter() - t
    rows = dataset(str(dst)).to_table(columns=["key", "status", "image"]).to_pylist()
    job_psnr, noisy_psnr = [], []
    for r in rows:
        img = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        job_psnr.append(_psnr(img, truth[r["key"]]))
        noisy_psnr.append(_psnr(np.asarray(Image.open(src / r["key"]).convert("RGB")), truth[r["key"]]))
    n = len(files)
    report = {
        "data": os.path.abspath(data),
        "images": n,
        "sigma": sigma,
        "noise": "additive white Gaussian, clipped and rounded to uint8, seeds 1000+i",
        "checkpoint": checkpoint,
        "threads": threads,
        "num_actors": num_actors,
        "psnr_noisy": float(np.mean(noisy_psnr)),
        "psnr_job": float(np.mean(job_psnr)),
        "psnr_bare": float(np.mean(bare_psnr)),
        "bare_images_per_s": n / bare_s,
        "job_images_per_s": n / job_s,
        "job_over_bare": (n / job_s) / (n / bare_s),
        "job_ok_rows": result.manifest["counts"]["rows_ok"],
        "bare_seconds": bare_s,
        "job_seconds": job_s,
        "bare_setup_s": bare_setup_s,
        "job_first_row_s": result.manifest["timings"].get("first_row_s"),
        "ray_init_s": ray_init_s,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_start": round(load_at_start, 2),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "bench_pipeline.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return report


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("pipeline")
    def pipeline_cmd(
        data: Annotated[str, typer.Option(help="Folder of clean images (noise is added).")],
        sigma: Annotated[float, typer.Option(help="Noise sigma, 0–255 units.")] = 25.0,
        limit: Annotated[int, typer.Option(help="First N images (0: all).")] = 0,
        checkpoint: Annotated[str, typer.Option(help="Denoiser checkpoint.")] = "denoiser-base",
        threads: Annotated[int, typer.Option(help="torch threads for both the loop and the actor.")] = 2,
        num_actors: Annotated[int, typer.Option(help="Model actors in the job.")] = 1,
        out: Annotated[str, typer.Option(help="Folder for bench_pipeline.json.")] = "bench-results",
    ) -> None:
        """Throughput and PSNR of `aejob clean` vs the bare model loop, side by side."""
        from rich.console import Console
        from rich.table import Table

        r = bench_pipeline(data, sigma, limit, checkpoint, threads, out, num_actors)
        t = Table(title=f"aejob clean vs bare loop — {r['images']} images, σ={sigma:g}, {threads} threads")
        for c in ("", "images/s", "PSNR dB"):
            t.add_column(c)
        t.add_row("noisy input", "", f"{r['psnr_noisy']:.2f}")
        t.add_row("bare loop", f"{r['bare_images_per_s']:.2f}", f"{r['psnr_bare']:.2f}")
        t.add_row("aejob clean (Ray)", f"{r['job_images_per_s']:.2f}", f"{r['psnr_job']:.2f}")
        t.add_row("job / bare", f"{r['job_over_bare']:.2f}", "")
        Console().print(t)
