"""``aejob bench codec`` with AVIF: clipped BD-rates, every codec's curve, BD-rate pairs and speed
in one run (a miniature on generated images: a tiny random codec next to a shipped one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs import bench_codec
from jobs.bench_codec import bd_rate
from tests.conftest import encode, make_image

PSNR = np.array([26.0, 28.0, 30.0, 32.0, 34.0, 36.0, 38.0, 40.0, 42.0])
LOG_RATE = np.log(0.1) + (PSNR - 26.0) * 0.25  # 0.10 .. 5.5 bpp


def test_clipped_bd_rate_integrates_only_inside_the_rate_range() -> None:
    rate = np.exp(LOG_RATE)
    # everywhere half the bits: -50% either way
    assert bd_rate(rate, PSNR, rate / 2, PSNR, (0.15, 2.5)) == pytest.approx(-50.0, abs=1e-6)
    # all points inside the range: the clip changes nothing
    inside = (rate >= 0.15) & (rate <= 2.5)
    r, p = rate[inside], PSNR[inside]
    assert bd_rate(r, p, r * 1.1, p, (0.01, 100.0)) == pytest.approx(bd_rate(r, p, r * 1.1, p))
    # the same curve up to the first point beyond 2.5 bpp, far cheaper only above it: the
    # clipped BD-rate does not see the difference, the overlap one does
    test = rate.copy()
    first_beyond = int(np.flatnonzero(rate > 2.5)[0])
    test[first_beyond + 1:] /= 4
    assert bd_rate(rate, PSNR, test, PSNR, (0.15, 2.5)) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(rate, PSNR, test, PSNR) < -5
    # no common PSNRs within the range: NaN
    assert math.isnan(bd_rate(rate, PSNR, rate * 50, PSNR, (0.15, 0.2)))


def test_bench_codec_adds_avif_and_every_codecs_speed(tmp_path: Path, tiny_codec: str) -> None:
    from jobs.cli import app

    if not bench_codec.avif_available():
        pytest.skip("this Pillow has no AVIF support")
    data = tmp_path / "set"
    data.mkdir()
    for i in range(2):  # 168 px short side: MS-SSIM's 5 scales fit
        (data / f"img{i}.png").write_bytes(encode(make_image(200, 168, i, noise=4)))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "codec", "--data", str(data), "--checkpoint", tiny_codec,
                                   "--checkpoint", "codec-small", "--out", str(out), "--suffix", "_mini",
                                   "--avif-speed", "8", "--speed-repeats", "1"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "codec_bench_mini.json").read_text())
    assert (out / "codec_rd_mini.png").stat().st_size > 0
    assert set(result["curves"]) == {"aejob", "codec-small", "jpeg", "webp", "avif"}
    avif = result["curves"]["avif"]
    assert [p["quality"] for p in avif] == list(bench_codec.AVIF_QUALITIES)
    assert all(np.isfinite(p["ms_ssim"]) and 0 < p["ms_ssim"] <= 1 for p in avif)
    assert avif[0]["bpp"] < avif[-1]["bpp"] and avif[0]["psnr"] < avif[-1]["psnr"]
    assert len(result["per_image"]["avif"]) == 2 * len(bench_codec.AVIF_QUALITIES)
    pinned = result["settings"]["avif"]
    assert pinned["speed"] == 8 and pinned["subsampling"] == "4:2:0" and pinned["max_threads"] == 2
    assert pinned["libavif"] and pinned["qualities"] == list(bench_codec.AVIF_QUALITIES)
    # the old keys stay; the AVIF pairs and the clipped table are added
    for table in (result["bd_rate_percent"], result["bd_rate_percent_clipped"]):
        keys = {"aejob_vs_jpeg", "aejob_vs_webp", "aejob_vs_avif", "webp_vs_jpeg", "avif_vs_jpeg",
                "avif_vs_webp", "codec-small_vs_avif"}
        assert keys <= set(table) and keys <= set(table["ms_ssim"])
        assert np.isfinite(table["avif_vs_jpeg"]) and np.isfinite(table["codec-small_vs_webp"])
    assert result["bd_rate_percent_clipped"]["range_bpp"] == [0.15, 2.5]
    assert result["checkpoint"]["path"] == result["learned"]["aejob"]["checkpoint"]["path"]
    assert result["speed"] == result["speed_all"]["aejob"]  # the first codec's, as before
    for name in ("aejob", "codec-small", "jpeg", "webp", "avif"):
        s = result["speed_all"][name]
        assert s["size"] == "768x512" and s["encode_images_per_s"] > 0 and s["decode_images_per_s"] > 0
    assert result["speed_all"]["avif"]["threads"] == 2 and result["speed_all"]["jpeg"]["threads"] == 1
    table = bench_codec.format_table(result)
    for text in ("aejob vs AVIF", "codec-small vs AVIF", "AVIF vs WebP", "0.15-2.5 bpp", "top PSNR: ",
                 "avif   encode"):
        assert text in table, table
    assert table in res.output


def test_bench_codec_without_avif_support(tmp_path: Path, tiny_codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_codec, "avif_available", lambda: False)
    data = tmp_path / "set"
    data.mkdir()
    (data / "a.png").write_bytes(encode(make_image(48, 40, 1)))
    result = bench_codec.bench_codec(data, tiny_codec, tmp_path / "out", speed_repeats=1)
    assert "avif" not in result["curves"] and result["settings"]["avif"] is None
    assert math.isnan(result["bd_rate_percent"]["aejob_vs_avif"])
    assert (tmp_path / "out" / "codec_bench.json").exists() and (tmp_path / "out" / "codec_rd.png").exists()
    assert "aejob vs AVIF n/a" in bench_codec.format_table(result)


def test_bench_codec_shows_an_avif_codecs_base_layer(tmp_path: Path, tiny_restore_codec: str) -> None:
    """An AVIF-based codec gets a second curve: its AV1 payload decoded without the filter, at
    the same stream bytes, so the filter's share and the base layer's settings are separable."""
    if not bench_codec.avif_available():
        pytest.skip("this Pillow has no AVIF support")
    data = tmp_path / "set"
    data.mkdir()
    (data / "a.png").write_bytes(encode(make_image(96, 80, 2, noise=5)))
    result = bench_codec.bench_codec(data, tiny_restore_codec, tmp_path / "out", speed_repeats=1)
    ours, base = result["curves"]["aejob"], result["curves"]["aejob-base"]
    assert [p["quality"] for p in ours] == [p["quality"] for p in base] == list(range(1, 9))
    for a, b in zip(ours, base, strict=True):
        assert a["bpp"] == b["bpp"] and a["psnr"] >= b["psnr"] - 0.02  # never worse than its base
    assert "aejob-base_vs_avif" in result["bd_rate_percent_clipped"]
    assert "aejob-base vs AVIF" in bench_codec.format_table(result)
