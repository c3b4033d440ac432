"""Learned codec: round trips, stream validation, engine, training smoke run, BD-rate."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import bitstream, checkpoint, registry
from models.codec import NAME, CodecEngine, FactorizedCodec, macs_per_pixel

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> FactorizedCodec:
    torch.manual_seed(seed)
    model = registry.build(NAME, registry.make_config(NAME, "tiny"))
    assert isinstance(model, FactorizedCodec)
    model.eval()
    model.update_tables()
    return model


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy * 3) % 256, (yy * 5) % 256, (xx * yy) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_model()
    assert model.tables is not None
    path = tmp_path_factory.mktemp("ck") / "tiny-codec"
    checkpoint.save(path, NAME, model.config, model, {"kind": "codec"},
                    extra_tensors=model.tables.to_tensors())
    return path.with_suffix(".safetensors")


def test_registry_and_presets() -> None:
    assert NAME in registry.names("codec")
    for preset in ("tiny", "base"):
        cfg = registry.make_config(NAME, preset)
        assert cfg.multiple == 16 and cfg.num_qualities >= 4


def save_codec(model: FactorizedCodec, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a codec with its coding tables (or just ``tensors``); returns the .safetensors path."""
    extra = model.coding_tensors() if tensors is None else tensors
    checkpoint.save(path, model.stream_name, model.config, model, {"kind": "codec"}, extra_tensors=extra)
    return path.with_suffix(".safetensors")


def assert_round_trips(model: FactorizedCodec, hw: tuple[int, int]) -> None:
    """Deterministic streams and images of the right size at the lowest and highest quality."""
    img = image(*hw)
    for q in (1, model.config.num_qualities):
        data = model.compress(img, q)
        assert data == model.compress(img, q)
        a, b = model.decompress(data), model.decompress(data)
        assert a.shape == img.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        header, _ = bitstream.unpack(data)
        assert header.model == model.stream_name
        assert (header.width, header.height, header.quality) == (hw[1], hw[0], q)


@pytest.mark.parametrize("hw", [(1, 1), (17, 33), (37, 53), (16, 32)])
def test_round_trip_shapes_and_determinism(hw: tuple[int, int]) -> None:
    assert_round_trips(tiny_model(), hw)


def test_invalid_inputs() -> None:
    model = tiny_model()
    with pytest.raises(ValueError):
        model.compress(image(8, 8), 0)
    with pytest.raises(ValueError):
        model.compress(image(8, 8), model.config.num_qualities + 1)
    with pytest.raises(ValueError):
        model.compress(image(8, 8).astype(np.float32), 1)  # type: ignore[arg-type]
    with pytest.raises(bitstream.BitstreamError):
        model.decompress(b"not a stream at all")


def test_engine_checks_checkpoint_id(ckpt: Path, tmp_path: Path) -> None:
    engine = CodecEngine(str(ckpt), threads=1)
    assert engine.name == NAME and engine.qualities == list(range(1, 7))
    assert engine.default_quality in engine.qualities
    img = image(40, 24)
    data = engine.compress(img, 2)
    assert engine.decompress(data).shape == img.shape
    # same stream claiming another checkpoint (CRC recomputed so only the id is wrong)
    header, payload = bitstream.unpack(data)
    forged = bitstream.pack(
        bitstream.Header(**{**header.__dict__, "sha256_prefix": b"\x01" * 8}), payload)
    with pytest.raises(bitstream.BitstreamError, match="checkpoint"):
        engine.decompress(forged)
    # a stream from a different checkpoint
    other = tiny_model(seed=1)
    path = tmp_path / "other"
    assert other.tables is not None
    checkpoint.save(path, NAME, other.config, other, {"kind": "codec"},
                    extra_tensors=other.tables.to_tensors())
    with pytest.raises(bitstream.BitstreamError, match="checkpoint"):
        CodecEngine(str(path)).decompress(data)


