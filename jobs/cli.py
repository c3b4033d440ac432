"""The ``aejob`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Clean, compress and index large image datasets on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train the models that aejob ships.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
