"""The ``aejob`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from pipeline import runner

app = typer.Typer(
    help="Clean, compress and index large image datasets on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train the models that aejob ships.", no_args_is_help=True)
app.add_typer(train_app, name="train")
bench_app = typer.Typer(help="Benchmarks: JSON results and a printed table.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        from pipeline.quiet import filter_ray_stderr

        filter_ray_stderr()


@train_app.command("denoiser")
def train_denoiser(
    data: Annotated[Path, typer.Option(help="Folder of training photos (001–040 are used).")],
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints and the curve.")] = Path("runs/denoiser"),
    preset: Annotated[str, typer.Option(help="Model size: tiny, small, base.")] = "base",
    steps: Annotated[int, typer.Option(help="Total optimizer steps (cosine schedule length).")] = 6000,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for patches, noise and init.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads per worker (0: default).")] = 0,
    workers: Annotated[int, typer.Option(help="Ray Train workers; 0 trains in this process.")] = 1,
    gpu: Annotated[bool, typer.Option(help="One GPU per Ray Train worker.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Checkpoint to resume from.")] = None,
    release: Annotated[Optional[Path], typer.Option(help="Also write a float16 release checkpoint here.")] = None,
    max_minutes: Annotated[float, typer.Option(help="Stop (and save) after this many minutes.")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations.")] = 250,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 250,
    pixels_per_batch: Annotated[int, typer.Option(help="Pixels per batch (batch size scales with the patch size).")] = 32 * 64 * 64,
    limit_images: Annotated[int, typer.Option(help="Use only the first N training photos (tests).")] = 0,
) -> None:
    """Train the residual U-Net denoiser on random noisy patches (AWGN, Poisson-Gaussian, JPEG)."""
    from jobs import train

    cfg = train.TrainConfig(
        data=str(data), out=str(out), preset=preset, steps=steps, lr=lr, seed=seed,
        threads=threads, resume=str(resume or ""), release=str(release or ""),
        max_minutes=max_minutes, eval_every=eval_every, save_every=save_every,
        pixels_per_batch=pixels_per_batch, limit_images=limit_images,
    )
    result = train.run(cfg, workers=workers, use_gpu=gpu)
    typer.echo(f"done: {result.get('steps', '')} steps; checkpoints in {out}")


FORMAT_HELP = "Output image format: png (lossless), webp or jpeg."

# Options every SRC -> DST job shares (runner.JobConfig / runner.RayOptions), declared once.
SrcArg = Annotated[str, typer.Argument(help="Local folder or s3://bucket/prefix of images, tar shards or Parquet files.")]
DstOpt = Annotated[str, typer.Option("--out", help="DST: local folder or s3://bucket/prefix.")]
ThreadsOpt = Annotated[int, typer.Option(help="torch threads per actor (0: pick).")]
ActorCpusOpt = Annotated[float, typer.Option(help="CPUs each actor reserves (0: pick).")]
ImageColumnOpt = Annotated[str, typer.Option(help="Binary image column of Parquet inputs.")]
MaxErrorRateOpt = Annotated[float, typer.Option(help="Fail the job when the error-row rate exceeds this (judged after 1,000 rows, or all).")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Decompression-bomb guard: largest image in pixels.")]
ShardSizeOpt = Annotated[int, typer.Option(help="Loose files per output shard.")]
LimitOpt = Annotated[int, typer.Option(help="Process only the first N inputs (files or containers).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace a DST made with different settings.")]
DryRunOpt = Annotated[bool, typer.Option(help="List what would be processed, with bytes and a time estimate.")]
DeleteOpt = Annotated[bool, typer.Option("--delete", help="Remove the rows of inputs that are gone from SRC (like rsync --delete); without it they stay.")]
AddressOpt = Annotated[str, typer.Option(help="Ray address (default: RAY_ADDRESS or a local Ray).")]
NumActorsOpt = Annotated[int, typer.Option(help="Fixed number of model actors (0: scale between --min-actors and --max-actors).")]
MinActorsOpt = Annotated[int, typer.Option(help="Fewest model actors when scaling.")]
MaxActorsOpt = Annotated[int, typer.Option(help="Most model actors when scaling (0: as many as the cluster's CPUs or GPUs hold).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
EmbedderOpt = Annotated[str, typer.Option(help="Copy-detection embedder for the embedding column (path or shipped name).")]
RegionsOpt = Annotated[bool, typer.Option(help="Also store the embedder's vectors of 5 half-area windows per image (region_embeddings): search then finds crops of half an image. About 2.5x the embedder's cost; --no-regions writes nulls there (rows of this run only).")]


def _sigma(value: str) -> float | str | None:
    if value.strip().lower() == "auto":
        return None
    if value.strip().lower() == "blind":
        return "blind"
    try:
        v = float(value)
    except ValueError:
        raise typer.BadParameter("--sigma takes 'auto' or a number (0–255 units)") from None
    if not 0 <= v <= 255:
        raise typer.BadParameter("--sigma must be within 0–255")
    return v


def _ray_options(num_actors: int, num_gpus: float, batch_size: int, threads: int,
                 actor_cpus: float, address: str, min_actors: int = 1, max_actors: int = 0) -> "runner.RayOptions":
    from pipeline import runner

    if num_actors < 0 or min_actors < 1 or max_actors < 0:
        raise typer.BadParameter("--num-actors and --max-actors must be >= 0, --min-actors >= 1")
    if max_actors and max_actors < min_actors:
        raise typer.BadParameter("--max-actors must be at least --min-actors")
    return runner.RayOptions(num_actors=num_actors, min_actors=min_actors, max_actors=max_actors,
                             num_gpus=num_gpus, batch_size=batch_size, threads=threads,
                             actor_cpus=actor_cpus, address=address)


def _delete(delete: bool, limit: int) -> bool:
    if delete and limit:
        raise typer.BadParameter("--delete needs the whole listing: it cannot go with --limit")
    return delete


def _finish(result: "runner.JobResult", dst: str) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.manifest
    c = m["counts"]
    table = Table(title=f"aejob {m['job']} → {dst}", show_header=True)
    for col in ("status", "units", "shards", "ok", "error", "skipped", "rows/s", "seconds"):
        table.add_column(col)
    table.add_row(m["status"], str(c["units_listed"]), str(c["shards_published"]), str(c["rows_ok"]),
                  str(c["rows_error"]), str(c["skipped_files"] + c["skipped_members"]),
                  f"{m['timings']['rows_per_s']:.2f}", f"{m['timings']['total_s']:.1f}")
    Console(stderr=True).print(table)
    if not result.ok:
        typer.echo(f"FAILED: {m['reason']}", err=True)
    raise typer.Exit(result.exit_code)


def _run_spec(spec: "runner.JobSpec", out: str, dry_run: bool) -> None:
    """Shared tail of clean/compress: dry-run listing, or the job with its summary table."""
    import json

    from pipeline import layout, runner

    if dry_run:
        typer.echo(json.dumps(runner.dry_run(spec), indent=2))
        return
    try:
        result = runner.run_job(spec)
    except (layout.DstError, FileNotFoundError) as e:
        typer.echo(f"refused: {e}", err=True)
        raise typer.Exit(2) from None
    _finish(result, out)


@app.command()
def clean(
    src: SrcArg,
    out: DstOpt,
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "png",
    quality: Annotated[Optional[int], typer.Option(help="Output encoder quality (webp default 90, jpeg 92; png ignores it).")] = None,
    sigma: Annotated[str, typer.Option(help="Noise level: 'auto' (estimated per image), 'blind' (the network alone) or N in 0–255 units.")] = "auto",
    checkpoint: Annotated[str, typer.Option(help="Denoiser checkpoint (path or shipped name).")] = "denoiser-base",
    ensemble: Annotated[int, typer.Option(help="Average the model over 1, 2, 4 or 8 rotated/mirrored views (slower, a little cleaner).")] = 1,
    embedder: EmbedderOpt = "embedder-base",
    regions: RegionsOpt = True,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 4,
    num_actors: NumActorsOpt = 0,
    min_actors: MinActorsOpt = 1,
    max_actors: MaxActorsOpt = 0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per actor (0: CPU).")] = 0.0,
    threads: ThreadsOpt = 0,
    actor_cpus: ActorCpusOpt = 0.0,
    image_column: ImageColumnOpt = "image",
    max_error_rate: MaxErrorRateOpt = 1.0,
    max_pixels: MaxPixelsOpt = 100_000_000,
    shard_size: ShardSizeOpt = 256,
    limit: LimitOpt = 0,
    overwrite: OverwriteOpt = False,
    delete: DeleteOpt = False,
    dry_run: DryRunOpt = False,
    address: AddressOpt = "",
    device: DeviceOpt = "auto",
) -> None:
    """Denoise every image of SRC into a Parquet dataset at --out (one row per input)."""
    from jobs.clean import CleanConfig, build_spec
    from pipeline import encode
    from pipeline.tiling import ENSEMBLES

    if format not in encode.FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(encode.FORMATS)}")
    if ensemble not in ENSEMBLES:
        raise typer.BadParameter(f"--ensemble must be one of {', '.join(map(str, ENSEMBLES))}")
    cfg = CleanConfig(src=src, dst=out, format=format, quality=quality, sigma=_sigma(sigma),
                      checkpoint=checkpoint, image_column=image_column, max_pixels=max_pixels,
                      shard_size=shard_size, max_error_rate=max_error_rate, limit=limit,
                      overwrite=overwrite, device=device, ensemble=ensemble, delete=_delete(delete, limit),
                      embedder=embedder, regions=regions)
    spec = build_spec(cfg, _ray_options(num_actors, num_gpus, batch_size, threads, actor_cpus, address,
                                        min_actors, max_actors))
    _run_spec(spec, out, dry_run)


@app.command()
def compact(
    dst: Annotated[str, typer.Argument(help="A dataset written by aejob clean or compress (local or s3://).")],
    target_rows: Annotated[int, typer.Option(help="Rows per merged shard (shards under half of it are merged).")] = 256,
) -> None:
    """Merge the small shards that many small runs leave behind (under DST's lease)."""
    import time
    import uuid

    from pipeline import commit, layout, storage

    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-compact-" + uuid.uuid4().hex[:6]
    lease = layout.Lease(dst, run_id=run_id)
    try:
        lease.acquire()
    except layout.DstError as e:
        typer.echo(f"refused: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        out = commit.compact(dst, run_id, target_rows)
        storage.delete(storage.join(dst, layout.TMP, run_id))
    finally:
        lease.release()
    typer.echo(f"{out['small_shards']} small shards; merged {out['shards_removed']} into {out['merged_into']}")


@app.command()
def export(
    dst: Annotated[str, typer.Argument(help="A dataset written by aejob clean.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the images into.")],
) -> None:
    """Write the cleaned images of DST as files DIR/<key> (extension replaced by the format's)."""
    from pipeline.export import export_images

    counts = export_images(dst, str(out))
    typer.echo(f"wrote {counts['written']} images to {out} ({counts['skipped_error_rows']} error rows, "
               f"{counts['unsafe_keys']} unsafe keys skipped)")


@app.command()
def compress(
    src: SrcArg,
    out: DstOpt,
    quality: Annotated[Optional[int], typer.Option(help="Rate point 1..N (higher: more bits, higher fidelity); default: the checkpoint's. Not with --target-psnr/--max-bpp.")] = None,
    target_psnr: Annotated[Optional[float], typer.Option(help="Rate control: per image, the smallest quality whose decoded image reaches this PSNR in dB (none does: the top quality). With --max-bpp: searched within that cap. Each row records its quality, psnr and bpp.")] = None,
    max_bpp: Annotated[Optional[float], typer.Option(help="Rate control: per image, the highest quality whose stream is at most this many bits per pixel (none is: the lowest quality). Alone, or as the cap of --target-psnr.")] = None,
    checkpoint: Annotated[str, typer.Option(help="Codec checkpoint (path or shipped name).")] = "codec-avif",
    avif_speed: Annotated[Optional[int], typer.Option(help="AVIF-based codecs (codec-avif): libavif encoder speed 0 (slowest, fewest bits) .. 10; default the checkpoint's. Encoder-only: every speed's streams decode alike.")] = None,
    keep_if_smaller: Annotated[bool, typer.Option(help="Keep the source bytes (codec='original') where the bitstream is not smaller.")] = False,
    embedder: EmbedderOpt = "embedder-base",
    regions: RegionsOpt = True,
    num_actors: NumActorsOpt = 0,
    min_actors: MinActorsOpt = 1,
    max_actors: MaxActorsOpt = 0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per actor (0: CPU); the encoder's networks run there (codec-avif: the filter; AV1 and entropy coding stay on CPU).")] = 0.0,
    threads: ThreadsOpt = 0,
    actor_cpus: ActorCpusOpt = 0.0,
    image_column: ImageColumnOpt = "image",
    max_error_rate: MaxErrorRateOpt = 1.0,
    max_pixels: MaxPixelsOpt = 100_000_000,
    shard_size: ShardSizeOpt = 256,
    limit: LimitOpt = 0,
    overwrite: OverwriteOpt = False,
    delete: DeleteOpt = False,
    dry_run: DryRunOpt = False,
    address: AddressOpt = "",
    device: DeviceOpt = "auto",
) -> None:
    """Compress every image of SRC into entropy-coded latents in Parquet (one row per input).

    The quality is fixed (--quality, default the checkpoint's) unless rate control picks it per image: --target-psnr P, --max-bpp B, or both (P subject to B)."""
    from jobs.compress import CompressConfig, build_spec

    cfg = CompressConfig(src=src, dst=out, quality=quality, target_psnr=target_psnr, max_bpp=max_bpp,
                         checkpoint=checkpoint, keep_if_smaller=keep_if_smaller, avif_speed=avif_speed,
                         image_column=image_column, max_pixels=max_pixels, shard_size=shard_size,
                         max_error_rate=max_error_rate, limit=limit, overwrite=overwrite,
                         delete=_delete(delete, limit), embedder=embedder, regions=regions,
                         device=device)
    try:
        spec = build_spec(cfg, _ray_options(num_actors, num_gpus, 1, threads, actor_cpus, address, min_actors, max_actors))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _run_spec(spec, out, dry_run)


@app.command()
def decompress(
    dst: Annotated[str, typer.Argument(help="A dataset written by aejob compress.")],
    out: Annotated[str, typer.Option("--out", help="Folder (or s3:// prefix) for the decoded images.")],
    format: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "png",
    max_error_rate: Annotated[float, typer.Option(help="Exit non-zero when the error rate exceeds this.")] = 1.0,
    num_actors: NumActorsOpt = 0,
    address: AddressOpt = "",
) -> None:
    """Decode every row of DST to DIR/<key with its extension replaced> (errors become report rows)."""
    from jobs.compress import decompress as run_decompress

    report = run_decompress(dst, out, format, max_error_rate, _ray_options(num_actors, 0.0, 1, 0, 0.0, address))
    c = report["counts"]
    typer.echo(f"decoded {c['ok']} images to {out}: {c['error']} errors, {c['skipped']} rows skipped "
               f"(error rows of the dataset), {c['unsafe_keys']} unsafe keys")
    for k, e in list(report["errors"].items())[:10]:
        typer.echo(f"  error {k}: {e}", err=True)
    if report["status"] != "succeeded":
        typer.echo(f"FAILED: {report['reason']}", err=True)
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's input, dataset and report.")] = Path("aejob-demo"),
    sigma: Annotated[float, typer.Option(help="Noise added to the sample photos (0–255 units).")] = 25.0,
) -> None:
    """Noise sample photos shipped with scikit-image, clean them with the real job on local Ray,
    and write a before/after report with PSNR."""
    from jobs.demo import run_demo

    report, rows = run_demo(out, sigma)
    for r in rows:
        typer.echo(f"{r['name']:>22}: noisy {r['psnr_noisy']:.2f} dB -> cleaned {r['psnr_clean']:.2f} dB")
    typer.echo(f"report: {report.resolve()}")


@train_app.command("release")
def train_release(
    run_checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint (e.g. runs/denoiser-base/last).")],
    out: Annotated[Path, typer.Option(help="Release checkpoint path (float16).")] = Path("models/weights/denoiser-base"),
) -> None:
    """Turn a training checkpoint into a small float16 release checkpoint (training record kept)."""
    import torch

    from models import checkpoint

    ck = checkpoint.load(run_checkpoint)
    meta = {k: v for k, v in ck.meta.items() if k not in ("sha256", "file", "name", "config", "format_version", "_extra_tensors")}
    meta["released_from"] = {"file": ck.path.name, "sha256": ck.sha256}
    sha = checkpoint.save(out, ck.name, ck.config, ck.model, meta, dtype=torch.float16)
    typer.echo(f"{out.with_suffix('.safetensors')} sha256 {sha}")
    _export_if_engine(out.with_suffix(".safetensors"))


def _export_if_engine(ref: Path | str) -> None:
    """Denoisers and embedders get their ONNX export (the CPU engine's) beside them."""
    from models import checkpoint, export

    if checkpoint.read_meta(ref).get("name") in ("resunet-denoiser", "copy-embedder"):
        typer.echo(f"{export.export_onnx(ref)} (ONNX export for the CPU engine)")


@app.command("export-onnx")
def export_onnx(
    checkpoints: Annotated[list[str], typer.Argument(help="Denoiser or embedder checkpoints (paths or shipped names).")],
) -> None:
    """Write the ONNX export of each checkpoint beside it: CPU model actors then run ONNX Runtime
    and never import torch (about 1 s sooner to their first batch)."""
    from models import export

    for ref in checkpoints:
        typer.echo(str(export.export_onnx(ref)))


def _register_plugins() -> None:
    from jobs import bench_pipeline

    bench_pipeline.register(bench_app)
    for mod, target in (("jobs.bench", bench_app), ("jobs.bench_codec", bench_app), ("jobs.bench_scale", bench_app),
                        ("jobs.train_codec", train_app), ("jobs.train_restore", train_app), ("jobs.submit", app), ("jobs.verify", app),
                        ("jobs.train_embedder", train_app), ("jobs.search", app), ("jobs.bench_search", bench_app), ("jobs.report", app)):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        if hasattr(module, "register"):
            module.register(target)


_register_plugins()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
