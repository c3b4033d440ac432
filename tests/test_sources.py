"""SRC listing and the read stage: streamed listings (local, S3, S3 Inventory, Parquet key
lists), shard planning, and streamed container reads with the per-unit end row."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources, storage
from pipeline.sources import Unit
from tests.conftest import encode, make_image, make_tar

REPO = Path(__file__).resolve().parents[1]


def png(seed: int, size: int = 8) -> bytes:
    return encode(make_image(size, size, seed))


def s3() -> Any:
    return storage.s3_client()


def keys(src: str, stats: sources.ListingStats | None = None) -> list[str]:
    return [u.key for u in sources.iter_units(src, stats)]


# ---- listing ------------------------------------------------------------------------------


def test_local_listing_streams_in_key_byte_order_with_versions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in ("a.png", "a/x.png", "a0.jpg", "b/c/d.PNG", "z.tar", "p.parquet", ".hidden/h.png",
                "b/.DS_Store.png", "notes.txt", "b/readme.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x" * len(rel))
    stats = sources.ListingStats()
    units = list(sources.iter_units(str(src), stats))
    # "a.png" < "a/x.png" < "a0.jpg": full keys in byte order, not a per-folder name sort
    assert [u.key for u in units] == ["a.png", "a/x.png", "a0.jpg", "b/c/d.PNG", "p.parquet", "z.tar"]
    assert [u.key for u in units] == sorted(u.key for u in units)
    assert [u.kind for u in units] == ["file", "file", "file", "file", "parquet", "tar"]
    for u in units:
        assert u.uri == str(src / u.key) and u.size == len(u.key)
        assert u.version == str(os.stat(u.uri).st_mtime_ns)
    assert (stats.units, stats.bytes, stats.skipped) == (6, sum(u.size for u in units), 2)
    assert stats.skipped_examples == ["b/readme.md", "notes.txt"]
    listing = sources.list_source(str(src))
    assert listing.units == units and listing.skipped == ["b/readme.md", "notes.txt"]
    assert listing.total_bytes == stats.bytes
    single = sources.list_source(str(src / "a" / "x.png"))
    assert [(u.key, u.uri) for u in single.units] == [("x.png", str(src / "a" / "x.png"))]
    with pytest.raises(FileNotFoundError, match="source not found"):
        list(sources.iter_units(str(tmp_path / "nope")))


def test_local_walk_survives_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "s" / "d").mkdir(parents=True)
    (tmp_path / "s" / "d" / "i.png").write_bytes(b"x")
    os.symlink(tmp_path / "s", tmp_path / "s" / "d" / "loop")
    assert keys(str(tmp_path / "s")) == ["d/i.png"]


def test_s3_listing_is_paged_sorted_and_versioned(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s3().create_bucket(Bucket="lst")
    names = ["raw/b.png", "raw/a.jpg", "raw/a/x.png", "raw/a0.webp", "raw/t.tar", "raw/.hidden/h.png",
             "raw/sub/", "raw/n.txt", "raw2/other.png", "top.png"]
    for i, k in enumerate(names):
        s3().put_object(Bucket="lst", Key=k, Body=b"" if k.endswith("/") else png(i))
    calls = []
    real = storage.s3_client()

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def list_objects_v2(self, **kw: Any) -> Any:
            calls.append(kw)
            return real.list_objects_v2(**kw)

    monkeypatch.setattr(storage, "s3_client", lambda: Counting())
    monkeypatch.setattr(sources, "LIST_PAGE_KEYS", 2)
    stats = sources.ListingStats()
    units = list(sources.iter_units("s3://lst/raw/", stats))
    assert [u.key for u in units] == ["a.jpg", "a/x.png", "a0.webp", "b.png", "t.tar"]
    assert len(calls) == 4 and all(c["MaxKeys"] == 2 and c["Prefix"] == "raw/" for c in calls)  # 8 objects
    assert stats.skipped == 1 and stats.skipped_examples == ["n.txt"]
    for u in units:
        head = real.head_object(Bucket="lst", Key=f"raw/{u.key}")
        assert u.uri == f"s3://lst/raw/{u.key}" and u.size == head["ContentLength"]
        etag = head["ETag"].strip('"')
        assert u.version == f"{etag}@{head['LastModified'].strftime('%Y-%m-%dT%H:%M:%SZ')}"
    # a single object: the same version from its HEAD as from the listing
    assert sources.list_source("s3://lst/raw/b.png").units == [
        Unit("b.png", "s3://lst/raw/b.png", "file", units[3].size, units[3].version)]
    assert keys("s3://lst") == ["raw/a.jpg", "raw/a/x.png", "raw/a0.webp", "raw/b.png", "raw/t.tar",
                                "raw2/other.png", "top.png"]
    with pytest.raises(FileNotFoundError, match="source not found"):
        list(sources.iter_units("s3://lst/missing"))


class FakeS3:
    """A bucket of ``n`` keys served in ListObjectsV2 pages; counts the list calls."""

    def __init__(self, n: int) -> None:
        self.keys = [f"big/img{i:05d}.png" for i in range(n)]
        self.calls = 0

    def head_object(self, **kw: Any) -> Any:
        err = Exception("404")
        err.response = {"Error": {"Code": "404"}}  # type: ignore[attr-defined]
        raise err

    def list_objects_v2(self, Bucket: str, MaxKeys: int, Prefix: str = "",  # noqa: N803 - boto3's names
                        ContinuationToken: str = "0") -> dict[str, Any]:
        self.calls += 1
        start = int(ContinuationToken)
        page = [k for k in self.keys[start:start + MaxKeys] if k.startswith(Prefix)]
        end = start + MaxKeys
        out: dict[str, Any] = {"Contents": [{"Key": k, "Size": 10, "ETag": '"e"'} for k in page],
                               "IsTruncated": end < len(self.keys)}
        if out["IsTruncated"]:
            out["NextContinuationToken"] = str(end)
        return out


def test_iter_units_does_not_materialise_the_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeS3(3000)
    monkeypatch.setattr(storage, "s3_client", lambda: fake)
    stats = sources.ListingStats()
    it = sources.iter_units("s3://fake/big", stats)
    first = next(it)
    assert first.key == "img00000.png" and first.version == "e@"
    assert fake.calls == 1 and stats.units == 1  # one page listed, one unit out
    rest = list(it)
    assert fake.calls == 3 and len(rest) == 2999 and stats.units == 3000 and stats.bytes == 30000
    # planning streams too: the first shard comes out after one page
    fake2 = FakeS3(3000)
    monkeypatch.setattr(storage, "s3_client", lambda: fake2)
    shard = next(sources.iter_shards(sources.iter_units("s3://fake/big"), 100))
    assert len(shard.units) == 100 and fake2.calls == 1


# ---- S3 Inventory -------------------------------------------------------------------------

INV_OBJECTS = ["photos/a b.png", "photos/plus+1.jpg", "photos/ü/c.png", "photos/t.tar", "photos/.hidden/x.png",
               "photos/readme.txt"]


def _inventory_bucket() -> dict[str, dict[str, Any]]:
    """Source objects in bucket inv-src; their HEADs."""
    client = s3()
    for b in ("inv-src", "inv-dest"):
        try:
            client.create_bucket(Bucket=b)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
    heads = {}
    for i, k in enumerate(INV_OBJECTS):
        client.put_object(Bucket="inv-src", Key=k, Body=png(i, 8 + i))
        heads[k] = client.head_object(Bucket="inv-src", Key=k)
    return heads


def _manifest(fmt: str, schema: str, files: list[str]) -> bytes:
    return json.dumps({
        "sourceBucket": "inv-src", "destinationBucket": "arn:aws:s3:::inv-dest", "version": "2016-11-30",
        "creationTimestamp": "1514944800000", "fileFormat": fmt, "fileSchema": schema,
        "files": [{"key": f, "size": 1, "MD5checksum": "0"} for f in files],
    }).encode()


def _expected(heads: dict[str, dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    out = []
    for k in INV_OBJECTS:
        if ".hidden" in k or k.endswith(".txt"):
            continue
        h = heads[k]
        v = f"{h['ETag'].strip(chr(34))}@{h['LastModified'].strftime('%Y-%m-%dT%H:%M:%SZ')}"
        out.append((k, f"s3://inv-src/{k}", int(h["ContentLength"]), v))
    return out


def test_s3_inventory_csv(s3_server: dict[str, str], tmp_path: Path) -> None:
    heads = _inventory_bucket()
    base = "inventory/inv-src/daily"
    rows = []
    for k in INV_OBJECTS:
        h = heads[k]
        rows.append(["inv-src", k, "v2", "true", "false", str(h["ContentLength"]),
                     h["LastModified"].strftime("%Y-%m-%dT%H:%M:%S.000Z"), h["ETag"].strip('"')])
    # an older version and a delete marker are not current objects
    rows.insert(1, ["inv-src", "photos/old.png", "v1", "false", "false", "5", "2020-01-01T00:00:00.000Z", "x"])
    rows.append(["inv-src", "photos/gone.png", "v3", "true", "true", "", "2020-01-01T00:00:00.000Z", ""])
    files = []
    for n, part in enumerate((rows[:3], rows[3:])):  # two data files, read one after the other
        text = "".join(",".join(f'"{quote_plus(v, safe="") if j == 1 else v}"' for j, v in enumerate(r)) + "\n"
                       for r in part)
        files.append(f"{base}/data/part-{n}.csv.gz")
        s3().put_object(Bucket="inv-dest", Key=files[-1], Body=gzip.compress(text.encode()))
    manifest = _manifest("CSV", "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag",
                         files)
    s3().put_object(Bucket="inv-dest", Key=f"{base}/2024-01-01T00-00Z/manifest.json", Body=manifest)
    stats = sources.ListingStats()
    units = list(sources.iter_units(f"s3://inv-dest/{base}/2024-01-01T00-00Z/manifest.json", stats))
    assert [(u.key, u.uri, u.size, u.version) for u in units] == _expected(heads)
    assert stats.skipped == 1 and stats.skipped_examples == ["photos/readme.txt"]
    assert all(storage.exists(u.uri) for u in units)  # decoded keys name the real objects
    # the inventory's versions equal the listing's: switching SRC forms re-processes nothing
    listed = {u.key: u.version for u in sources.iter_units("s3://inv-src")}
    assert all(listed[u.key] == u.version for u in units)
    # a manifest downloaded next to us still reads its data files from the destination bucket
    (tmp_path / "manifest.json").write_bytes(manifest)
    assert [u.key for u in sources.iter_units(str(tmp_path / "manifest.json"))] == [u.key for u in units]


def test_s3_inventory_parquet_and_orc(s3_server: dict[str, str], tmp_path: Path) -> None:
    heads = _inventory_bucket()
    base = "inventory/inv-src/weekly"
    ks = INV_OBJECTS + ["photos/old.png", "photos/gone.png"]
    table = pa.table({
        "bucket": ["inv-src"] * len(ks),
        "key": ks,
        "version_id": ["v"] * len(ks),
        "is_latest": [True] * len(INV_OBJECTS) + [False, True],
        "is_delete_marker": [False] * len(INV_OBJECTS) + [False, True],
        "size": [int(heads[k]["ContentLength"]) for k in INV_OBJECTS] + [5, None],
        "last_modified_date": pa.array([heads[k]["LastModified"] for k in INV_OBJECTS] + [None, None],
                                       pa.timestamp("ms", tz="UTC")),
        "e_tag": [heads[k]["ETag"].strip('"') for k in INV_OBJECTS] + ["x", None],
        "storage_class": ["STANDARD"] * len(ks),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)
    s3().put_object(Bucket="inv-dest", Key=f"{base}/data/d.parquet", Body=buf.getvalue())
    schema = ("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional binary "
              "version_id (UTF8); optional boolean is_latest; optional boolean is_delete_marker; optional int64 size; "
              "optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8); "
              "optional binary storage_class (UTF8);}")
    (tmp_path / "manifest.json").write_bytes(_manifest("Parquet", schema, [f"{base}/data/d.parquet"]))
    units = list(sources.iter_units(str(tmp_path / "manifest.json")))
    assert [(u.key, u.uri, u.size, u.version) for u in units] == _expected(heads)
    (tmp_path / "orc.json").write_bytes(_manifest("ORC", "struct<bucket:string,key:string>", ["x.orc"]))
    with pytest.raises(ValueError, match="ORC inventory reports are not supported"):
        list(sources.iter_units(str(tmp_path / "orc.json")))
    (tmp_path / "other.json").write_text('{"not": "a manifest"}')
    assert sources.list_source(str(tmp_path / "other.json")).skipped == ["other.json"]


# ---- Parquet key lists --------------------------------------------------------------------


def test_parquet_key_list(s3_server: dict[str, str], tmp_path: Path) -> None:
    imgs = tmp_path / "data" / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.jpg", "t.tar"):
        (imgs / rel).write_bytes(b"x")
    lst = tmp_path / "data" / "list.parquet"
    # local uris, absolute and relative to the list's folder; keys from the folder they share
    pq.write_table(pa.table({"uri": [str(imgs / "a.png"), "imgs/sub/b.jpg", None, str(imgs / "notes.txt"),
                                     str(imgs / "t.tar")]}), lst, row_group_size=2)
    stats = sources.ListingStats()
    units = list(sources.iter_units(str(lst), stats))
    assert [(u.key, u.uri, u.kind) for u in units] == [
        ("a.png", str(imgs / "a.png"), "file"), ("sub/b.jpg", str(imgs / "sub" / "b.jpg"), "file"),
        ("t.tar", str(imgs / "t.tar"), "tar")]
    assert stats.skipped == 2 and stats.skipped_examples == ["<row 2>", "notes.txt"]
    # S3 uris: key after the bucket; key, size and version columns taken as given; row order kept
    pq.write_table(pa.table({"uri": ["s3://b1/x/2.png", "s3://b2/y/1.png", "s3://b1/z.png"],
                             "key": ["two.png", None, "zz.png"], "size": pa.array([5, 6, None], pa.int64()),
                             "version": ["v1", None, "v3"]}), lst)
    assert list(sources.iter_units(str(lst))) == [
        Unit("two.png", "s3://b1/x/2.png", "file", 5, "v1"), Unit("y/1.png", "s3://b2/y/1.png", "file", 6, ""),
        Unit("zz.png", "s3://b1/z.png", "file", 0, "v3")]
    # on S3 too
    s3().create_bucket(Bucket="klist")
    s3().put_object(Bucket="klist", Key="lists/k.parquet", Body=lst.read_bytes())
    assert [u.key for u in sources.iter_units("s3://klist/lists/k.parquet")] == ["two.png", "y/1.png", "zz.png"]
    # a Parquet of image bytes keeps its meaning: one unit of images
    pq.write_table(pa.table({"uri": ["s3://b/k.png"], "image": [b"\x89PNG"]}), lst)
    assert [(u.key, u.kind) for u in sources.iter_units(str(lst))] == [("list.parquet", "parquet")]


# ---- shards ---------------------------------------------------------------------------------


def _old_plan_shards(units: list[Unit], shard_size: int) -> list[sources.Shard]:
    """The plan before streaming: containers, then the loose files in chunks."""
    shards, loose = [], []
    for u in units:
        if u.kind == "file":
            loose.append(u)
        else:
            shards.append(sources.Shard(sources.shard_name_for([u.key], u.kind), (u,)))
    for i in range(0, len(loose), max(1, shard_size)):
        chunk = loose[i:i + shard_size]
        shards.append(sources.Shard(sources.shard_name_for([u.key for u in chunk], "file"), tuple(chunk)))
    return shards


def test_iter_shards_keeps_the_shard_names_of_plan_shards() -> None:
    # existing DSTs must keep their shard names
    assert sources.shard_name_for(["a.png", "b/c.jpg"], "file") == "files-cd63f7c8f1b4c66a"
    assert sources.shard_name_for(["x/y.tar"], "tar") == "x_y.tar-d086aa61"
    kinds = ["file"] * 7 + ["tar", "parquet"]
    units = sorted((Unit(f"k{i:02d}.{'png' if k == 'file' else k}", f"/s/{i}", k, i) for i, k in
                    enumerate(kinds * 3)), key=lambda u: u.key)
    for size in (1, 4, 5, 100):
        new = list(sources.iter_shards(iter(units), size))
        assert sorted(new, key=lambda s: s.name) == sorted(_old_plan_shards(units, size), key=lambda s: s.name)
        assert sources.plan_shards(units, size) == new
    # a container goes out at once, before the listing goes on
    def listing() -> Iterator[Unit]:
        yield Unit("a.png", "/a", "file", 1)
        yield Unit("t.tar", "/t", "tar", 1)
        raise AssertionError("listed too far")
    assert next(sources.iter_shards(listing(), 10)).name == sources.shard_name_for(["t.tar"], "tar")


# ---- read stage -----------------------------------------------------------------------------


def plan_batch(units: list[tuple[str, str, str]], shard: str = "s", version: bool = True) -> dict[str, np.ndarray]:
    def col(vals: list[str]) -> np.ndarray:
        arr = np.empty(len(vals), dtype=object)
        arr[:] = vals
        return arr
    batch = {"unit": col([u[0] for u in units]), "uri": col([u[1] for u in units]),
             "kind": col([u[2] for u in units]), "shard": col([shard] * len(units)),
             "size": np.zeros(len(units), np.int64)}
    if version:
        batch["version"] = col([f"v-{u[0]}" for u in units])
    return batch


def read_rows(batch: dict[str, np.ndarray], **kw: Any) -> list[dict[str, Any]]:
    rows = []
    for out in sources.read_units(batch, **kw):
        n = len(out["key"])
        assert set(out) == set(sources.ITEM_COLUMNS) and 0 < n <= sources.READ_CHUNK_ROWS
        rows += [{c: out[c][i] for c in out} for i in range(n)]
    return rows


def by_unit(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per unit, checking the protocol: items, then exactly one end row with their count."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["unit"], []).append(r)
    for unit, rs in out.items():
        *items, end = rs
        assert end["kind"] == "meta" and end["key"] == f"{unit}#end" and end["status"] == "ok"
        assert end["data"] is None and end["unit_items"] == len(items)
        assert all(r["kind"] == "item" and r["unit_items"] == 0 for r in items)
    return out


def test_read_units_streams_containers_and_ends_every_unit(tmp_path: Path) -> None:
    imgs = [png(i, 8 + i) for i in range(24)]
    tar = tmp_path / "t.tar"
    tar.write_bytes(make_tar([("a.png", imgs[0]), ("./a.png", imgs[1]), ("a.json", b"{}"), ("d/c.jpg", imgs[2])]
                             + [(f"m{i:02d}.png", imgs[i]) for i in range(3, 23)]))
    empty = tmp_path / "e.tar"
    empty.write_bytes(make_tar([("only.txt", b"x")]))
    par = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": ["k1", "k2", "k1", "k3"], "image": [imgs[0], imgs[1], imgs[2], None],
                             "other": [1, 2, 3, 4]}), par, row_group_size=3)
    nokey = tmp_path / "n.parquet"
    pq.write_table(pa.table({"img": [imgs[5], imgs[6]]}), nokey)
    (tmp_path / "f.png").write_bytes(imgs[23])
    batch = plan_batch([("t.tar", str(tar), "tar"), ("e.tar", str(empty), "tar"), ("p.parquet", str(par), "parquet"),
                        ("f.png", str(tmp_path / "f.png"), "file"), ("gone.png", str(tmp_path / "gone.png"), "file")])
    units = by_unit(read_rows(batch))
    t = units["t.tar"]
    assert [r["key"] for r in t[:3]] == ["t.tar/a.png", "t.tar/a.png#2", "t.tar/d/c.jpg"]
    assert len(t) == 24 and t[-1]["skipped_members"] == 1
    assert t[0]["source_uri"] == f"{tar}#a.png" and t[1]["source_bytes"] == len(imgs[1])
    assert all(r["source_version"] == "v-t.tar" and r["shard"] == "s" for r in t)
    assert t[2]["data"] == imgs[2] and t[2]["source_sha256"] == __import__("hashlib").sha256(imgs[2]).hexdigest()
    assert units["e.tar"] == [units["e.tar"][0]] and units["e.tar"][0]["skipped_members"] == 1
    p = units["p.parquet"]
    assert [(r["key"], r["status"]) for r in p[:-1]] == [("k1", "ok"), ("k2", "ok"), ("k1#dup2", "error"),
                                                          ("k3", "error")]
    assert p[2]["error"] == "duplicate key 'k1' in source" and p[3]["error"] == "null 'image' value"
    assert p[1]["source_uri"] == f"{par}#row=1"
    f = units["f.png"]
    assert len(f) == 2 and f[0]["key"] == "f.png" and f[0]["data"] == imgs[23]
    g = units["gone.png"]
    assert len(g) == 2 and g[0]["key"] == "gone.png" and g[0]["status"] == "error"
    assert g[0]["error"].startswith("read failed: FileNotFoundError")
    # another image column; no key column: <file>/<row>; no version column: ""
    n = by_unit(read_rows(plan_batch([("n.parquet", str(nokey), "parquet")], version=False), image_column="img"))
    assert [r["key"] for r in n["n.parquet"]] == ["n.parquet/0", "n.parquet/1", "n.parquet#end"]
    assert n["n.parquet"][0]["source_version"] == ""
    wrong = by_unit(read_rows(plan_batch([("n.parquet", str(nokey), "parquet")])))["n.parquet"]
    assert wrong[0]["key"] == "n.parquet#error"
    assert "unreadable Parquet: ValueError: no column 'image'" in wrong[0]["error"]


def test_truncated_tar_and_corrupt_parquet_keep_what_was_read(tmp_path: Path) -> None:
    members = [(f"m{i}.png", png(i, 40)) for i in range(6)]
    blob = make_tar(members)
    offset = blob.index(members[3][1])  # cut inside the fourth member's data
    (tmp_path / "cut.tar").write_bytes(blob[:offset + 100])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    # Parquet: a corrupt third row group behind two good ones
    par = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(8)], "image": [png(i, 30) for i in range(8)]}),
                   par, row_group_size=2, compression="zstd")
    meta = pq.ParquetFile(par).metadata
    col = meta.row_group(2).column(1)
    raw = bytearray(par.read_bytes())
    start = col.data_page_offset + 40
    raw[start:start + 400] = b"\xff" * 400
    par.write_bytes(bytes(raw))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    units = by_unit(read_rows(plan_batch([(n, str(tmp_path / n), "tar" if n.endswith("tar") else "parquet")
                                          for n in ("cut.tar", "junk.tar", "bad.parquet", "junk.parquet")])))
    cut = units["cut.tar"]
    assert [r["key"] for r in cut] == ["cut.tar/m0.png", "cut.tar/m1.png", "cut.tar/m2.png", "cut.tar#error",
                                       "cut.tar#end"]
    assert cut[3]["status"] == "error" and cut[3]["error"].startswith("unreadable tar: ReadError")
    assert cut[-1]["unit_items"] == 4 and all(r["data"] == m[1] for r, m in zip(cut[:3], members))
    assert [r["key"] for r in units["junk.tar"]] == ["junk.tar#error", "junk.tar#end"]
    bad = units["bad.parquet"]
    assert [r["key"] for r in bad] == ["k0", "k1", "k2", "k3", "bad.parquet#error", "bad.parquet#end"]
    assert bad[4]["error"].startswith("unreadable Parquet: ") and bad[-1]["unit_items"] == 5
    assert [r["key"] for r in units["junk.parquet"]] == ["junk.parquet#error", "junk.parquet#end"]


def test_read_units_streams_from_s3_and_archived_containers_are_error_rows(s3_server: dict[str, str]) -> None:
    s3().create_bucket(Bucket="rdb")
    members = [(f"m{i}.png", png(i, 16)) for i in range(5)]
    s3().put_object(Bucket="rdb", Key="t.tar", Body=make_tar(members))
    s3().put_object(Bucket="rdb", Key="cold.tar", Body=make_tar(members), StorageClass="GLACIER")
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [m[1] for m in members]}), buf, row_group_size=2)
    s3().put_object(Bucket="rdb", Key="p.parquet", Body=buf.getvalue())
    units = by_unit(read_rows(plan_batch([("t.tar", "s3://rdb/t.tar", "tar"), ("cold.tar", "s3://rdb/cold.tar", "tar"),
                                          ("p.parquet", "s3://rdb/p.parquet", "parquet")])))
    assert [r["data"] for r in units["t.tar"][:-1]] == [m[1] for m in members]
    assert [r["data"] for r in units["p.parquet"][:-1]] == [m[1] for m in members]
    cold = units["cold.tar"]
    assert len(cold) == 2 and cold[0]["key"] == "cold.tar#error"
    assert "object is in an archive storage class (GLACIER): restore it first" in cold[0]["error"]


MEASURE = """
import os, sys
import numpy as np
from pipeline import sources

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def plan(uri):
    batch = {}
    for c, v in (("unit", "big.tar"), ("uri", uri), ("kind", "tar"), ("shard", "s"), ("version", "v")):
        batch[c] = np.empty(1, dtype=object)
        batch[c][:] = [v]
    return batch

