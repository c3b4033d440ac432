"""``aejob bench pipeline``: the clean job end to end vs the bare model loop, side by side.

Both run on the same noisy images with the same torch threads in one invocation, in pairs
(``--repeats``, default 3), each side in a fresh process so neither inherits the other's warm
caches or a running Ray:
- bare loop (``python -m jobs.bench_pipeline bare``): the job's per-image work in one process,
  nothing else (the ceiling): decode, noise estimate, denoise, the embedding with its region
  vectors, PNG encode; its engine is the one the job's ``DenoiseActor`` builds (ONNX Runtime
  where both checkpoints have exports, as ``pipeline.ort_engine.denoise_engine`` picks; same denoiser
  and embedder checkpoints, tile, batch size, ensemble, threads; on CPU);
- job: the command line ``aejob clean`` (``python -m jobs.cli clean``) on a local Ray of its own,
  from a folder to a Parquet DST (everything included: listing, Ray Data stages, actor start
  and model loads, writer, markers, commit, manifest).

What is timed, on each side: from the start of the work to its last output, fixed costs
included. The bare loop's clock starts before it builds its engine (loading both models, as a
user's script would); the job's is its manifest's ``total_s`` (``runner.run_job``) less its
``ray_init_s``. Imports and ``ray.init`` (on a cluster it only connects) are outside both
clocks; on 2 cores the processes a local Ray starts are still booting when ``ray.init``
returns, and that CPU falls inside the job's clock. ``bare_setup_s`` is the bare loop's engine
build, ``job_first_row_s`` the job's time to its first row back at the driver (listing, plan,
Ray Data start-up, actor start, model loads, one batch through every stage). The top-level
figures are the median pair's (by ratio); ``pairs`` holds every pair. PSNR of both sides'
outputs is measured against the clean originals.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image

log = logging.getLogger(__name__)


def bare_loop(src: str, checkpoint: str, threads: int, batch_size: int, out: str,
              workers: int = 1) -> dict[str, Any]:
    """The bare loop over every image of ``src`` in this process; the clock starts before the
    engine is built (both model loads). Its outputs land in ``out`` after the clock stops.

    ``workers`` > 1: that many Python threads take images in turn, each on ``threads // workers``
    engine threads (the way the job's actor runs two calls at once): a hand-parallel script."""
    from concurrent.futures import ThreadPoolExecutor

    from jobs.clean import CleanConfig, build_spec
    from pipeline import decode as decode_mod
    from pipeline import runner
    from pipeline.encode import EncodeOptions, encode_image
    from pipeline.noise_level import estimate_sigma
    from pipeline.ort_engine import OrtDenoiseEngine, denoise_engine
    from pipeline.tiling import Sigma

    # the engine is built from the job's own actor arguments (same checkpoints, tile, ensemble)
    spec = build_spec(CleanConfig(src=src, dst=src + ".unused", checkpoint=checkpoint),
                      runner.RayOptions(num_actors=1, threads=threads, batch_size=batch_size))
    cfg = spec.config
    assert isinstance(cfg, CleanConfig)
    kw = spec.actor_kwargs
    dec_opts = decode_mod.DecodeOptions(max_pixels=cfg.max_pixels)
    enc_opts = EncodeOptions(cfg.format, cfg.quality)
    t = time.perf_counter()
    eng = denoise_engine(kw["checkpoint_ref"], device="cpu", threads=max(1, threads // workers), tile=kw["tile"],
                         batch_size=batch_size, ensemble=kw["ensemble"], embedder=kw["embedder"])
    setup_s = time.perf_counter() - t

    def one(p: Path) -> bytes:
        dec = decode_mod.decode_image(p.read_bytes(), dec_opts)
        # auto sigma: estimated per image (the job does it in its CPU decode stage)
        level: Sigma = [estimate_sigma(dec.pixels)] if kw["sigma"] is None else kw["sigma"]
        cleaned = eng.clean([dec.pixels], level)[0]
        eng.vectors([cleaned], kw["regions"])  # full + region vectors, as the actor computes them
        return encode_image(cleaned, enc_opts, dec.exif)

    files = sorted(Path(src).iterdir())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            outputs = dict(zip((p.name for p in files), pool.map(one, files)))
    else:
        outputs = {p.name: one(p) for p in files}
    seconds = time.perf_counter() - t
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        (Path(out) / name).write_bytes(data)
    return {"seconds": seconds, "setup_s": setup_s,
            "engine": "onnxruntime" if isinstance(eng, OrtDenoiseEngine) else "torch"}


def _fresh_process(args: list[str]) -> tuple[float, str]:
    """Run ``python -m <args>`` in a new process: (wall seconds, stdout); its stderr passes through
    only on failure."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} exited {r.returncode}: {r.stderr[-2000:]}")
    return wall, r.stdout


def median_pair(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pair with the median job/bare ratio (of an even count, the lower of the middle two)."""
    ranked = sorted(pairs, key=lambda p: p["job_over_bare"])
    return ranked[(len(ranked) - 1) // 2]


def bench_pipeline(data: str, sigma: float, limit: int, checkpoint: str, threads: int,
                   out_dir: str, num_actors: int = 1, batch_size: int = 4, repeats: int = 3) -> dict[str, Any]:
    from jobs.clean import ORT_CALLS
    from models.data import list_images, load_rgb
    from models.metrics import psnr_uint8 as _psnr
    from models.noise import add_awgn_uint8
    from pipeline.export import dataset

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
    n = len(files)

    def bare_run(out: str, workers: int) -> tuple[float, dict[str, Any]]:
        wall, text = _fresh_process(["jobs.bench_pipeline", "bare", json.dumps(
            {"src": str(src), "checkpoint": checkpoint, "threads": threads, "batch_size": batch_size,
             "out": str(work / out), "workers": workers})])
        return wall, json.loads(text)

    pairs: list[dict[str, Any]] = []
    dst = work / "out"
    for r in range(repeats):
        # bare loop then job, each in a fresh process: neither inherits the other's warm caches
        # (oneDNN primitives, a running Ray), and every job starts its own local Ray as a user's does
        bare_wall, bare = bare_run("bare", 1)
        # the same work by a hand-parallel script (as many threads as the job's actor runs calls)
        _, parallel = bare_run("bare-parallel", max(1, min(ORT_CALLS, threads)))
        shutil.rmtree(dst, ignore_errors=True)
        job_wall, _ = _fresh_process(["jobs.cli", "clean", str(src), "--out", str(dst), "--checkpoint", checkpoint,
                                      "--threads", str(threads), "--num-actors", str(num_actors),
                                      "--batch-size", str(batch_size)])
        manifest = json.loads((dst / "_manifest.json").read_text())
        # run_job's clock less its ray.init (outside the clock, as imports are: on a cluster it only
        # connects); the processes a local Ray is still booting then stay inside it
        init_s = float(manifest["timings"].get("ray_init_s", 0.0))
        job_s = round(float(manifest["timings"]["total_s"]) - init_s, 3)
        pairs.append({"bare_seconds": round(bare["seconds"], 3), "job_seconds": job_s,
                      "job_over_bare": round(bare["seconds"] / job_s, 4),
                      "bare_parallel_seconds": round(parallel["seconds"], 3),
                      "job_over_bare_parallel": round(parallel["seconds"] / job_s, 4),
                      "bare_setup_s": round(bare["setup_s"], 3), "engine": bare["engine"],
                      "job_first_row_s": round(float(manifest["timings"]["first_row_s"]) - init_s, 3),
                      "job_ray_init_s": init_s,
                      "job_rows_ok": manifest["counts"]["rows_ok"],
                      "bare_process_s": round(bare_wall, 2), "job_process_s": round(job_wall, 2),
                      "load_avg_1m": round(os.getloadavg()[0], 2)})
        log.info("pair %d/%d: %s", r + 1, repeats, json.dumps(pairs[-1]))

    rows = dataset(str(dst)).to_table(columns=["key", "status", "image"]).to_pylist()
    job_psnr, noisy_psnr, bare_psnr = [], [], []
    for row in rows:
        img = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        job_psnr.append(_psnr(img, truth[row["key"]]))
        noisy_psnr.append(_psnr(np.asarray(Image.open(src / row["key"]).convert("RGB")), truth[row["key"]]))
    for f in sorted((work / "bare").iterdir()):
        bare_psnr.append(_psnr(np.asarray(Image.open(f).convert("RGB")), truth[f.name]))
    mid = median_pair(pairs)
    ratios = sorted(p["job_over_bare"] for p in pairs)
    report = {
        "data": os.path.abspath(data),
        "images": n,
        "sigma": sigma,
        "noise": "additive white Gaussian, clipped and rounded to uint8, seeds 1000+i",
        "checkpoint": checkpoint,
        "engine": mid["engine"],  # the bare loop's, which the job's actor picks the same way
        "threads": threads,
        "num_actors": num_actors,
        "repeats": repeats,
        "psnr_noisy": float(np.mean(noisy_psnr)),
        "psnr_job": float(np.mean(job_psnr)),
        "psnr_bare": float(np.mean(bare_psnr)),
        # the median pair's; every pair is in "pairs"
        "bare_images_per_s": n / mid["bare_seconds"],
        "job_images_per_s": n / mid["job_seconds"],
        "job_over_bare": mid["job_over_bare"],
        "job_over_bare_min": ratios[0],
        "job_over_bare_max": ratios[-1],
        # against the same work in two threads of one process (not the bare loop: context)
        "bare_parallel_seconds": mid["bare_parallel_seconds"],
        "job_over_bare_parallel": mid["job_over_bare_parallel"],
        "job_ok_rows": mid["job_rows_ok"],
        "bare_seconds": mid["bare_seconds"],
        "job_seconds": mid["job_seconds"],
        "bare_setup_s": mid["bare_setup_s"],
        "job_first_row_s": mid["job_first_row_s"],
        "pairs": pairs,
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
        repeats: Annotated[int, typer.Option(help="Bare/job pairs, each side in a fresh process; the median "
                                                  "pair is reported.")] = 3,
    ) -> None:
        """Throughput and PSNR of `aejob clean` vs the bare model loop, side by side."""
        from rich.console import Console
        from rich.table import Table

        r = bench_pipeline(data, sigma, limit, checkpoint, threads, out, num_actors, repeats=repeats)
        t = Table(title=f"aejob clean vs bare loop — {r['images']} images, σ={sigma:g}, {threads} threads")
        for c in ("", "images/s", "PSNR dB"):
            t.add_column(c)
        t.add_row("noisy input", "", f"{r['psnr_noisy']:.2f}")
        t.add_row("bare loop", f"{r['bare_images_per_s']:.2f}", f"{r['psnr_bare']:.2f}")
        t.add_row("bare loop, 2 threads", f"{r['images'] / r['bare_parallel_seconds']:.2f}", "")
        t.add_row("aejob clean (Ray)", f"{r['job_images_per_s']:.2f}", f"{r['psnr_job']:.2f}")
        t.add_row("job / bare", f"{r['job_over_bare']:.2f} (pairs {r['job_over_bare_min']:.2f}–"
                  f"{r['job_over_bare_max']:.2f})", "")
        t.add_row("job / bare, 2 threads", f"{r['job_over_bare_parallel']:.2f}", "")
        Console().print(t)


if __name__ == "__main__":  # one bare loop in a fresh process (bench_pipeline runs it so)
    if len(sys.argv) == 3 and sys.argv[1] == "bare":
        a = json.loads(sys.argv[2])
        print(json.dumps(bare_loop(a["src"], a["checkpoint"], a["threads"], a["batch_size"], a["out"],
                                   int(a.get("workers", 1)))))
    else:
        raise SystemExit("usage: python -m jobs.bench_pipeline bare JSON")
