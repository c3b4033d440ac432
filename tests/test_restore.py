"""avif-restore-codec: AV1 base layer + learned restoration filter (models/restore.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from models import avif, bitstream, registry
from models.codec import CodecEngine
from models.metrics import psnr_uint8
from models.restore import STRENGTH_MAX, STRENGTH_STEP, AvifRestoreCodec
from tests.conftest import make_image

pytestmark = pytest.mark.skipif(not avif.available(), reason="Pillow without AVIF")


@pytest.fixture(scope="module")
def engine(tiny_restore_codec: str) -> CodecEngine:
    return CodecEngine(tiny_restore_codec, threads=1)


def photo(w: int = 96, h: int = 72, seed: int = 0) -> np.ndarray:
    return make_image(w, h, seed, noise=6)


def test_round_trip_every_rung(engine: CodecEngine) -> None:
    img = photo()
    sizes = []
    for q in engine.qualities:
        data = engine.compress(img, q)
        header, payload = bitstream.unpack(data)
        assert (header.model, header.quality, header.width, header.height) == ("avif-restore-codec", q, 96, 72)
        out = engine.decompress(data)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert payload[3:7] == avif.encode(img, engine.config.avif_qualities[q - 1])[:4]  # the AVIF file's box
        sizes.append(len(data))
    assert sizes == sorted(sizes) and len(engine.qualities) == 8


@pytest.mark.parametrize("size", [(1, 1), (17, 9), (33, 20)])
def test_odd_and_tiny_sizes(engine: CodecEngine, size: tuple[int, int]) -> None:
    img = make_image(*size, 3)
    out = engine.decompress(engine.compress(img, 4))
    assert out.shape == img.shape


def test_never_worse_than_its_avif_base(engine: CodecEngine) -> None:
    """The encoder's per-channel strengths make the decode at least as good as plain AVIF."""
    for seed in range(3):
        img = photo(seed=seed)
        for q in (1, 5, 8):
            data = engine.compress(img, q)
            _, strengths, payload = engine.model.parse(data)
            base = avif.decode(payload)
            assert psnr_uint8(engine.decompress(data), img) >= psnr_uint8(base, img) - 0.02
            assert all(0 <= k <= STRENGTH_MAX for k in strengths)


def test_fit_strengths_is_least_squares() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    base = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    err = torch.from_numpy(img.astype(np.float32) - base.astype(np.float32)).permute(2, 0, 1) / 255
    fit = AvifRestoreCodec.fit_strengths
    assert fit(img, base, err) == (STRENGTH_STEP,) * 3  # the exact correction: strength 1
    assert fit(img, base, 2 * err) == (STRENGTH_STEP // 2,) * 3
    assert fit(img, base, -err) == (0, 0, 0)  # a harmful correction is switched off
    assert fit(img, base, err / 100) == (STRENGTH_MAX,) * 3  # capped
    exact = AvifRestoreCodec.blend(base, err, (STRENGTH_STEP,) * 3)
    assert np.array_equal(exact, img)


def test_tiles_match_one_pass(engine: CodecEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from models import restore

    torch.manual_seed(1)
    model = registry.build("avif-restore-codec", registry.make_config("avif-restore-codec", "base")).eval()
    assert isinstance(model, AvifRestoreCodec)
    torch.nn.init.normal_(model.post.out.weight, std=0.01)  # type: ignore[union-attr, arg-type]
    base = photo(150, 101, 4)
    whole = model.correction(base, 3)
    monkeypatch.setattr(restore, "TILE", 32)
    tiled = model.correction(base, 3)
    assert whole.shape == (3, 101, 150)
    assert torch.allclose(whole, tiled, atol=1e-5)


def test_bad_streams_are_refused(engine: CodecEngine, tiny_checkerboard_codec: str) -> None:
    data = engine.compress(photo(), 3)
    with pytest.raises(bitstream.BitstreamError):
        engine.decompress(data[:-10])
    corrupt = bytearray(data)
    corrupt[-20] ^= 0xFF
    with pytest.raises(bitstream.BitstreamError):
        engine.decompress(bytes(corrupt))
    with pytest.raises(bitstream.BitstreamError, match="checkpoint"):
        engine.model.decompress(data, sha256="00" * 32)
    with pytest.raises(bitstream.BitstreamError, match="model"):
        CodecEngine(tiny_checkerboard_codec).decompress(data)
    # a valid stream whose AVIF is not the announced size
    header, payload = bitstream.unpack(data)
    other = avif.encode(photo(40, 40), 50)
    wrong = bitstream.pack(header, payload[:3] + other)
    with pytest.raises(bitstream.BitstreamError, match="header says"):
        engine.decompress(wrong)
    bad_strength = bitstream.pack(header, bytes([STRENGTH_MAX + 1, 0, 0]) + payload[3:])
    with pytest.raises(bitstream.BitstreamError, match="strength"):
        engine.decompress(bad_strength)


def test_rate_control(engine: CodecEngine) -> None:
    img = photo(80, 64, 7)
    coded = {q: engine.compress_controlled(img, q) for q in engine.qualities}
    target = coded[5].psnr - 0.01
    got = engine.compress_controlled(img, target_psnr=target)
    want = min(q for q, c in coded.items() if c.psnr >= target)
    assert got.quality == want and got.psnr >= target
    cap = coded[3].bpp + 1e-9
    assert engine.compress_controlled(img, max_bpp=cap).quality == max(q for q, c in coded.items() if c.bpp <= cap)


def test_train_restore_smoke(tmp_path: Path) -> None:
    """`aejob train restore` on tiny generated photos: a loadable checkpoint with its curve."""
    from jobs.cli import app

    data = tmp_path / "photos"
    data.mkdir()
    for i in (1, 2, 41):
        Image.fromarray(photo(64, 48, i)).save(data / f"{i:03d}.png")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "restore", "--data", str(data), "--out", str(out), "--preset", "tiny",
                                   "--steps", "6", "--eval-every", "3", "--batch", "8", "--crop", "32",
                                   "--eval-crop", "32", "--threads", "1", "--release", str(out / "rel"),
                                   "--release-speed", "9"])
    assert res.exit_code == 0, res.output
    eng = CodecEngine(str(out / "rel.safetensors"))
    assert eng.name == "avif-restore-codec"
    img = photo(50, 30, 9)
    assert eng.decompress(eng.compress(img)).shape == img.shape
    import json

    meta = json.loads((out / "rel.json").read_text())
    assert meta["steps"] == 6 and len(meta["curve"]) == 2
    # the release encodes at --release-speed; the training set was coded at the model's speed
    assert meta["config"]["speed"] == 9 and eng.model.settings().speed == 9
    last = json.loads((out / "last.json").read_text())
    assert meta["avif"]["training_set_speed"] == 6 and last["config"]["speed"] == 6
    assert {"psnr_avif", "psnr", "gain_db", "bpp"} <= set(meta["curve"][-1]["holdout"][0])
    assert len(list((out / "avif").glob("*.avif"))) == 2 * 8  # cached: training photos x rungs