list(sources.read_units(plan(sys.argv[1])))  # warm-up: imports and allocators
base = peak = rss()
rows = nbytes = 0
for out in sources.read_units(plan(sys.argv[2])):  # sampled while each block is held
    rows += len(out["key"])
    nbytes += int(out["source_bytes"].sum())
    peak = max(peak, rss())
print(rows, nbytes, peak - base)
"""


def test_reading_a_200_mb_tar_keeps_memory_flat(tmp_path: Path) -> None:
    big = tmp_path / "big.tar"
    member = os.urandom(1 << 20)
    with tarfile.open(big, "w") as tf:
        for i in range(200):
            info = tarfile.TarInfo(f"img{i:03d}.png")
            info.size = len(member)
            tf.addfile(info, io.BytesIO(member))
    small = tmp_path / "small.tar"
    small.write_bytes(make_tar([("a.png", b"x")]))
    # a fresh process: the peak RSS of the read alone
    out = subprocess.run([sys.executable, "-c", MEASURE, str(small), str(big)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    rows, nbytes, growth = (int(x) for x in out)
    assert rows == 201 and nbytes == 200 << 20
    print(f"read_units over a {big.stat().st_size / 1e6:.0f} MB tar: peak RSS growth {growth / 1e6:.1f} MB")
    assert growth < 60e6  # reading it whole would take > 200 MB; streamed: a read buffer and one block


def test_unit_rows_carry_versions() -> None:
    units = [Unit("a.png", "/a.png", "file", 1, "v1"), Unit("t.tar", "/t.tar", "tar", 2, "v2")]
    rows = sources.unit_rows(list(sources.iter_shards(units, 10)))
    assert [(r["unit"], r["version"]) for r in rows] == [("t.tar", "v2"), ("a.png", "v1")]
    assert list(itertools.chain.from_iterable(s.units for s in sources.plan_shards(units, 10))) == units[::-1]
