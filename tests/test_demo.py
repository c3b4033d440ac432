"""The README's demo command, and the shipped denoiser really denoising (and doing no harm)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.demo import psnr, sample_images
from models.noise import add_awgn_uint8
from pipeline.infer import DenoiseEngine


@pytest.mark.usefixtures("ray_local")
def test_demo_command_writes_report(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    report = tmp_path / "demo" / "report.html"
    assert report.exists() and "data:image/png;base64" in report.read_text()
    gains = [float(line.split("cleaned ")[1].split(" dB")[0]) - float(line.split("noisy ")[1].split(" dB")[0])
             for line in res.output.splitlines() if "-> cleaned" in line]
    assert len(gains) == 5 and min(gains) > 3.0, res.output
    # the shipped checkpoints have ONNX exports: CPU actors ran two model calls at once
    manifest = json.loads((tmp_path / "demo" / "cleaned" / "_manifest.json").read_text())
    assert manifest["ray"]["actor_calls"] == 2


def test_shipped_denoiser_denoises_and_does_no_harm() -> None:
    eng = DenoiseEngine("denoiser-base", device="cpu")
    img = sample_images()["astronaut"][128:384, 128:384]
    noisy = add_awgn_uint8(img, 25, seed=0)
    assert psnr(eng.denoise_one(noisy), img) > psnr(noisy, img) + 6
    # an already clean image comes out (nearly) unchanged, never blurred
    clean = np.ascontiguousarray(sample_images()["coffee"][100:356, 100:356])
    assert psnr(eng.denoise_one(clean), clean) > 40
