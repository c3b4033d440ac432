"""``aejob compress`` / ``aejob decompress`` end to end on local Ray with a tiny codec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from jobs.compress import CompressConfig, build_spec, decompress
from pipeline import runner

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.parametrize("codec", ["tiny_codec", "tiny_hyper_codec", "tiny_checkerboard_codec",
                                   "tiny_restore_codec"])
def test_compress_then_decompress(image_folder: Path, tmp_path: Path, codec: str,
                                  request: pytest.FixtureRequest) -> None:
    tiny_codec = request.getfixturevalue(codec)
    dst, out = tmp_path / "z", tmp_path / "decoded"
    res = runner.run_job(build_spec(CompressConfig(src=str(image_folder), dst=str(dst), checkpoint=tiny_codec,
                                                   quality=2), runner.RayOptions()), progress=False)
    assert res.ok, res.manifest
    rows = {r["key"]: r for r in pads.dataset(str(dst), format="parquet").to_table().to_pylist()}
    assert set(rows) == {"a.png", "b.JPG", "c.webp", "sub/d.png", "sub/e.png", "broken.jpg"}
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["latent"] is None
    for k in ("a.png", "b.JPG", "c.webp", "sub/d.png", "sub/e.png"):
        r = rows[k]
        assert r["status"] == "ok" and r["codec"] == "aejob" and r["latent"][:4] == b"AEJB"
        assert r["bpp"] == pytest.approx(len(r["latent"]) * 8 / (r["width"] * r["height"]))
        # measured; AV1 at 4:4:4 may code a flat tiny image exactly (inf), the learned codecs never do
        assert (np.isfinite(r["psnr"]) or codec == "tiny_restore_codec") and r["psnr"] > 5
        assert len(r["embedding"]) == 256  # embedder-base, as clean
        assert r["quality"] == 2  # a fixed quality: every row records it
    schema = pq.read_schema(next(dst.glob("*.parquet")))
    assert str(schema.field("latent").type) == "large_binary"

    report = decompress(str(dst), str(out))
    assert report["counts"]["ok"] == 5 and report["counts"]["error"] == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert files == ["a.png", "b.png", "c.png", "sub/d.png", "sub/e.png"]
    assert Image.open(out / "b.png").size == (rows["b.JPG"]["width"], rows["b.JPG"]["height"])


def test_corrupt_bitstream_is_an_error_row_not_a_crash(image_folder: Path, tmp_path: Path, tiny_codec: str) -> None:
    dst = tmp_path / "z"
    assert runner.run_job(build_spec(CompressConfig(src=str(image_folder), dst=str(dst), checkpoint=tiny_codec),
                                     runner.RayOptions()), progress=False).ok
    f = next(p for p in dst.glob("*.parquet") if "a.png" in pq.read_table(p, columns=["key"])["key"].to_pylist())
    t = pq.read_table(f).to_pylist()
    for r in t:
        if r["key"] == "a.png":
            r["latent"] = r["latent"][: len(r["latent"]) // 2]  # truncated
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(f)), f)
    cli = CliRunner().invoke(app, ["decompress", str(dst), "--out", str(tmp_path / "o"), "--max-error-rate", "0.1"])
    assert cli.exit_code == 1, cli.output
    report = json.loads((tmp_path / "o" / "_aejob_decompress.json").read_text())
    assert report["counts"]["error"] == 1 and "a.png" in report["errors"]
    assert report["counts"]["ok"] == 4


def test_keep_if_smaller_keeps_source_bytes(tmp_path: Path, tiny_codec: str) -> None:
    from tests.conftest import encode, make_image

    src = tmp_path / "src"
    src.mkdir()
    tiny_png = encode(np.zeros((8, 8, 3), np.uint8), "GIF")  # ~40 bytes: smaller than any bitstream header
    (src / "flat.png").write_bytes(tiny_png)
    (src / "pattern.png").write_bytes(encode(make_image(48, 48, 1, noise=30)))
    dst = tmp_path / "z"
    cfg = CompressConfig(src=str(src), dst=str(dst), checkpoint=tiny_codec, keep_if_smaller=True)
    assert runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False).ok
    rows = {r["key"]: r for r in pads.dataset(str(dst), format="parquet").to_table().to_pylist()}
    assert rows["flat.png"]["codec"] == "original" and rows["flat.png"]["latent"] == tiny_png
    assert rows["flat.png"]["quality"] is None and rows["pattern.png"]["quality"] is not None
    report = decompress(str(dst), str(tmp_path / "o"))
    assert report["counts"]["ok"] == 2
    decoded = np.asarray(Image.open(tmp_path / "o" / "flat.png").convert("RGB"))
    assert np.array_equal(decoded, np.zeros((8, 8, 3), np.uint8))


def test_bad_quality_is_refused(image_folder: Path, tmp_path: Path, tiny_codec: str) -> None:
    res = CliRunner().invoke(app, ["compress", str(image_folder), "--out", str(tmp_path / "z"),
                                   "--checkpoint", tiny_codec, "--quality", "99"])
    assert res.exit_code == 2 and "quality" in res.output


def test_decompress_finds_the_checkpoint_by_sha256(tiny_codec: str, tmp_path: Path) -> None:
    """The manifest's checkpoint path is used while it exists with the right sha256; an archive
    moved to another install (path gone) decodes with the shipped checkpoint of that sha256."""
    from jobs.compress import DEFAULT_CODEC, checkpoint_for
    from models import checkpoint

    sha = checkpoint.read_meta(tiny_codec)["sha256"]
    assert checkpoint_for({"config": {"checkpoint": tiny_codec}}, {sha}) == tiny_codec
    shipped = checkpoint.resolve(DEFAULT_CODEC)
    shipped_sha = checkpoint.read_meta(shipped)["sha256"]
    assert checkpoint.shipped_with_sha256(shipped_sha) == [shipped]
    gone = {"config": {"checkpoint": str(tmp_path / "moved" / "codec.safetensors")}}
    assert checkpoint_for(gone, {shipped_sha}) == str(shipped)
    # a recorded path whose file now has another sha256 is not trusted
    assert checkpoint_for({"config": {"checkpoint": tiny_codec}}, {shipped_sha}) == str(shipped)
    assert checkpoint_for({}, set()) == DEFAULT_CODEC
    import inspect

    from jobs import cli

    assert inspect.signature(cli.compress).parameters["checkpoint"].default == DEFAULT_CODEC
    # every codec checkpoint ever shipped still ships: archives made with them must decode
    for name in ("codec-small", "codec-hyper", "codec-wide", DEFAULT_CODEC):
        assert checkpoint.resolve(name).exists()


def test_clean_and_compress_write_the_same_embedding_space(image_folder: Path, tmp_path: Path, tiny_codec: str,
                                                           tiny_checkpoint: str, ray_local: Any) -> None:
    from jobs.clean import CleanConfig
    from jobs.clean import build_spec as clean_spec
    from models.embedder import EmbedderEngine
    from pipeline.decode import decode_image

    cfg = CompressConfig(src=str(image_folder), dst=str(tmp_path / "c"), checkpoint=tiny_codec)
    assert runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False).ok
    assert runner.run_job(clean_spec(CleanConfig(src=str(image_folder), dst=str(tmp_path / "d"),
                                                 checkpoint=tiny_checkpoint), runner.RayOptions()), progress=False).ok
    eng = EmbedderEngine("embedder-base", device="cpu")
    for dst in ("c", "d"):
        rows = pads.dataset(str(tmp_path / dst), format="parquet").to_table(
            columns=["key", "status", "embedding", "embedding_model"]).to_pylist()
        ok = [r for r in rows if r["status"] == "ok"]
        assert ok and {r["embedding_model"] for r in ok} == {eng.model_id}
        assert all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4 for r in ok)
    # compress embeds the source image: exactly what the embedder gives for it, float32 on CPU
    row = next(r for r in pads.dataset(str(tmp_path / "c"), format="parquet").to_table().to_pylist()
               if r["key"] == "a.png")
    want = eng.embed([decode_image((image_folder / "a.png").read_bytes()).pixels])[0]
    assert np.allclose(row["embedding"], want, atol=1e-6)
