"""End-to-end ``aejob clean`` on a local folder with real Ray and real Parquet read back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from jobs.clean import CleanConfig, build_spec
from jobs.cli import app
from pipeline import layout, runner
from tests.conftest import encode, make_image, make_tar


def run(src: Path | str, dst: Path | str, ck: str, **kw: object) -> runner.JobResult:
    cfg = CleanConfig(src=str(src), dst=str(dst), checkpoint=ck, shard_size=2, **kw)  # type: ignore[arg-type]
    return runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False)


def rows(dst: Path | str) -> list[dict]:
    return pads.dataset(str(dst), format="parquet").to_table().to_pylist()


@pytest.mark.usefixtures("ray_local")
def test_clean_folder_every_input_once(image_folder: Path, tmp_path: Path, tiny_checkpoint: str) -> None:
    dst = tmp_path / "out"
    res = run(image_folder, dst, tiny_checkpoint)
    assert res.ok, res.manifest
    got = {r["key"]: r for r in rows(dst)}
    assert set(got) == {"a.png", "b.JPG", "c.webp", "sub/d.png", "sub/e.png", "broken.jpg"}
    assert got["broken.jpg"]["status"] == "error" and got["broken.jpg"]["error"]
    assert got["broken.jpg"]["image"] is None
    for k in ("a.png", "b.JPG", "c.webp", "sub/d.png", "sub/e.png"):
        r = got[k]
        assert r["status"] == "ok" and r["error"] is None, r
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "PNG" and (img.width, img.height) == (r["width"], r["height"])
        assert len(r["embedding"]) == 256 and abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4
        assert r["source_bytes"] == (image_folder / k).stat().st_size
        assert r["model"] == "resunet-denoiser" and len(r["checkpoint_sha256"]) == 64
        assert r["noise_sigma"] >= 0
    assert (got["sub/e.png"]["width"], got["sub/e.png"]["height"]) == (1, 1)
    # every file that is not data starts with "_"; the manifest is there and counts right
    assert all(p.name.startswith("_") or p.suffix == ".parquet" for p in dst.iterdir())
    m = json.loads((dst / "_manifest.json").read_text())
    assert m["status"] == "succeeded"
    assert m["counts"]["rows_ok"] == 5 and m["counts"]["rows_error"] == 1
    assert m["counts"]["skipped_files"] == 1  # notes.txt
    assert m["model"]["sha256"] == got["a.png"]["checkpoint_sha256"]
    assert m["ray"]["actor_calls"] == 1  # no ONNX export beside the tiny checkpoint: torch, one call
    # DuckDB and a plain Parquet schema read agree: one row per key, explicit types
    n, distinct = duckdb.sql(f"select count(*), count(distinct key) from read_parquet('{dst}/*.parquet')").fetchall()[0]
    assert n == distinct == 6
    schema = pq.read_schema(next(dst.glob("*.parquet")))
    assert str(schema.field("image").type) == "large_binary"
    assert str(schema.field("embedding").type).startswith("fixed_size_list<element: float>[256]")


@pytest.mark.usefixtures("ray_local")
def test_rerun_skips_and_never_duplicates(image_folder: Path, tmp_path: Path, tiny_checkpoint: str) -> None:
    dst = tmp_path / "out"
    assert run(image_folder, dst, tiny_checkpoint).ok
    files_before = sorted(p.name for p in dst.glob("*.parquet"))
    # a rerun with the same settings does nothing new
    again = run(image_folder, dst, tiny_checkpoint)
    assert again.ok and again.manifest["counts"]["shards_published"] == 0
    assert sorted(p.name for p in dst.glob("*.parquet")) == files_before
    # the dataset grows: only the new file is processed, still one row per key
    (image_folder / "f.png").write_bytes(encode(make_image(30, 30, 9)))
    grown = run(image_folder, dst, tiny_checkpoint)
    assert grown.manifest["counts"]["rows_ok"] == 1
    keys = [r["key"] for r in rows(dst)]
    assert len(keys) == len(set(keys)) == 7
    # Ray Data pointed at DST sees the same rows (it skips the "_" files)
    import ray

    assert ray.data.read_parquet(str(dst)).count() == 7


@pytest.mark.usefixtures("ray_local")
def test_other_settings_refused_unless_overwrite(image_folder: Path, tmp_path: Path, tiny_checkpoint: str) -> None:
    dst = tmp_path / "out"
    assert run(image_folder, dst, tiny_checkpoint).ok
    with pytest.raises(layout.DstError, match="different settings.*format"):
        run(image_folder, dst, tiny_checkpoint, format="webp")
    res = run(image_folder, dst, tiny_checkpoint, format="webp", overwrite=True)
    assert res.ok
    got = rows(dst)
    assert len(got) == 6 and {r["image_format"] for r in got if r["status"] == "ok"} == {"webp"}


@pytest.mark.usefixtures("ray_local")
def test_tar_and_parquet_sources(tmp_path: Path, tiny_checkpoint: str) -> None:
    import pyarrow as pa

    src = tmp_path / "src"
    src.mkdir()
    (src / "shard-000.tar").write_bytes(make_tar([
        ("x/0001.jpg", encode(make_image(24, 16, 1), "JPEG")), ("x/0001.json", b"{}"),
        ("x/0002.png", encode(make_image(16, 16, 2))), ("x/0002.cls", b"3"),
        ("x/0003.png", b"\x89PNG\r\n\x1a\n broken")]))
    table = pa.table({"key": ["p/one", "p/two"],
                      "image": [encode(make_image(16, 24, 3)), encode(make_image(8, 8, 4), "WEBP")]})
    pq.write_table(table, src / "part-0.parquet")
    dst = tmp_path / "out"
    res = run(src, dst, tiny_checkpoint)
    assert res.ok, res.manifest
    got = {r["key"]: r for r in rows(dst)}
    assert set(got) == {"shard-000.tar/x/0001.jpg", "shard-000.tar/x/0002.png",
                        "shard-000.tar/x/0003.png", "p/one", "p/two"}
    assert got["shard-000.tar/x/0003.png"]["status"] == "error"
    assert (got["p/one"]["width"], got["p/one"]["height"]) == (16, 24)
    assert res.manifest["counts"]["skipped_members"] == 2
    # one output file per input container, named after it
    assert len(list(dst.glob("*.parquet"))) == 2


@pytest.mark.usefixtures("ray_local")
def test_max_error_rate_fails_loudly_and_keeps_rows(tmp_path: Path, tiny_checkpoint: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.png").write_bytes(encode(make_image(16, 16, 1)))
    for i in range(3):
        (src / f"bad{i}.jpg").write_bytes(b"garbage")
    dst = tmp_path / "out"
    res = run(src, dst, tiny_checkpoint, max_error_rate=0.5)
    assert not res.ok and res.exit_code == 1
    m = json.loads((dst / "_manifest.json").read_text())
    assert m["status"] == "failed" and "max-error-rate" in m["reason"]
    assert len(rows(dst)) == 4  # what was written stays


@pytest.mark.usefixtures("ray_local")
def test_cli_clean_export_and_dry_run(image_folder: Path, tmp_path: Path, tiny_checkpoint: str) -> None:
    dst, out = tmp_path / "out", tmp_path / "files"
    cli = CliRunner()
    dry = cli.invoke(app, ["clean", str(image_folder), "--out", str(dst), "--checkpoint", tiny_checkpoint, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["pending_units"] == 6
    (image_folder / "a.jpg").write_bytes(encode(make_image(10, 10, 7), "JPEG"))  # collides with a.png
    res = cli.invoke(app, ["clean", str(image_folder), "--out", str(dst), "--checkpoint", tiny_checkpoint,
                           "--format", "jpeg", "--quality", "80"])
    assert res.exit_code == 0, res.output
    exp = cli.invoke(app, ["export", str(dst), "--out", str(out)])
    assert exp.exit_code == 0, exp.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.jpg.jpg", "a.png.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "sub/e.jpg"]
    assert Image.open(out / "c.jpg").format == "JPEG"