def test_avif_speed_is_an_encoder_setting(tiny_restore_codec: str, tmp_path: Path) -> None:
    """compress --avif-speed: another libavif effort for the encoder; streams decode alike."""
    from jobs.compress import CompressConfig, build_spec
    from pipeline import runner

    fast = CodecEngine(tiny_restore_codec, threads=1, avif_speed=10)
    default = CodecEngine(tiny_restore_codec, threads=1)
    assert fast.model.settings().speed == 10 and default.model.settings().speed == default.config.speed
    img = photo(64, 48, 4)
    data = fast.compress(img, 4)
    assert np.array_equal(default.decompress(data), fast.decompress(data))
    with pytest.raises(ValueError, match="AVIF-based"):
        CodecEngine("codec-small", avif_speed=4)
    with pytest.raises(ValueError, match="0..10"):
        CodecEngine(tiny_restore_codec, avif_speed=11)
    src = str(tmp_path)
    spec = build_spec(CompressConfig(src=src, dst=src + "/z", checkpoint=tiny_restore_codec, avif_speed=8),
                      runner.RayOptions())
    assert spec.actor_kwargs["avif_speed"] == 8 and spec.resolved["avif_speed"] == 8
    assert "avif_speed" not in spec.fingerprint  # encoder-only: a rerun at another speed keeps the DST
    with pytest.raises(ValueError, match="AVIF-based"):
        build_spec(CompressConfig(src=src, dst=src + "/z", checkpoint="codec-small", avif_speed=4),
                   runner.RayOptions())


@pytest.mark.parametrize("size", [(96, 72), (33, 20), (530, 40)])  # 530: more than one filter tile
def test_the_encoders_decode_is_the_decoders(engine: CodecEngine, size: tuple[int, int]) -> None:
    """compress_and_decode hands back exactly what decompress makes of its stream (rate control
    and the job's PSNR use it instead of running the filter a second time)."""
    img = make_image(*size, 5, noise=6)
    for q in (1, 4, 8):
        data, decoded = engine.model.compress_and_decode(img, q, engine.sha256)
        assert data == engine.compress(img, q)
        assert np.array_equal(decoded, engine.decompress(data))
    coded = engine.compress_controlled(img, target_psnr=30.0)
    assert np.array_equal(coded.image, engine.decompress(coded.data))
