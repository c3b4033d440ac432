"""The CPU engine on ONNX Runtime: the torch engine's outputs, stale exports ignored, no torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from models import checkpoint, export
from pipeline.infer import DenoiseEngine
from pipeline.ort_engine import OrtDenoiseEngine, denoise_engine, onnx_ready
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exported(tiny_checkpoint: str, tmp_path: Path) -> str:
    """A copy of the tiny denoiser with its ONNX export, written by the CLI."""
    src = Path(tiny_checkpoint)
    for suffix in (".safetensors", ".json"):
        shutil.copy(src.with_suffix(suffix), tmp_path / f"tiny{suffix}")
    ref = str(tmp_path / "tiny.safetensors")
    res = CliRunner().invoke(app, ["export-onnx", ref])
    assert res.exit_code == 0, res.output
    return ref


def test_onnx_engine_gives_the_torch_engines_images_and_vectors(exported: str) -> None:
    images = [make_image(96, 72, i, noise=20) for i in range(3)] + [make_image(150, 130, 9, noise=20)]
    torch_eng = DenoiseEngine(exported, device="cpu", threads=1, tile=64)  # the last image is tiled
    ort_eng = OrtDenoiseEngine(exported, threads=1, tile=64)
    assert (ort_eng.name, ort_eng.sha256, ort_eng.multiple) == (torch_eng.name, torch_eng.sha256, torch_eng.multiple)
    for ensemble in (1, 2):
        a = torch_eng.clean(images, None, ensemble)
        b = ort_eng.clean(images, None, ensemble)
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.dtype == y.dtype == np.uint8
            diff = np.abs(x.astype(int) - y.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding, not another model
    va, ra = torch_eng.vectors(a, True)
    vb, rb = ort_eng.vectors(a, True)
    assert ort_eng.embedding_model == torch_eng.embedding_model
    assert np.abs(va - vb).max() < 1e-5 and ra is not None and rb is not None and np.abs(ra - rb).max() < 1e-5


def test_a_stale_export_is_never_used(exported: str) -> None:
    assert onnx_ready(exported, "embedder-base", "cpu")
    assert isinstance(denoise_engine(exported, device="cpu", threads=1), OrtDenoiseEngine)
    assert not onnx_ready(exported, "embedder-base", "cuda")  # a GPU takes the torch engine
    ck = checkpoint.load(exported)
    for p in ck.model.parameters():  # retrained: same name, other weights
        p.data.add_(0.01)
    checkpoint.save(exported, ck.name, ck.config, ck.model, {"kind": "denoiser"})
    assert export.find(exported) is None and not onnx_ready(exported, "embedder-base", "cpu")
    assert isinstance(denoise_engine(exported, device="cpu", threads=1), DenoiseEngine)


def test_a_cpu_denoise_actor_never_imports_torch(exported: str) -> None:
    """The point of the engine: the model actor's process loads no torch at all."""
    code = (
        "import sys, numpy as np\n"
        "from pipeline.actors import DenoiseActor\n"
        f"a = DenoiseActor({exported!r}, threads=1)\n"
        "img = np.random.default_rng(0).integers(0, 255, (40, 56, 3)).astype(np.uint8)\n"
        "out = a.engine.clean([img], 25.0)[0]\n"
        "v, r = a.engine.vectors([out], True)\n"
        "print(type(a.engine).__name__, out.shape, v.shape, r.shape, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert res.stdout.split() == ["OrtDenoiseEngine", "(40,", "56,", "3)", "(1,", "256)", "(1,", "5,", "256)", "False"]


def test_shipped_checkpoints_ship_current_exports() -> None:
    for name in ("denoiser-base", "embedder-base"):
        assert export.find(name) is not None, f"run `aejob export-onnx {name}`"
