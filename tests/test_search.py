"""Index / search / dedup / groups over DSTs written directly as Parquet (tiny embedder)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline import index as vindex
from pipeline import storage
from tests.conftest import encode


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch

    from models import checkpoint, registry
    from models.embedder import prepare

    torch.manual_seed(0)
    cfg = registry.make_config("copy-embedder", "tiny")
    model: Any = registry.build("copy-embedder", cfg).eval()
    # A random CNN maps every image to nearly one direction (positive pooled features); centring
    # the projection on sample pictures spreads them so that neighbours are meaningful.
    x = torch.stack([torch.from_numpy(np.array(prepare(photo(1000 + i, 40, 40), cfg.input_size, cfg.max_aspect)))
                     for i in range(64)]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        f = model.features((x - 0.5) / 0.25)
        p = model.gem_p
        g = f.clamp_min(1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        model.proj.bias -= model.proj(g).mean(0)
    path = tmp_path_factory.mktemp("emb") / "tiny-embedder.safetensors"
    from models.regions import REGIONS

    checkpoint.save(path, "copy-embedder", cfg, model, {"kind": "embedder", "steps": 0, "dedup_threshold": 0.99,
                                                        "dedup_threshold_regions": 0.995,
                                                        "metrics": {"calib_regions_layout": REGIONS.layout_id()}})
    return str(path)


@pytest.fixture(scope="session")
def engine(tiny_embedder: str):  # type: ignore[no-untyped-def]
    from models.embedder import EmbedderEngine

    return EmbedderEngine(tiny_embedder, threads=1, device="cpu")


@pytest.fixture(scope="session")
def region_engine(tiny_embedder: str):  # type: ignore[no-untyped-def]
    """The tiny embedder with its windows scaled to its 32 px input as embedder-base's 113 px
    windows are to its 128 px one: prepared at 45 px, the half-area windows are 32 px."""
    from models.embedder import EmbedderEngine
    from models.regions import RegionSpec

    return EmbedderEngine(tiny_embedder, threads=1, device="cpu", regions=RegionSpec(size=45))


def photo(seed: int, w: int = 48, h: int = 40) -> np.ndarray:
    """Distinct random blobs: every seed gives a clearly different picture."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def rows_for(engine, items: Sequence[tuple[str, np.ndarray | None]], model: str | None = None,  # type: ignore[no-untyped-def]
             sizes: dict[str, tuple[int, int]] | None = None, regions: bool = False) -> pa.Table:
    """DST rows in the layout aejob writes (error rows where the image is None); ``regions``:
    with the ``region_embeddings`` column (as clean and compress write it), else as DSTs from
    before regions."""
    ok = [img for _, img in items if img is not None]
    full, reg = engine.embed_with_regions(ok) if ok else (np.zeros((0, engine.dim)), np.zeros((0, 5, engine.dim)))
    vecs, regs = iter(full), iter(reg)
    emb: list[Any] = []
    region: list[Any] = []
    status: list[str] = []
    image: list[bytes | None] = []
    sha: list[str] = []
    w: list[int | None] = []
    h: list[int | None] = []
    for key, img in items:
        if img is None:
            emb.append(None)
            region.append(None)
            status.append("error")
            image.append(None)
            sha.append("bad")
            w.append(None)
            h.append(None)
        else:
            emb.append(next(vecs).tolist())
            region.append(next(regs).tolist())
            status.append("ok")
            image.append(encode(img))
            sha.append(str(int(img.astype(np.int64).sum())) + key)
            ww, hh = (sizes or {}).get(key, (img.shape[1], img.shape[0]))
            w.append(ww)
            h.append(hh)
    table = pa.table({
        "key": pa.array([k for k, _ in items], pa.string()),
        "status": pa.array(status, pa.string()),
        "width": pa.array(w, pa.int32()), "height": pa.array(h, pa.int32()),
        "image": pa.array(image, pa.large_binary()),
        "embedding": pa.array(emb, pa.list_(pa.float32(), engine.dim)),
        "embedding_model": pa.array([model or engine.model_id] * len(items), pa.string()),
        "source_sha256": pa.array(sha, pa.string()),
    })
    if regions:
        from pipeline.schemas import region_field

        f = region_field(engine.dim, engine.regions)
        table = table.add_column(5, f, pa.array(region, f.type))
    return table


def write_part(dst: str, name: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(dst, name), buf.getvalue())


