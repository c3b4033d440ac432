"""Shared fixtures: a tiny denoiser checkpoint, generated images, a moto S3 server, local Ray."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    _GPU = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
except (OSError, subprocess.SubprocessError):
    _GPU = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not _GPU:
            item.add_marker(skip)


def make_image(w: int, h: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """A smooth colour pattern (so denoising has something to preserve), optional noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        128 + 100 * np.sin(xx / (7 + seed)), 128 + 100 * np.cos(yy / 9), (xx + yy) * 255 / max(1, w + h)
    ], -1)
    if noise:
        img = img + rng.normal(0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_tar(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar (a webdataset shard) of (member name, bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def race_leases(leases: list, refused_marker: str = "") -> list[str]:  # type: ignore[type-arg]
    """Acquire every lease at once from its own thread: "won", "refused" or "other: ..." each."""
    from pipeline import layout

    results: list[str] = []
    barrier = threading.Barrier(len(leases))

    def go(lease: layout.Lease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            results.append("won")
        except layout.DstError as e:
            results.append("refused" if refused_marker in str(e) else f"other: {e}")

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch

    from models import checkpoint, registry

    torch.manual_seed(0)
    cfg = registry.make_config("resunet-denoiser", "tiny")
    model = registry.build("resunet-denoiser", cfg)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    checkpoint.save(path, "resunet-denoiser", cfg, model, {"kind": "denoiser", "steps": 0})
    return str(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Five small images (PNG, JPEG, WebP; nested folder), one corrupt file, one sidecar."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(encode(make_image(40, 32, 1, noise=10)))
    (src / "b.JPG").write_bytes(encode(make_image(33, 17, 2), "JPEG", quality=90))
    (src / "c.webp").write_bytes(encode(make_image(64, 48, 3), "WEBP", quality=90))
    (src / "sub" / "d.png").write_bytes(encode(make_image(20, 24, 4)))
    (src / "sub" / "e.png").write_bytes(encode(make_image(1, 1, 5)))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "notes.txt").write_text("not an image")
    return src


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 endpoint (moto) on loopback; the AWS environment points at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):  # noqa: ARG001 - workers must inherit the S3 environment
    """One local Ray for the session (2 CPUs, as on CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _tiny_codec_checkpoint(name: str, folder: Path) -> str:
    """A randomly initialised tiny codec of registry ``name`` saved with its coding tables."""
    import torch

    from models import checkpoint, registry

    torch.manual_seed(0)
    model = registry.build(name, registry.make_config(name, "tiny"))
    model.eval()
    model.update_tables()  # type: ignore[operator]
    path = folder / f"tiny-{name}"
    checkpoint.save(path, name, model.config, model, {"kind": "codec"},  # type: ignore[arg-type]
                    extra_tensors=model.coding_tensors())  # type: ignore[operator]
    return str(path.with_suffix(".safetensors"))


@pytest.fixture(scope="session")
def tiny_restore_codec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny avif-restore-codec whose (random) filter is not the identity."""
    import torch

    from models import checkpoint, registry

    torch.manual_seed(0)
    model = registry.build("avif-restore-codec", registry.make_config("avif-restore-codec", "tiny"))
    torch.nn.init.normal_(model.post.out.weight, std=0.01)  # type: ignore[union-attr, arg-type]
    path = tmp_path_factory.mktemp("rcodec") / "tiny-avif-restore-codec"
    checkpoint.save(path, "avif-restore-codec", model.config, model, {"kind": "codec"})  # type: ignore[arg-type]
    return str(path.with_suffix(".safetensors"))


@pytest.fixture(scope="session")
def tiny_codec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny factorized codec checkpoint."""
    return _tiny_codec_checkpoint("factorized-codec", tmp_path_factory.mktemp("codec"))


@pytest.fixture(scope="session")
def tiny_hyper_codec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny mean-scale hyperprior codec checkpoint."""
    return _tiny_codec_checkpoint("hyperprior-codec", tmp_path_factory.mktemp("hcodec"))


@pytest.fixture(scope="session")
def tiny_checkerboard_codec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny hyperprior codec with a checkerboard context model."""
    return _tiny_codec_checkpoint("checkerboard-codec", tmp_path_factory.mktemp("ccodec"))