def test_engine_needs_tables(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "notables"
    checkpoint.save(path, NAME, model.config, model, {"kind": "codec"})
    with pytest.raises(checkpoint.CheckpointError, match="entropy tables"):
        CodecEngine(str(path))


def assert_forged_payloads_raise_or_decode(engine: CodecEngine, data: bytes, tries: int, lengths: int = 1) -> None:
    """Forged streams (CRC recomputed) with junk payloads, every other one behind ``lengths``
    plausible 4-byte part lengths (the side stream's, then a second pass's): each is a clean
    BitstreamError or an image of the original's size, never a crash."""
    header, payload = bitstream.unpack(data)
    rng = np.random.default_rng(0)
    for k in range(tries):
        junk = rng.integers(0, 256, max(0, len(payload) + 4 * int(rng.integers(-2, 3)))).astype(np.uint8)
        at = 0
        for _ in range(lengths if k % 2 == 0 else 0):
            if at + 4 > len(junk):
                break
            n = int(rng.integers(0, max(1, (len(junk) - at) // 2)))
            junk[at : at + 4] = np.frombuffer(n.to_bytes(4, "big"), np.uint8)
            at += 4 + n
        try:
            out = engine.decompress(bitstream.pack(header, junk.tobytes()))
        except bitstream.BitstreamError:
            continue
        assert out.shape == (header.height, header.width, 3)


def assert_truncations_and_bit_flips_raise(engine: CodecEngine, data: bytes, flip_every: int) -> None:
    """Every 3rd truncation and every ``flip_every``-th single-bit flip is a BitstreamError."""
    for n in range(0, len(data), 3):
        with pytest.raises(bitstream.BitstreamError):
            engine.decompress(data[:n])
    for i in range(0, len(data) * 8, flip_every):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(bitstream.BitstreamError):
            engine.decompress(bytes(bad))


def test_corrupted_streams_raise_not_crash(ckpt: Path) -> None:
    engine = CodecEngine(str(ckpt))
    assert_truncations_and_bit_flips_raise(engine, engine.compress(image(33, 47), 4), flip_every=5)


def test_payload_garbage_behind_a_valid_crc_raises_or_decodes(ckpt: Path) -> None:
    """A forged stream (CRC recomputed) with a damaged payload: clean error or an image."""
    engine = CodecEngine(str(ckpt))
    data = engine.compress(image(20, 20), 3)
    header, payload = bitstream.unpack(data)
    rng = np.random.default_rng(0)
    for _ in range(20):
        junk = rng.integers(0, 256, len(payload) + 4 * int(rng.integers(-1, 2))).astype(np.uint8)
        try:
            out = engine.decompress(bitstream.pack(header, junk.tobytes()))
        except bitstream.BitstreamError:
            continue
        assert out.shape == (20, 20, 3)
    # a header whose sizes disagree with the latent shape
    bad = bitstream.pack(bitstream.Header(**{**header.__dict__, "width": 200}), payload)
    with pytest.raises(bitstream.BitstreamError, match="inconsistent"):
        engine.decompress(bad)
    # the CRC field itself is checked
    off = len(data) - len(payload) - 4
    wrong = data[:off] + struct.pack(">I", zlib.crc32(b"x")) + data[off + 4 :]
    with pytest.raises(bitstream.BitstreamError, match="CRC"):
        engine.decompress(wrong)


def test_macs_per_pixel_counts_by_hand() -> None:
    model = tiny_model()
    macs = macs_per_pixel(model)
    # N = M = 8, k = 5: convs 3*8*25/4 + 8*8*25/16 + 8*8*25/64 + 8*8*25/256, GDN 64/4+64/16+64/64
    expect = 150 + 100 + 25 + 6.25 + 16 + 4 + 1
    assert macs["encoder"] == pytest.approx(expect)
    assert macs["decoder"] == pytest.approx(expect)


def _photo_dir(root: Path) -> Path:
    from skimage import data as skdata

    root.mkdir()
    src = skdata.astronaut()
    for i, name in enumerate(["001", "002", "003", "041"]):
        crop = src[40 * i : 40 * i + 96, 60 * i : 60 * i + 128]
        Image.fromarray(crop).save(root / f"{name}.png")
    return root


def test_training_smoke_lowers_loss_and_checkpoints(tmp_path: Path) -> None:
    from jobs.train_codec import CodecTrainConfig, run

    data = _photo_dir(tmp_path / "photos")
    cfg = CodecTrainConfig(
        data=str(data), out=str(tmp_path / "run"), preset="tiny", steps=20, lr=2e-3, warmup=2,
        batch=6, crop=32, threads=1, eval_every=10, save_every=10, eval_crop=64,
        release=str(tmp_path / "release"),
    )
    result = run(cfg, workers=0)
    curve = result["curve"]
    assert [p["step"] for p in curve] == [10, 20]
    assert curve[1]["loss"] < curve[0]["loss"]
    held = curve[-1]["holdout"]
    assert [p["quality"] for p in held] == list(range(1, 7))
    assert all(p["bpp"] > 0 and p["psnr"] > 0 for p in held)
    for ref in (tmp_path / "run" / "last", tmp_path / "release"):
        engine = CodecEngine(str(ref))
        img = image(30, 30)
        assert engine.decompress(engine.compress(img)).shape == img.shape
    resumed = run(CodecTrainConfig(**{**cfg.__dict__, "steps": 22, "release": "",
                                      "resume": str(tmp_path / "run" / "last")}), workers=0)
    assert resumed["steps"] == 22 and resumed["curve"][-1]["step"] == 22


def test_bd_rate_on_synthetic_curves() -> None:
    from jobs.bench_codec import bd_rate

    psnr = np.array([28.0, 30.0, 32.0, 34.0, 36.0])
    rate = np.array([0.2, 0.35, 0.6, 0.95, 1.5])
    assert bd_rate(rate, psnr, rate / 2, psnr) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(rate, psnr, rate, psnr) == pytest.approx(0.0, abs=1e-6)
    assert bd_rate(rate, psnr, rate * 1.25, psnr) == pytest.approx(25.0, abs=1e-6)
    # different sampling of the same curve (log-rate linear in PSNR): 0
    lr = lambda p: np.log(0.2) + (p - 28) * 0.25  # noqa: E731
    p2 = np.array([29.0, 31.5, 33.0, 35.5])
    assert bd_rate(np.exp(lr(psnr)), psnr, np.exp(lr(p2)), p2) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(bd_rate(rate, psnr, rate, psnr + 20))


def test_cli_registration() -> None:
    import typer
    from typer.testing import CliRunner

    from jobs import bench_codec, train_codec

    app = typer.Typer()
    train_app, bench_app = typer.Typer(), typer.Typer()
    app.add_typer(train_app, name="train")
    app.add_typer(bench_app, name="bench")
    train_codec.register(train_app)
    bench_codec.register(bench_app)
    runner = CliRunner()
    for args in (["train", "codec", "--help"], ["bench", "codec", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    assert "--max-minutes" in runner.invoke(app, ["train", "codec", "--help"]).output