def cli(*args: str) -> tuple[int, str, str]:
    from jobs.cli import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_exact_topk_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 8)).astype(np.float32)
    q = rng.normal(size=(7, 8)).astype(np.float32)
    got = vindex.exact_topk(base, q, 5, block=64)
    want = np.argsort(-(q @ base.T), axis=1)[:, :5]
    assert [[i for i, _ in row] for row in got] == want.tolist()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_image_finds_itself_first(tmp_path: Path, engine, tiny_embedder: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    items = [(f"img{i:02d}.png", photo(i)) for i in range(20)] + [("broken.jpg", None)]
    write_part(dst, "part-0.parquet", rows_for(engine, items))
    s = vindex.build(dst, kind=kind)
    assert (s["kind"], s["count"], s["added"], s["skipped_error_rows"]) == (kind, 20, 20, 1)
    queries = []
    for i in (3, 11, 17):
        p = tmp_path / f"q{i}.png"
        p.write_bytes(encode(photo(i)))
        queries.append(str(p))
    code, out, _ = cli("search", dst, *queries, "-k", "3", "--json", "--checkpoint", tiny_embedder)
    assert code == 0, out
    res = json.loads(out)
    assert [r["query"] for r in res] == queries
    for r, i in zip(res, (3, 11, 17)):
        assert r["results"][0]["key"] == f"img{i:02d}.png"
        assert r["results"][0]["score"] > 0.999
        assert len(r["results"]) == 3
        scores = [h["score"] for h in r["results"]]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("regions", [False, True])
def test_json_shape_with_undecodable_query(tmp_path: Path, engine, tiny_embedder: str,  # type: ignore[no-untyped-def]
                                           regions: bool) -> None:
    dst = str(tmp_path / "dst")
    write_part(dst, "a.parquet", rows_for(engine, [(f"k{i}", photo(i)) for i in range(5)], regions=regions))
    vindex.build(dst)
    good = tmp_path / "good.png"
    good.write_bytes(encode(photo(2)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    missing = str(tmp_path / "missing.png")
    code, out, err = cli("search", dst, str(bad), str(good), missing, "-k", "2", "--json",
                         "--checkpoint", tiny_embedder)
    assert code == 0, err
    res = json.loads(out)  # stdout holds only the JSON
    assert [r["query"] for r in res] == [str(bad), str(good), missing]
    assert res[0]["results"] == [] and res[0]["error"]
    assert res[2]["results"] == [] and res[2]["error"]
    assert "error" not in res[1]
    assert set(res[1]) == {"query", "results"}
    assert all(set(h) == {"key", "score"} for h in res[1]["results"])
    assert res[1]["results"][0]["key"] == "k2"
    assert len({h["key"] for h in res[1]["results"]}) == 2  # distinct keys, even with 6 vectors per key
    code, out, _ = cli("search", dst, str(good), "-k", "2", "--checkpoint", tiny_embedder)
    assert code == 0 and "k2" in out  # the table


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_incremental_add_replace_delete(tmp_path: Path, engine, tiny_embedder: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    write_part(dst, "p0.parquet", rows_for(engine, [(f"a{i}", photo(i)) for i in range(6)]))
    write_part(dst, "p1.parquet", rows_for(engine, [(f"b{i}", photo(10 + i)) for i in range(4)]))
    first = vindex.build(dst, kind=kind)
    assert first["count"] == 10
    ids_before = dict(zip(vindex.load(dst).keys, vindex.load(dst).ids.tolist()))
    # second run: a3 changed (new content), b* deleted, c0/c1 new, a5 became an error row
    changed = [(f"a{i}", photo(i)) for i in range(5)]
    changed[3] = ("a3", photo(99))
    write_part(dst, "p0.parquet", rows_for(engine, changed + [("a5", None)]))
    storage.delete(storage.join(dst, "p1.parquet"))
    write_part(dst, "p2.parquet", rows_for(engine, [("c0", photo(50)), ("c1", photo(51))]))
    second = vindex.build(dst, kind=kind)
    assert (second["added"], second["replaced"], second["removed"]) == (2, 1, 5)
    idx = vindex.load(dst)
    assert sorted(idx.keys) == ["a0", "a1", "a2", "a3", "a4", "c0", "c1"]
    ids_after = dict(zip(idx.keys, idx.ids.tolist()))
    assert ids_after["a0"] == ids_before["a0"]  # unchanged rows keep their id
    assert ids_after["a3"] != ids_before["a3"]  # a replaced row gets a new one
    assert len(set(ids_after.values())) == len(ids_after)
    top = idx.search(engine.embed([photo(99), photo(51), photo(0)]), 1)
    assert [idx.keys[h[0][0]] for h in top] == ["a3", "c1", "a0"]
    old_files = {f.path.rsplit("/", 1)[-1] for f in storage.list_files(storage.join(dst, "_index"))}
    assert old_files == {"meta.json", idx.meta["ids_file"]} | ({idx.meta["hnsw_file"]} if kind == "hnsw" else set())
    third = vindex.build(dst, kind=kind)  # nothing changed
    assert (third["added"], third["replaced"], third["removed"], third["count"]) == (0, 0, 0, 7)


def test_auto_kind_switches_to_hnsw(tmp_path: Path, engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    write_part(dst, "p.parquet", rows_for(engine, [(f"k{i}", photo(i)) for i in range(8)]))
    monkeypatch.setattr(vindex, "AUTO_HNSW_MIN", 10)
    assert vindex.build(dst)["kind"] == "flat"
    write_part(dst, "q.parquet", rows_for(engine, [(f"m{i}", photo(30 + i)) for i in range(4)]))
    s = vindex.build(dst)
    assert (s["kind"], s["count"]) == ("hnsw", 12)
    idx = vindex.load(dst)
    assert idx.keys[idx.search(engine.embed([photo(31)]), 1)[0][0][0]] == "m1"


def test_refuses_mixed_models(tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    write_part(dst, "p.parquet", rows_for(engine, [("a", photo(1))]))
    write_part(dst, "q.parquet", rows_for(engine, [("b", photo(2))], model="other-embedder:0123456789ab"))
    with pytest.raises(vindex.SearchIndexError, match="never mixes"):
        vindex.build(dst)
    code, _, err = cli("index", dst)
    assert code == 2 and "never mixes" in err
    # an index of one model, then DST moves to another: refused, --rebuild starts over
    storage.delete(storage.join(dst, "q.parquet"))
    vindex.build(dst)
    write_part(dst, "p.parquet", rows_for(engine, [("a", photo(1))], model="other-embedder:0123456789ab"))
    with pytest.raises(vindex.SearchIndexError, match="never mixes models"):
        vindex.build(dst)
    assert vindex.build(dst, rebuild=True)["embedding_model"] == "other-embedder:0123456789ab"


def test_search_refuses_non_embedder_index(tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    model = "resunet-denoiser:bottleneck-avg@256:0123456789ab"
    write_part(dst, "p.parquet", rows_for(engine, [("a", photo(1))], model=model))
    vindex.build(dst)
    q = tmp_path / "q.png"
    q.write_bytes(encode(photo(1)))
    code, out, err = cli("search", dst, str(q), "--json")
    assert code == 2 and out == ""
    assert "not by an embedder checkpoint" in err and "denoiser" in err


def test_search_refuses_wrong_checkpoint(tmp_path: Path, engine, tiny_embedder: str) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    write_part(dst, "p.parquet", rows_for(engine, [("a", photo(1))], model="copy-embedder:ffffffffffff"))
    vindex.build(dst)
    q = tmp_path / "q.png"
    q.write_bytes(encode(photo(1)))
    code, _, err = cli("search", dst, str(q), "--checkpoint", tiny_embedder)
    assert code == 2 and "is not the index's model" in err


@pytest.mark.s3
def test_index_round_trip_through_s3(s3_server, engine, tiny_embedder: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    storage.s3_client().create_bucket(Bucket="search-bucket")
    dst = "s3://search-bucket/clean"
    write_part(dst, "part-0.parquet", rows_for(engine, [(f"s{i}", photo(i)) for i in range(8)] + [("e", None)]))
    s = vindex.build(dst, kind="hnsw")
    assert (s["count"], s["skipped_error_rows"]) == (8, 1)
    names = {f.path.rsplit("/", 1)[-1] for f in storage.list_files(storage.join(dst, "_index"))}
    assert names == {"meta.json", "ids-000001.parquet", "hnsw-000001.usearch"}
    write_part(dst, "part-1.parquet", rows_for(engine, [("t0", photo(40))]))
    assert vindex.build(dst, kind="hnsw")["added"] == 1
    q = tmp_path / "q.png"
    q.write_bytes(encode(photo(5)))
    code, out, err = cli("search", dst, str(q), "-k", "2", "--json", "--checkpoint", tiny_embedder)
    assert code == 0, err
    assert json.loads(out)[0]["results"][0]["key"] == "s5"
    code, out, err = cli("dedup", dst, "--threshold", "0.9999")
    assert code == 0, err
    assert storage.exists(storage.join(dst, "_dedup", "groups.parquet"))


@pytest.mark.parametrize("regions", [False, True])
def test_dedup_groups_and_keep(tmp_path: Path, engine, tiny_embedder: str, regions: bool) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    a = photo(7)
    items = [("a-small.png", a), ("a-big.png", a.copy()), ("other1", photo(1)), ("other2", photo(2))]
    write_part(dst, "p.parquet", rows_for(engine, items, sizes={"a-big.png": (960, 800)}, regions=regions))
    # the checkpoint's calibrated threshold is used by default: found through --checkpoint
    code, out, err = cli("dedup", dst, "--checkpoint", tiny_embedder)
    assert code == 0, err
    t = pq.read_table(str(tmp_path / "dst" / "_dedup" / "groups.parquet"))
    assert {"group", "key", "score", "keep"} <= set(t.column_names)
    assert t.schema.field("keep").type == pa.bool_()
    rows = t.to_pylist()
    groups = {r["group"] for r in rows}
    assert {r["key"] for r in rows} == {"a-small.png", "a-big.png"}  # the distinct pictures stay out
    pair = [r for r in rows if r["key"] in ("a-small.png", "a-big.png")]
    assert len(pair) == 2 and pair[0]["group"] == pair[1]["group"]
    assert [r["key"] for r in pair if r["keep"]] == ["a-big.png"]  # the larger one is kept
    for g in groups:
        assert sum(r["keep"] for r in rows if r["group"] == g) == 1
    summary = json.loads((tmp_path / "dst" / "_dedup" / "summary.json").read_text())
    # with region vectors, the threshold calibrated for them (for the layout of the index)
    assert summary["threshold"] == pytest.approx(0.995 if regions else 0.99)
    # a threshold nothing reaches: no groups, still a valid (empty) table
    code, _, err = cli("dedup", dst, "--threshold", "1.5")
    assert code == 0, err
    assert pq.read_table(str(tmp_path / "dst" / "_dedup" / "groups.parquet")).num_rows == 0


def test_groups_kmeans(tmp_path: Path, engine) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    write_part(dst, "p.parquet", rows_for(engine, [(f"k{i}", photo(i)) for i in range(12)]))
    code, out, err = cli("groups", dst, "-k", "3")
    assert code == 0, err
    t = pq.read_table(str(tmp_path / "dst" / "_groups" / "groups.parquet"))
    assert t.column_names == ["key", "group", "score"]
    assert sorted(t.column("key").to_pylist()) == sorted(f"k{i}" for i in range(12))
    assert set(t.column("group").to_pylist()) <= {0, 1, 2}
    summary = json.loads((tmp_path / "dst" / "_groups" / "summary.json").read_text())
    assert sum(g["size"] for g in summary["groups"]) == 12


def test_kmeans_separates_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32)
    x = np.concatenate([c + 0.05 * rng.normal(size=(30, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assign, _ = vindex.kmeans(x, 4)
    for j in range(4):
        assert len(set(assign[j * 30 : (j + 1) * 30].tolist())) == 1
    assert len(set(assign.tolist())) == 4


def test_dedup_groups_do_not_chain() -> None:
    """A~B and B~C but not A~C: A keeps B; C is not pulled in through B."""
    ang = np.deg2rad([0.0, 20.0, 40.0, 90.0])
    v = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    idx = vindex.SearchIndex({"kind": "flat", "embedding_model": "m"}, np.arange(4, dtype=np.uint64),
                             ["a", "b", "c", "d"], [""] * 4, v)
    assert vindex.duplicate_groups(idx, float(np.cos(np.deg2rad(25))), k=3) == [[0, 1]]
    assert vindex.duplicate_groups(idx, float(np.cos(np.deg2rad(25))), k=3, priority=[1, 0, 2, 3]) == [[1, 0, 2]]


# ------------------------------------------------------------------------------- region vectors
def half_crops(img: np.ndarray) -> list[np.ndarray]:
    """Crops keeping half the area: top-left, bottom-right, centre."""
    h, w = img.shape[:2]
    ch, cw = round(h * 0.5**0.5), round(w * 0.5**0.5)
    return [img[y : y + ch, x : x + cw] for y, x in ((0, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2))]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_half_area_crop_found_through_regions(tmp_path: Path, region_engine, kind: str) -> None:  # type: ignore[no-untyped-def]
    items = [(f"p{i:02d}", photo(i, 90, 72)) for i in range(12)]
    with_regions, full_only = str(tmp_path / "regions"), str(tmp_path / "full")
    write_part(with_regions, "p.parquet", rows_for(region_engine, items, regions=True))
    write_part(full_only, "p.parquet", rows_for(region_engine, items))
    s = vindex.build(with_regions, kind=kind)
    assert (s["count"], s["vectors"], s["regions"], s["rows_without_regions"]) == (12, 72, 5, 0)
    assert vindex.build(full_only, kind=kind)["vectors"] == 12
    idx, flat = vindex.load(with_regions), vindex.load(full_only)
    assert idx.meta["regions"]["size"] == 45 and flat.meta["regions"] is None
    targets = [0, 3, 7, 10]
    crops = [c for t in targets for c in half_crops(items[t][1])]
    truth = [f"p{t:02d}" for t in targets for _ in range(3)]
    q = region_engine.embed(crops)
    hits = idx.search(q, 3)
    assert [idx.keys[h[0][0]] for h in hits] == truth  # every half crop finds its picture first
    for h, qv, key in zip(hits, q, truth):
        assert len({r for r, _ in h}) == 3  # distinct keys
        row = idx.keys.index(key)
        assert h[0][1] > float(idx.vectors[row] @ qv) + 0.05  # the window scores above the full vector
    full_hits = flat.search(q, 1)
    assert sum(flat.keys[h[0][0]] == k for h, k in zip(full_hits, truth)) < len(truth)  # full only misses some

    # dedup: a crop stored as a row links to its picture through the window (and not full to full)
    crop_items = items + [("crop", half_crops(items[3][1])[0])]
    dd, dd_full = str(tmp_path / "dd"), str(tmp_path / "dd_full")
    write_part(dd, "p.parquet", rows_for(region_engine, crop_items, regions=True))
    write_part(dd_full, "p.parquet", rows_for(region_engine, crop_items))
    vindex.build(dd, kind=kind)
    vindex.build(dd_full, kind=kind)
    a, b = vindex.load(dd), vindex.load(dd_full)
    ra, rc = a.keys.index("p03"), a.keys.index("crop")
    link, full_score = a.pair_score(ra, rc), float(a.vectors[ra] @ a.vectors[rc])
    assert link > full_score + 0.05
    t = link - 1e-4
    assert any(ra in g and rc in g for g in vindex.duplicate_groups(a, t, k=3))
    assert not any(b.keys.index("crop") in g and b.keys.index("p03") in g for g in vindex.duplicate_groups(b, t, k=3))


def test_dst_before_regions_then_mixed(tmp_path: Path, engine, tiny_embedder: str) -> None:  # type: ignore[no-untyped-def]
    """A DST written before regions indexes and searches; new files with regions next to old
    ones: the index is rebuilt with the region layout, the old rows by their full vector only."""
    dst = str(tmp_path / "dst")
    write_part(dst, "old.parquet", rows_for(engine, [(f"a{i}", photo(i)) for i in range(4)]))
    s = vindex.build(dst)
    assert (s["count"], s["vectors"], s["regions"], s["rebuilt"]) == (4, 4, 0, None)
    q = tmp_path / "q.png"
    q.write_bytes(encode(photo(2)))
    code, out, err = cli("search", dst, str(q), "-k", "2", "--json", "--checkpoint", tiny_embedder)
    assert code == 0, err
    assert json.loads(out)[0]["results"][0]["key"] == "a2"
    # an index written before regions (format 1: no `region` column, no `regions` in meta) still loads
    meta = vindex.read_meta(dst)
    assert meta is not None
    ids_uri = storage.join(dst, "_index", meta["ids_file"])
    t = pq.read_table(io.BytesIO(storage.read_bytes(ids_uri)))
    write_part(dst, "_index/" + meta["ids_file"], t.drop_columns(["region"]))
    v1 = {k: v for k, v in meta.items() if k not in ("regions", "rows_without_regions", "scoring", "vectors")}
    storage.write_bytes(storage.join(dst, "_index", "meta.json"), json.dumps({**v1, "format_version": 1}).encode())
    idx = vindex.load(dst)
    assert idx.n_regions == 0 and idx.keys[idx.search(engine.embed([photo(1)]), 1)[0][0][0]] == "a1"
    assert vindex.build(dst)["added"] == 0  # a format-1 index updates in place
    # a new run writes files with region vectors: the layout changed, the index is rebuilt
    write_part(dst, "new.parquet", rows_for(engine, [(f"b{i}", photo(20 + i)) for i in range(3)], regions=True))
    s = vindex.build(dst)
    assert s["rebuilt"] and "region layout changed" in s["rebuilt"]
    assert (s["count"], s["regions"], s["rows_without_regions"], s["vectors"]) == (7, 5, 4, 4 + 3 * 6)
    idx = vindex.load(dst)
    assert idx.meta["format_version"] == vindex.FORMAT_VERSION and idx.meta["rows_without_regions"] == 4
    top = idx.search(engine.embed([photo(1), photo(21)]), 1)
    assert [idx.keys[h[0][0]] for h in top] == ["a1", "b1"]
    for cmd in (["dedup", dst, "--threshold", "0.9999"], ["groups", dst, "-k", "2"]):
        code, _, err = cli(*cmd)
        assert code == 0, err
    assert vindex.build(dst)["rebuilt"] is None  # same layout now: an ordinary update


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_incremental_drops_every_vector_of_a_key(tmp_path: Path, region_engine, kind: str) -> None:  # type: ignore[no-untyped-def]
    dst = str(tmp_path / "dst")
    write_part(dst, "p0.parquet", rows_for(region_engine, [(f"a{i}", photo(i, 90, 72)) for i in range(6)],
                                           regions=True))
    write_part(dst, "p1.parquet", rows_for(region_engine, [(f"b{i}", photo(10 + i, 90, 72)) for i in range(2)],
                                           regions=True))
    first = vindex.build(dst, kind=kind)
    assert (first["count"], first["vectors"]) == (8, 48)
    before = vindex.load(dst)
    old_labels = {k: {int(before.ids[r])} | set(before.region_ids[r].tolist()) for r, k in enumerate(before.keys)}
    # b* deleted, a2 changed
    items = [(f"a{i}", photo(i, 90, 72)) for i in range(6)]
    items[2] = ("a2", photo(77, 90, 72))
    write_part(dst, "p0.parquet", rows_for(region_engine, items, regions=True))
    storage.delete(storage.join(dst, "p1.parquet"))
    second = vindex.build(dst, kind=kind)
    assert (second["added"], second["replaced"], second["removed"], second["vectors"]) == (0, 1, 2, 36)
    idx = vindex.load(dst)
    labels, rows, slots, _ = idx.flat()
    assert len(labels) == len(set(labels.tolist())) == 36
    gone = old_labels["b0"] | old_labels["b1"] | old_labels["a2"]
    assert not gone & set(labels.tolist())
    assert old_labels["a0"] <= set(labels.tolist())  # unchanged rows keep their labels
    if kind == "hnsw":
        assert sorted(np.asarray(idx.hnsw.keys).tolist()) == sorted(labels.tolist())
    # the id table: six vectors per key (full + 5 windows), labels mapped by key, never row order
    t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(dst, "_index", idx.meta["ids_file"]))))
    per_key: dict[str, list[int]] = {}
    for k, r in zip(t.column("key").to_pylist(), t.column("region").to_pylist()):
        per_key.setdefault(k, []).append(r)
    assert {k: sorted(v) for k, v in per_key.items()} == {f"a{i}": [-1, 0, 1, 2, 3, 4] for i in range(6)}
    # a deleted key's window no longer answers; the changed key answers with its new content
    q = region_engine.embed([half_crops(photo(10, 90, 72))[0], half_crops(photo(77, 90, 72))[0]])
    hits = idx.search(q, 3)
    assert not any(idx.keys[r].startswith("b") for h in hits for r, _ in h)
    assert idx.keys[hits[1][0][0]] == "a2"


@pytest.mark.usefixtures("ray_local")
def test_clean_and_compress_write_region_vectors(tmp_path: Path, tiny_checkpoint: str, tiny_codec: str) -> None:
    """Real runs of both jobs (default embedder), their Parquet read back, then indexed and searched."""
    import pyarrow.dataset as pads

    from jobs import clean, compress
    from models.embedder import EmbedderEngine
    from models.regions import REGIONS
    from pipeline import runner
    from pipeline.decode import decode_image

    image_folder = tmp_path / "src"
    image_folder.mkdir()
    names = ["a.png", "b.png", "c.png", "d.png"]
    for i, name in enumerate(names):
        (image_folder / name).write_bytes(encode(photo(200 + i, 96, 72)))
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    eng = EmbedderEngine("embedder-base", threads=1, device="cpu")
    specs = {
        "clean": clean.build_spec(clean.CleanConfig(src=str(image_folder), dst=str(tmp_path / "clean"),
                                                    checkpoint=tiny_checkpoint), runner.RayOptions()),
        "compress": compress.build_spec(compress.CompressConfig(src=str(image_folder), dst=str(tmp_path / "compress"),
                                                                checkpoint=tiny_codec, quality=2),
                                        runner.RayOptions()),
    }
    for job, spec in specs.items():
        dst = str(tmp_path / job)
        assert runner.run_job(spec, progress=False).ok
        f = pq.read_schema(next(Path(dst).glob("*.parquet"))).field("region_embeddings")
        assert (f.type.list_size, f.type.value_type.list_size, f.type.value_type.value_type) == (5, 256, pa.float32())
        assert json.loads(f.metadata[b"aejob.regions"]) == REGIONS.describe()
        rows = {r["key"]: r for r in pads.dataset(dst, format="parquet").to_table().to_pylist()}
        assert rows["broken.jpg"]["embedding"] is None and rows["broken.jpg"]["region_embeddings"] is None
        for k in names:
            reg = np.asarray(rows[k]["region_embeddings"], np.float32)
            assert reg.shape == (5, 256)
            np.testing.assert_allclose(np.linalg.norm(reg, axis=1), 1.0, atol=1e-4)
        # the vectors of the image the row describes: the cleaned image (clean), the source (compress)
        img = (decode_image(rows["c.png"]["image"]).pixels if job == "clean"
               else decode_image((image_folder / "c.png").read_bytes()).pixels)
        full, reg = eng.embed_with_regions([img])
        np.testing.assert_allclose(rows["c.png"]["embedding"], full[0], atol=1e-5)
        np.testing.assert_allclose(rows["c.png"]["region_embeddings"], reg[0], atol=1e-5)
        s = vindex.build(dst)
        assert (s["count"], s["regions"], s["vectors"], s["rows_without_regions"]) == (4, 5, 24, 0)
        q = tmp_path / f"{job}-q.png"
        q.write_bytes(encode(half_crops(img)[0]))
        code, out, err = cli("search", dst, str(q), "-k", "2", "--json")
        assert code == 0, err
        assert json.loads(out)[0]["results"][0]["key"] == "c.png"


def test_no_regions_writes_null_region_vectors(tmp_path: Path, tiny_checkpoint: str) -> None:
    """`aejob clean --no-regions`: full vectors only (the same as with regions), nulls in
    region_embeddings; the index takes such rows and an image still finds itself."""
    import pyarrow.dataset as pads

    from models.embedder import EmbedderEngine
    from pipeline.decode import decode_image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(encode(photo(300 + i, 80, 64)))
    dst = str(tmp_path / "dst")
    code, _, err = cli("clean", str(src), "--out", dst, "--checkpoint", tiny_checkpoint, "--no-regions")
    assert code == 0, err
    rows = {r["key"]: r for r in pads.dataset(dst, format="parquet").to_table().to_pylist()}
    assert sorted(rows) == ["0.png", "1.png", "2.png"]
    eng = EmbedderEngine("embedder-base", threads=1, device="cpu")
    for r in rows.values():
        assert r["region_embeddings"] is None
        np.testing.assert_allclose(r["embedding"], eng.embed([decode_image(r["image"]).pixels])[0], atol=1e-5)
    s = vindex.build(dst)
    assert (s["count"], s["regions"], s["rows_without_regions"]) == (3, 5, 3)
    q = tmp_path / "q.png"
    q.write_bytes(rows["1.png"]["image"])
    code, out, err = cli("search", dst, str(q), "-k", "1", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["results"][0]["key"] == "1.png"
    # no row has regions: dedup links by the full-vector threshold, not the one for regions
    full_t = EmbedderEngine("embedder-base", threads=1, device="cpu").meta["dedup_threshold"]
    code, out, err = cli("dedup", dst)
    assert code == 0, err
    assert f"at threshold {full_t:.3f}" in out
