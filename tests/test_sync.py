"""Incremental sync: a rerun processes new and changed inputs, replaces changed rows, keeps the
rows of deleted sources unless --delete, and every raw Parquet reader sees one row per key."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as pads
import pytest

from jobs.clean import CleanConfig, build_spec
from pipeline import runner
from tests.conftest import encode, make_image


def run(src: Path, dst: Path, ck: str, **kw: Any) -> runner.JobResult:
    kw.setdefault("shard_size", 3)
    cfg = CleanConfig(src=str(src), dst=str(dst), checkpoint=ck, **kw)
    res = runner.run_job(build_spec(cfg, runner.RayOptions()), progress=False)
    assert res.ok, res.manifest
    return res


def rows(dst: Path) -> dict[str, dict[str, Any]]:
    t = pads.dataset(str(dst), format="parquet").to_table(columns=["key", "run_id", "source_sha256", "status"])
    out: dict[str, dict[str, Any]] = {}
    for r in t.to_pylist():
        assert r["key"] not in out, f"{r['key']} twice"
        out[r["key"]] = r
    return out


def write(path: Path, seed: int) -> None:
    path.write_bytes(encode(make_image(40, 30, seed=seed, noise=8)))


def test_three_run_sync_new_changed_deleted(tmp_path: Path, tiny_checkpoint: str, ray_local: Any) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(7):
        write(src / f"im{i}.png", i)
    r1 = run(src, dst, tiny_checkpoint).manifest
    c = r1["counts"]
    assert (c["new"], c["changed"], c["unchanged"], c["deleted"]) == (7, 0, 0, 0)
    first = rows(dst)
    assert set(first) == {f"im{i}.png" for i in range(7)}
    assert {r["run_id"] for r in first.values()} == {r1["run_id"]}

    # run 2: two new, one changed (new content, new mtime), one deleted
    write(src / "im7.png", 70)
    write(src / "im8.png", 80)
    time.sleep(0.01)
    write(src / "im2.png", 200)
    os.utime(src / "im2.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    (src / "im5.png").unlink()
    r2 = run(src, dst, tiny_checkpoint).manifest
    c = r2["counts"]
    assert (c["new"], c["changed"], c["unchanged"], c["deleted"], c["gone_not_deleted"]) == (2, 1, 5, 0, 1)
    second = rows(dst)
    assert set(second) == {f"im{i}.png" for i in range(9)}  # im5 stays without --delete
    assert second["im2.png"]["run_id"] == r2["run_id"]
    assert second["im2.png"]["source_sha256"] != first["im2.png"]["source_sha256"]
    assert second["im0.png"]["run_id"] == r1["run_id"]  # unchanged rows untouched
    assert second["im7.png"]["run_id"] == r2["run_id"]

    # run 3: --delete removes im5's row; nothing else is processed
    r3 = run(src, dst, tiny_checkpoint, delete=True).manifest
    c = r3["counts"]
    assert (c["new"], c["changed"], c["unchanged"], c["deleted"]) == (0, 0, 8, 1)
    third = rows(dst)
    assert set(third) == {f"im{i}.png" for i in range(9)} - {"im5.png"}
    # every raw reader agrees: DuckDB over the top-level files, one row per key
    n, distinct = duckdb.sql(f"select count(*), count(distinct key) from read_parquet('{dst}/*.parquet')").fetchall()[0]
    assert n == distinct == 8
    assert r3["dataset"]["rows"] == 8
    runs = sorted(json.loads(p.read_text())["counts"]["new"] for p in (dst / "_runs").glob("*.json"))
    assert runs == [0, 2, 7]


def test_delete_needs_the_whole_listing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jobs.cli import app

    res = CliRunner().invoke(app, ["clean", str(tmp_path), "--out", str(tmp_path / "d"), "--delete", "--limit", "3"])
    assert res.exit_code != 0 and "--delete" in res.output


@pytest.mark.parametrize("n_changed", [1])
def test_changed_container_replaces_its_shard(tmp_path: Path, tiny_checkpoint: str, ray_local: Any,
                                              n_changed: int) -> None:
    from tests.conftest import make_tar

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    tar = src / "pack.tar"
    tar.write_bytes(make_tar([(f"m/{j}.png", encode(make_image(24, 20, seed=j))) for j in range(3)]))
    run(src, dst, tiny_checkpoint)
    tar.write_bytes(make_tar([(f"m/{j}.png", encode(make_image(24, 20, seed=10 + j))) for j in range(2)]))
    os.utime(tar, ns=(time.time_ns(), time.time_ns() + 10**9))
    c = run(src, dst, tiny_checkpoint).manifest["counts"]
    assert c["changed"] == n_changed
    assert set(rows(dst)) == {"pack.tar/m/0.png", "pack.tar/m/1.png"}  # the shard was replaced whole


def test_compact_merges_small_shards_and_resume_still_skips(tmp_path: Path, tiny_checkpoint: str,
                                                             ray_local: Any) -> None:
    from typer.testing import CliRunner

    from jobs.cli import app

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for night in range(4):  # four small "nightly" runs: one new file each → four 1-row shards
        write(src / f"n{night}.png", night)
        run(src, dst, tiny_checkpoint, shard_size=8)
    assert len(list(dst.glob("*.parquet"))) == 4
    res = CliRunner().invoke(app, ["compact", str(dst), "--target-rows", "8"])
    assert res.exit_code == 0, res.output
    files = list(dst.glob("*.parquet"))
    assert len(files) == 1 and len(list((dst / "_markers").glob("*.json"))) == 1
    assert set(rows(dst)) == {f"n{i}.png" for i in range(4)}
    assert not (dst / "_lease.json").exists()
    again = run(src, dst, tiny_checkpoint, shard_size=8).manifest["counts"]
    assert (again["new"], again["changed"], again["unchanged"]) == (0, 0, 4)
