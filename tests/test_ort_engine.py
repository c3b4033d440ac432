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


def _rows(images: list[np.ndarray], tag: str) -> dict[str, np.ndarray]:
    """A decoded batch as the CPU stage hands it to the model actor."""
    def col(values: list[object]) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {"key": col([f"{tag}{i}" for i in range(len(images))]), "status": col(["ok"] * len(images)),
            "kind": col(["item"] * len(images)), "pixels": col([im.tobytes() for im in images]),
            "height": np.asarray([im.shape[0] for im in images]), "width": np.asarray([im.shape[1] for im in images]),
            "noise_sigma": np.asarray([20.0] * len(images))}


def test_concurrent_calls_of_one_actor_split_its_threads_and_give_sequential_outputs(exported: str) -> None:
    """`aejob clean` runs two calls of a CPU actor at once (actor_calls): each call's ORT sessions
    get half the actor's threads, and calls running together give what they give one by one."""
    from concurrent.futures import ThreadPoolExecutor

    from jobs.clean import actor_calls
    from pipeline.actors import DenoiseActor

    assert actor_calls(exported, "embedder-base", "auto", 0) == 2
    assert actor_calls(exported, "embedder-base", "auto", 1) == 1  # GPU actors: one batch fills the device
    assert actor_calls(exported, "embedder-base", "cuda", 0) == 1
    one_thread = DenoiseActor(exported, threads=1, calls=2)  # many actors on a node: no oversubscription
    assert one_thread.parallel == 1 and one_thread.engine.net.session.get_session_options().intra_op_num_threads == 1
    actor = DenoiseActor(exported, threads=2, calls=2)
    assert isinstance(actor.engine, OrtDenoiseEngine) and actor.parallel == 2
    assert actor.engine.net.session.get_session_options().intra_op_num_threads == 1
    batches = [_rows([make_image(70 + 8 * j, 60, 10 * b + j, noise=20) for j in range(2)], f"b{b}-") for b in range(6)]
    alone = [actor({k: v.copy() for k, v in b.items()}) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(actor, [{k: v.copy() for k, v in b.items()} for b in batches]))
    for a, t in zip(alone, together):
        assert list(a["key"]) == list(t["key"])
        assert [bytes(p) for p in a["pixels"]] == [bytes(p) for p in t["pixels"]]
        assert [bytes(e) for e in a["embedding"]] == [bytes(e) for e in t["embedding"]]
    # and what the engine gives for those images directly
    imgs = [np.frombuffer(p, np.uint8).reshape(h, w, 3) for p, h, w in
            zip(batches[0]["pixels"], batches[0]["height"], batches[0]["width"])]
    cleaned = actor.engine.clean(imgs, [20.0, 20.0])
    vecs, _ = actor.engine.vectors(cleaned, True)
    assert [bytes(p) for p in alone[0]["pixels"]] == [c.tobytes() for c in cleaned]
    assert [bytes(e) for e in alone[0]["embedding"]] == [v.tobytes() for v in vecs]


def test_torch_engine_forced_means_one_call_at_a_time(exported: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.clean import actor_calls

    monkeypatch.setenv("AEJOB_ENGINE", "torch")
    assert actor_calls(exported, "embedder-base", "auto", 0) == 1
