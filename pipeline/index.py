"""Vector index over a DST's embeddings: build/update, query, dedup, k-means groups.

Each row is indexed by its full-image ``embedding`` and, where DST has them, its
``region_embeddings`` (the embedder's vectors of 5 windows of half the area, ``models/regions.py``).
A query (one image: its full vector) scores a row by the max over the row's vectors, so a crop of
half a picture finds the picture; ``search`` returns distinct keys, best first.

Layout under ``DST/_index/`` (local or s3://, all I/O through ``pipeline.storage``):

- ``meta.json`` (written last): embedding model, dim, kind (flat | hnsw), the region layout
  (``regions``: null for full vectors only), counts, the HNSW settings, the generation and the
  names of the two files below.
- ``ids-<gen>.parquet``: one row per vector: ``id`` (uint64, the index's label), ``key``,
  ``source_sha256``, ``region`` (-1: the full image, 0..R-1: a window) and the ``embedding``.
  Labels map to (key, region) through this table, never through row order; keeping the
  vectors here lets an update switch kind or rebuild without reading DST's vectors again.
  (Format 1, before regions, had no ``region`` column: such an index still loads.)
- ``hnsw-<gen>.usearch`` (kind hnsw): the usearch HNSW graph of all vectors, updated in place
  (removes + adds).

A new generation's files are written before ``meta.json`` points at them, so a crashed update
leaves the previous index readable. Vectors are L2-normalised; scores are cosine similarities
(inner products), higher is closer.

usearch over faiss-cpu: it is already a dependency, its HNSW supports removing labels (what an
incremental update needs) and serialises to bytes (what S3 needs), and it measured ~0.5 ms per
top-10 query over 100k vectors here (``aejob bench search``).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from models.regions import FIELD_META_KEY, REGION_COLUMN
from pipeline import storage

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
DEDUP_DIR = "_dedup"
GROUPS_DIR = "_groups"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: full vectors only, no ``region`` column in the id table
FULL = -1  # the id table's ``region`` of a row's full-image vector
AUTO_HNSW_MIN = 20_000  # below this, exact search (one matrix product) is both faster and exact
KINDS = ("auto", "flat", "hnsw")
READ_COLUMNS = ["key", "status", "embedding", REGION_COLUMN, "embedding_model", "source_sha256"]
# neighbours asked of HNSW beyond k*(R+1) (the most vectors k distinct keys can take)
SEARCH_SLACK = 16


class SearchIndexError(ValueError):
    """A user-facing problem with an index (mixed models, missing index, unknown model)."""


@dataclass(frozen=True)
class HnswParams:
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64


# ------------------------------------------------------------------------------- reading DST
def _dataset(dst: str, columns: list[str]) -> tuple[pads.Dataset, list[str]]:
    fs, path = storage.resolve(dst)
    ds = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."])
    names = set(ds.schema.names)
    return ds, [c for c in columns if c in names]


def _layout_of(f: pa.Field) -> str:
    """The region layout a ``region_embeddings`` field records (canonical JSON)."""
    md = f.metadata or {}
    if FIELD_META_KEY in md:
        return json.dumps(json.loads(md[FIELD_META_KEY]), sort_keys=True)
    return json.dumps({"count": getattr(f.type, "list_size", None)}, sort_keys=True)


def open_dst(dst: str) -> tuple[pads.Dataset, dict[str, Any] | None]:
    """DST as a dataset, with ``region_embeddings`` in its schema when any data file has it (files
    written before regions read as nulls there), and that column's region layout (None: no file
    has it). Files of two different layouts are refused, like two models."""
    try:
        fs, path = storage.resolve(dst)
        ds = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."])
        fields: dict[str, pa.Field] = {}
        with ThreadPoolExecutor(16) as pool:  # one footer read per file: in parallel on s3://
            for sch in pool.map(lambda frag: frag.physical_schema, ds.get_fragments()):
                if REGION_COLUMN in sch.names:
                    f = sch.field(REGION_COLUMN)
                    fields.setdefault(_layout_of(f), f)
    except (FileNotFoundError, OSError) as e:
        raise SearchIndexError(f"{dst}: not a readable dataset ({e})") from None
    if len(fields) > 1:
        raise SearchIndexError(
            f"{dst} holds region vectors of {len(fields)} layouts ({'; '.join(sorted(fields))}): an index never "
            "mixes them; re-run the job so that every row has the same layout")
    if not fields:
        return ds, None
    layout, f = next(iter(fields.items()))
    if REGION_COLUMN not in ds.schema.names:  # the first file predates regions: add the column
        ds = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."],
                          schema=ds.schema.append(f))
    return ds, dict(json.loads(layout))


def _vectors(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A (fixed size) list<float> column without nulls → float32 [n, dim]."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1)


def _region_vectors(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<list<float>> column without nulls → float32 [n, R, dim]."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0, 0), np.float32)
    inner = col.flatten()
    flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, len(inner) // n, -1)


@dataclass
class DstScan:
    current: dict[str, str]  # key -> source_sha256 of every row with an embedding
    vectors: dict[str, np.ndarray]  # only the rows ``want`` asked for
    models: set[str]
    skipped: int  # rows without an embedding (error rows)
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # [R, dim], asked-for rows that have them
    layout: dict[str, Any] | None = None  # the region layout of DST (None: no region column)


def scan_dst(dst: str, want: Callable[[str, str], bool], batch_rows: int = 8192,
             opened: tuple[pads.Dataset, dict[str, Any] | None] | None = None) -> DstScan:
    """Stream DST's key/status/embedding/regions/model/sha columns (never the images); keep the
    vectors of rows for which ``want(key, sha)`` is true."""
    ds, layout = opened or open_dst(dst)
    cols = [c for c in READ_COLUMNS if c in ds.schema.names]
    missing = {"key", "embedding"} - set(cols)
    if missing and ds.count_rows() > 0:
        raise SearchIndexError(f"{dst}: the dataset has no {', '.join(sorted(missing))} column")
    out = DstScan({}, {}, set(), 0, layout=layout)
    if missing:
        return out
    for batch in ds.to_batches(columns=cols, batch_size=batch_rows):
        ok = pc.is_valid(batch.column("embedding"))
        if "status" in cols:
            ok = pc.and_(ok, pc.equal(pc.fill_null(batch.column("status"), ""), "ok"))
        out.skipped += len(batch) - int(pc.sum(ok).as_py() or 0)
        b = batch.filter(ok)
        if len(b) == 0:
            continue
        keys = b.column("key").to_pylist()
        shas = b.column("source_sha256").to_pylist() if "source_sha256" in cols else [""] * len(b)
        if "embedding_model" in cols:
            out.models.update(m for m in pc.unique(b.column("embedding_model")).to_pylist() if m is not None)
        take = [i for i, (k, s) in enumerate(zip(keys, shas)) if want(k, s or "")]
        vecs = _vectors(b.column("embedding").take(pa.array(take, pa.int64()))) if take else None
        for i, k in enumerate(keys):
            if k in out.current:
                log.warning("key %r appears twice in DST; the later row wins", k)
            out.current[k] = shas[i] or ""
            out.regions.pop(k, None)
        for j, i in enumerate(take):
            assert vecs is not None
            out.vectors[keys[i]] = vecs[j]
        if take and REGION_COLUMN in cols:
            rc = b.column(REGION_COLUMN).take(pa.array(take, pa.int64()))
            has = np.asarray(pc.is_valid(rc).to_numpy(zero_copy_only=False), bool)
            if has.any():
                regs = _region_vectors(rc.filter(pa.array(has)))
                for j, i in enumerate(np.asarray(take)[has].tolist()):
                    out.regions[keys[i]] = regs[j]
    return out


def dst_sizes(dst: str) -> dict[str, int]:
    """key -> width*height (for choosing which duplicate to keep); 0 where unknown."""
    ds, cols = _dataset(dst, ["key", "width", "height"])
    out: dict[str, int] = {}
    if "key" not in cols:
        return out
    for b in ds.to_batches(columns=cols):
        keys = b.column("key").to_pylist()
        w = b.column("width").to_pylist() if "width" in cols else [0] * len(b)
        h = b.column("height").to_pylist() if "height" in cols else [0] * len(b)
        for k, ww, hh in zip(keys, w, h):
            out[k] = int(ww or 0) * int(hh or 0)
    return out


# ------------------------------------------------------------------------------- the index
SERIAL_ADD_BELOW = 10_000  # vectors: HNSW inserts below this run on one thread (see build)


def _hnsw(dim: int, p: HnswParams) -> Any:
    from usearch.index import Index

    return Index(ndim=dim, metric="ip", dtype="f32", connectivity=p.connectivity,
                 expansion_add=p.expansion_add, expansion_search=p.expansion_search)


@dataclass
class SearchIndex:
    """An index in memory: per row (key) its full vector and its region vectors, and, for hnsw,
    the graph of all of them. Rows are positions in ``keys``; labels are the graph's ids."""

    meta: dict[str, Any]
    ids: np.ndarray  # uint64 [n]: the label of each row's full vector
    keys: list[str]
    shas: list[str]
    vectors: np.ndarray  # float32 [n, dim]: row i's full vector (what k-means and queries use)
    hnsw: Any = None
    regions: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))  # [n, R, dim]
    region_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # [n, R]; -1: none
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.regions.shape[0] != n:  # full vectors only
            self.regions = np.zeros((n, 0, self.vectors.shape[1] if self.vectors.ndim == 2 else 0), np.float32)
        if self.region_ids.shape != self.regions.shape[:2]:
            if self.regions.shape[1]:
                raise SearchIndexError("region vectors without their labels")
            self.region_ids = np.zeros((n, 0), np.int64)

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def model(self) -> str:
        return str(self.meta["embedding_model"])

    @property
    def n_regions(self) -> int:
        return int(self.regions.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def vector_count(self) -> int:
        return len(self) + int((self.region_ids >= 0).sum())

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every vector: (labels uint64, rows, regions (-1 full), vectors float32 [V, dim])."""
        rr, jj = np.nonzero(self.region_ids >= 0)
        labels = np.concatenate([self.ids.astype(np.uint64), self.region_ids[rr, jj].astype(np.uint64)])
        rows = np.concatenate([np.arange(len(self)), rr]).astype(np.int64)
        slots = np.concatenate([np.full(len(self), FULL), jj]).astype(np.int64)
        vecs = np.concatenate([self.vectors, self.regions[rr, jj]]) if len(rr) else self.vectors
        return labels, rows, slots, np.ascontiguousarray(vecs, np.float32)

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """The row of each label (full or region vector); -1 for a label the index does not hold."""
        if self._sorted is None:
            lab, rows, _, _ = self.flat()
            order = np.argsort(lab, kind="stable")
            self._sorted = (lab[order], rows[order])
        lab, rows = self._sorted
        want = np.asarray(labels, np.uint64)
        if not len(lab):
            return np.full(len(want), -1, np.int64)
        pos = np.minimum(np.searchsorted(lab, want), len(lab) - 1)
        return np.where(lab[pos] == want, rows[pos], -1)

    def row_of(self, label: int) -> int:
        return int(self.rows_of(np.array([label], np.uint64))[0])

    def row_vectors(self, r: int) -> np.ndarray:
        """Row ``r``'s full vector, then its region vectors: [1 + regions, dim]."""
        return np.concatenate([self.vectors[r : r + 1], self.regions[r][self.region_ids[r] >= 0]])

    def pair_score(self, a: int, b: int) -> float:
        """What links two rows: the max of either's full vector against all of the other's vectors."""
        return float(max((self.row_vectors(b) @ self.vectors[a]).max(), (self.row_vectors(a) @ self.vectors[b]).max()))

    def scores(self, queries: np.ndarray, start: int = 0, end: int | None = None) -> np.ndarray:
        """Exact scores [nq, end - start] of rows ``start:end``: per row, the max cosine between
        the query and the row's full and region vectors (the product's scoring)."""
        end = len(self) if end is None else end
        q = np.ascontiguousarray(queries, np.float32)
        s = q @ self.vectors[start:end].T
        if self.n_regions and end > start:
            reg = self.regions[start:end]
            rs = (q @ reg.reshape(-1, reg.shape[-1]).T).reshape(len(q), end - start, self.n_regions)
            rs = np.where(self.region_ids[start:end][None] >= 0, rs, -np.inf)
            s = np.maximum(s, rs.max(-1))
        return s

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> list[list[tuple[int, float]]]:
        """Top-k distinct rows (row, score) per query, best first: a row scores the max over its
        vectors. ``exact`` forces brute force on hnsw."""
        q = np.ascontiguousarray(queries, np.float32).reshape(-1, self.vectors.shape[1] if len(self) else 1)
        k = min(k, len(self))
        if k <= 0:
            return [[] for _ in range(len(q))]
        if self.kind == "hnsw" and not exact:
            # k distinct rows are among the k*(R+1) nearest vectors (a row has R+1 at most)
            want = min(self.vector_count(), k * (self.n_regions + 1) + (SEARCH_SLACK if self.n_regions else 0))
            m = self.hnsw.search(q, want)
            labels = np.atleast_2d(m.keys)
            dists = np.atleast_2d(m.distances)
            # one query gives a Matches (no counts), several a BatchMatches
            counts = np.atleast_1d(m.counts) if hasattr(m, "counts") else np.array([len(m.keys)])
            out = []
            for i in range(len(q)):
                c = int(counts[i])
                order = np.argsort(dists[i, :c], kind="stable")
                rows = self.rows_of(labels[i, :c][order])
                best: dict[int, float] = {}
                for r, d in zip(rows.tolist(), dists[i, :c][order].tolist()):
                    if r >= 0 and r not in best:  # nearest first: a row's first vector is its best
                        best[r] = float(1.0 - d)
                        if len(best) == k:
                            break
                out.append(list(best.items()))
            return out
        block = 4096 if not self.n_regions else max(256, 4096 // (self.n_regions + 1))
        return _topk(len(self), len(q), k, block, lambda s, e: self.scores(q, s, e))


def _topk(n: int, nq: int, k: int, block: int,
          score: Callable[[int, int], np.ndarray]) -> list[list[tuple[int, float]]]:
    """Brute-force top-k over ``n`` rows scored in blocks by ``score(start, end)`` (bounded memory)."""
    k = min(k, n)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.zeros((nq, k), np.int64)
    for s in range(0, n, block):
        sims = score(s, min(n, s + block))
        cat_s = np.concatenate([best_s, sims], 1)
        cat_i = np.concatenate([best_i, np.arange(s, s + sims.shape[1])[None].repeat(nq, 0)], 1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cat_s, top, 1)
        best_i = np.take_along_axis(cat_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, 1)
    best_i = np.take_along_axis(best_i, order, 1)
    return [[(int(i), float(v)) for i, v in zip(ri, rs)] for ri, rs in zip(best_i, best_s)]


def exact_topk(base: np.ndarray, q: np.ndarray, k: int, block: int = 4096) -> list[list[tuple[int, float]]]:
    """Brute-force top-k by inner product, in blocks of the base (bounded memory)."""
    return _topk(len(base), len(q), k, block, lambda s, e: q @ base[s:e].T)


def index_uri(dst: str, *parts: str) -> str:
    return storage.join(dst, INDEX_DIR, *parts)


def read_meta(dst: str) -> dict[str, Any] | None:
    uri = index_uri(dst, "meta.json")
    if not storage.exists(uri):
        return None
    return dict(json.loads(storage.read_bytes(uri)))


def load(dst: str) -> SearchIndex:
    meta = read_meta(dst)
    if meta is None:
        raise SearchIndexError(f"{dst}: no index (run `aejob index {dst}` first)")
    if meta.get("format_version") not in READABLE_FORMATS:
        raise SearchIndexError(f"{dst}: index format {meta.get('format_version')} is not one of "
                               f"{READABLE_FORMATS}: rebuild it with `aejob index --rebuild`")
    table = pq.read_table(io.BytesIO(storage.read_bytes(index_uri(dst, meta["ids_file"]))))
    dim = int(meta["dim"])
    vecs = _vectors(table.column("embedding")) if table.num_rows else np.zeros((0, dim), np.float32)
    region = (table.column("region").to_numpy().astype(np.int64) if "region" in table.column_names
              else np.full(table.num_rows, FULL, np.int64))
    labels = table.column("id").to_numpy().astype(np.uint64)
    full = region == FULL
    keys = table.column("key").filter(pa.array(full))
    r = int((meta.get("regions") or {}).get("count") or 0)
    regions = np.zeros((len(keys), r, dim), np.float32)
    region_ids = np.full((len(keys), r), -1, np.int64)
    if (~full).any():
        rows = pc.index_in(table.column("key").filter(pa.array(~full)), value_set=keys)
        slots = region[~full]
        if rows.null_count or not r or slots.max() >= r:
            raise SearchIndexError(f"{dst}: the index's id table does not match its meta: rebuild it with "
                                   "`aejob index --rebuild`")
        rows_np = rows.to_numpy(zero_copy_only=False).astype(np.int64)
        regions[rows_np, slots] = vecs[~full]
        region_ids[rows_np, slots] = labels[~full].astype(np.int64)
    shas = table.column("source_sha256").filter(pa.array(full)).to_pylist()
    idx = SearchIndex(meta, labels[full], keys.to_pylist(), shas, np.ascontiguousarray(vecs[full], np.float32),
                      regions=regions, region_ids=region_ids)
    if meta["kind"] == "hnsw":
        from usearch.index import Index

        idx.hnsw = Index.restore(storage.read_bytes(index_uri(dst, meta["hnsw_file"])))
        if idx.hnsw is None:
            raise SearchIndexError(f"{dst}: unreadable HNSW file {meta['hnsw_file']}")
        idx.hnsw.expansion_search = int(meta["hnsw"]["expansion_search"])
    return idx


def _write(dst: str, idx: SearchIndex, old_meta: dict[str, Any] | None) -> None:
    gen = int(old_meta["generation"]) + 1 if old_meta else 1
    dim = idx.vectors.shape[1]
    labels, rows, slots, vecs = idx.flat()
    order = np.lexsort((slots, rows))  # a row's vectors together: full first, then its windows
    rows_o = pa.array(rows[order], pa.int64())
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs[order].reshape(-1), pa.float32()), dim)
    table = pa.table({"id": pa.array(labels[order], pa.uint64()),
                      "key": pa.array(idx.keys, pa.string()).take(rows_o),
                      "source_sha256": pa.array(idx.shas, pa.string()).take(rows_o),
                      "region": pa.array(slots[order], pa.int8()), "embedding": emb})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    meta = dict(idx.meta)
    meta.update(generation=gen, ids_file=f"ids-{gen:06d}.parquet", count=len(idx), vectors=len(labels))
    storage.write_bytes(index_uri(dst, meta["ids_file"]), buf.getvalue())
    if idx.kind == "hnsw":
        meta["hnsw_file"] = f"hnsw-{gen:06d}.usearch"
        storage.write_bytes(index_uri(dst, meta["hnsw_file"]), bytes(idx.hnsw.save()))
    else:
        meta.pop("hnsw_file", None)
    storage.write_bytes(index_uri(dst, "meta.json"), json.dumps(meta, indent=2).encode())
    idx.meta = meta
    if old_meta:  # the previous generation's files are unreferenced now
        for name in (old_meta.get("ids_file"), old_meta.get("hnsw_file")):
            if name and name not in (meta.get("ids_file"), meta.get("hnsw_file")):
                try:
                    storage.delete(index_uri(dst, name))
                except OSError as e:
                    log.warning("could not delete old index file %s: %s", name, e)


def _resolve_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise SearchIndexError(f"--kind must be one of {', '.join(KINDS)}")
    if kind == "auto":
        return "hnsw" if n >= AUTO_HNSW_MIN else "flat"
    return kind


def _layout_name(layout: dict[str, Any] | None) -> str:
    return "full vectors only" if not layout else json.dumps(layout, sort_keys=True)


def build(dst: str, kind: str = "auto", rebuild: bool = False, params: HnswParams = HnswParams()) -> dict[str, Any]:
    """Create or update ``DST/_index``; returns a summary (counts added/replaced/removed, time).

    A second call adds rows new in DST, replaces rows whose ``source_sha256`` changed and drops
    rows whose key is gone (or became an error row), each with all its vectors (full and
    regions). An index never mixes embedding models: a DST with two models, or a DST whose model
    is not the index's, is refused (``rebuild`` starts over from DST when the whole DST moved to
    a new model). Nor does it mix region layouts: an index whose layout is not DST's (an index
    made before DST had region vectors, or the reverse) is rebuilt from DST, and said so in the
    summary (``rebuilt``). Rows of a DST that predate regions (older files, no region vectors)
    are indexed by their full vector only and counted (``rows_without_regions``).
    """
    t0 = time.time()
    opened = open_dst(dst)
    layout = opened[1]
    old_meta = None if rebuild else read_meta(dst)
    old = load(dst) if old_meta else None
    rebuilt = None
    if old is not None and (old.meta.get("regions") or None) != layout:
        rebuilt = (f"region layout changed: the index has {_layout_name(old.meta.get('regions'))}, "
                   f"DST has {_layout_name(layout)}")
        log.warning("%s: %s; rebuilding the index from DST", dst, rebuilt)
        old = None
    old_sha = dict(zip(old.keys, old.shas)) if old else {}
    scan = scan_dst(dst, lambda k, s: old_sha.get(k) != s, opened=opened)
    if len(scan.models) > 1:
        raise SearchIndexError(
            f"{dst} holds embeddings of {len(scan.models)} models ({', '.join(sorted(scan.models))}): an index "
            "never mixes vector spaces; re-run the job so that every row has the same embedding_model")
    model = next(iter(scan.models), None) or (old.model if old else "")
    if old and scan.current and model != old.model:
        raise SearchIndexError(
            f"{dst}: the index holds {old.model!r} vectors but DST now has {model!r}: an index never mixes "
            "models; rebuild it with `aejob index --rebuild`")
    if not scan.current and not old:
        raise SearchIndexError(f"{dst}: no rows with an embedding to index")

    keep_rows = [r for r, (k, s) in enumerate(zip(old.keys, old.shas)) if scan.current.get(k) == s] if old else []
    changed = [k for k in scan.vectors if k in old_sha]
    added = [k for k in scan.vectors if k not in old_sha]
    removed_rows = sorted(set(range(len(old))) - set(keep_rows)) if old else []
    deleted = (len(removed_rows) - len(changed)) if old else 0
    new_keys = changed + added
    dims = {v.shape[0] for v in scan.vectors.values()} | ({old.vectors.shape[1]} if old and len(old) else set())
    if len(dims) > 1:
        raise SearchIndexError(f"{dst}: embeddings of different sizes {sorted(dims)}")
    dim = dims.pop() if dims else int(old.meta["dim"]) if old else 0
    n_reg = int(layout["count"]) if layout else 0
    bad = [k for k in new_keys if k in scan.regions and scan.regions[k].shape != (n_reg, dim)]
    if bad:
        raise SearchIndexError(f"{dst}: region vectors of {bad[0]!r} are {scan.regions[bad[0]].shape}, "
                               f"not ({n_reg}, {dim}) as the layout says")
    next_id = int(old_meta["next_id"]) if old_meta else 0  # labels are never reused, even after a rebuild
    new_vecs = np.stack([scan.vectors[k] for k in new_keys]).astype(np.float32) if new_keys else \
        np.zeros((0, dim), np.float32)
    new_vecs /= np.maximum(np.linalg.norm(new_vecs, axis=1, keepdims=True), 1e-12)  # cosine = inner product
    has = np.array([k in scan.regions for k in new_keys], bool)
    new_regs = np.zeros((len(new_keys), n_reg, dim), np.float32)
    if n_reg and has.any():
        new_regs[has] = np.stack([scan.regions[k] for k in np.asarray(new_keys, object)[has]])
        new_regs /= np.maximum(np.linalg.norm(new_regs, axis=2, keepdims=True), 1e-12)
    # labels: each new row's full vector, then its windows
    per_row = 1 + n_reg * has.astype(np.int64)
    first = next_id + np.cumsum(per_row) - per_row
    new_ids = first.astype(np.uint64)
    new_region_ids = np.where(has[:, None], first[:, None] + 1 + np.arange(n_reg)[None], -1).astype(np.int64)

    kr = np.asarray(keep_rows, np.int64)
    ids = np.concatenate([old.ids[kr] if old else np.zeros(0, np.uint64), new_ids])
    keys = ([old.keys[r] for r in keep_rows] if old else []) + new_keys
    shas = ([old.shas[r] for r in keep_rows] if old else []) + [scan.current[k] for k in new_keys]
    vectors = np.concatenate([old.vectors[kr] if old else np.zeros((0, dim), np.float32), new_vecs])
    regions = np.concatenate([old.regions[kr] if old else np.zeros((0, n_reg, dim), np.float32), new_regs])
    region_ids = np.concatenate([old.region_ids[kr] if old else np.zeros((0, n_reg), np.int64), new_region_ids])
    resolved = _resolve_kind(kind, len(keys))
    hparams = HnswParams(**old_meta["hnsw"]) if old_meta and "hnsw" in old_meta else params
    without = int((region_ids[:, 0] < 0).sum()) if n_reg else None
    if without:
        log.warning("%s: %d of %d rows have no region vectors (written before regions, or with --no-regions): "
                    "they are found by their full vector only", dst, without, len(keys))
    meta = {"format_version": FORMAT_VERSION, "embedding_model": model, "dim": dim, "kind": resolved,
            "requested_kind": kind, "metric": "cosine (inner product of L2-normalised vectors)",
            "regions": layout, "rows_without_regions": without,
            "scoring": ("a row scores the max cosine between the query's full vector and the row's full and "
                        "region vectors" if layout else "cosine between the query's and the row's full vectors"),
            "next_id": int(next_id + per_row.sum()), "hnsw": vars(hparams), "updated_at": time.time(),
            "generation": old_meta["generation"] if old_meta else 0}
    idx = SearchIndex(meta, ids, keys, shas, vectors, regions=regions, region_ids=region_ids)
    reused = bool(old and old.kind == "hnsw" and resolved == "hnsw" and len(removed_rows) <= 0.2 * max(1, len(old)))
    if resolved == "hnsw":
        if reused and old is not None:
            idx.hnsw = old.hnsw
            if removed_rows:  # every vector of a removed row: its full one and its windows
                gone = old.region_ids[removed_rows]
                idx.hnsw.remove(np.concatenate([old.ids[removed_rows], gone[gone >= 0].astype(np.uint64)]))
            add = SearchIndex(meta, new_ids, new_keys, [""] * len(new_keys), new_vecs, regions=new_regs,
                              region_ids=new_region_ids)
        else:
            idx.hnsw = _hnsw(dim, hparams)
            add = idx  # everything goes into a fresh graph
        labels, _, _, vecs = add.flat()
        if len(labels):
            # a small graph is built serially: concurrent inserts race, and on a few dozen nodes
            # a race can cost the true neighbour (a half crop missed 1 time in 6 in
            # test_half_area_crop_found_through_regions); serial, the graph is reproducible, and
            # below this size it takes under 2 s (10k x 256-d here; 2 threads halve a large build)
            idx.hnsw.add(labels, vecs, threads=1 if len(labels) < SERIAL_ADD_BELOW else 0)
    _write(dst, idx, old_meta)
    summary = {"dst": dst, "embedding_model": model, "kind": resolved, "count": len(idx),
               "vectors": idx.vector_count(), "regions": n_reg, "rows_without_regions": without,
               "added": len(added), "replaced": len(changed), "removed": deleted, "skipped_error_rows": scan.skipped,
               "rebuilt": rebuilt, "hnsw_incremental": reused if resolved == "hnsw" else None,
               "seconds": round(time.time() - t0, 3), "bytes": index_bytes(dst)}
    log.info("index %s", json.dumps(summary))
    return summary


def index_bytes(dst: str) -> int:
    meta = read_meta(dst) or {}
    total = 0
    for f in storage.list_files(index_uri(dst)):
        name = f.path.rsplit("/", 1)[-1]
        if name in ("meta.json", meta.get("ids_file"), meta.get("hnsw_file")):
            total += int(f.size or 0)
    return total


# ------------------------------------------------------------------------------- dedup / groups
def duplicate_groups(idx: SearchIndex, threshold: float, k: int = 10, priority: list[int] | None = None,
                     neighbours: list[list[tuple[int, float]]] | None = None) -> list[list[int]]:
    """Near-duplicate groups, each a kept member (first) and the rows scoring ≥ threshold with it.

    Rows are taken in ``priority`` order (the preferred one to keep first; default row order);
    each row not yet grouped becomes a centre and takes its not yet grouped top-k neighbours at
    or above the threshold. Every member is thus a direct match of the kept one: no chaining
    (single linkage merges whole photo collections through one borderline pair). A pair is
    linked when either row's full vector scores ≥ threshold with any vector (full or region) of
    the other: a half-area crop of a picture is linked to it through the window that covers it.
    ``neighbours``: every row's ``idx.search(its full vector, k + 1)``, when already computed
    (a threshold sweep searches once).
    """
    n = len(idx)
    if neighbours is None:
        neighbours = [h for s in range(0, n, 1024) for h in idx.search(idx.vectors[s : s + 1024], k + 1)]
    adj: list[list[int]] = [[] for _ in range(n)]
    for i, hits in enumerate(neighbours):
        for j, score in hits:
            if j != i and score >= threshold:
                adj[i].append(j)
                adj[j].append(i)
    grouped = np.zeros(n, bool)
    groups = []
    for r in priority if priority is not None else range(n):
        if grouped[r] or not adj[r]:
            continue
        members = [r] + sorted({j for j in adj[r] if not grouped[j] and j != r})
        if len(members) > 1:
            grouped[members] = True
            groups.append(members)
    return groups


def write_dedup(dst: str, idx: SearchIndex, threshold: float, k: int = 10) -> dict[str, Any]:
    """``DST/_dedup/groups.parquet`` (group, key, score = the link's cosine with the kept member
    (``SearchIndex.pair_score``), keep) and ``summary.json``. The kept member is the largest
    image (width*height), ties by key; the others are the images scoring at or above
    ``threshold`` with it."""
    sizes = dst_sizes(dst)
    # the largest image first (ties: key order): it becomes the kept member of its group
    priority = sorted(range(len(idx)), key=lambda r: (-sizes.get(idx.keys[r], 0), idx.keys[r]))
    groups = duplicate_groups(idx, threshold, k, priority)
    g_col, k_col, s_col, keep_col, px_col = [], [], [], [], []
    for gi, rows in enumerate(sorted(groups, key=lambda m: idx.keys[m[0]])):
        keeper = rows[0]
        for r in sorted(rows, key=lambda r: idx.keys[r]):
            g_col.append(gi)
            k_col.append(idx.keys[r])
            s_col.append(idx.pair_score(r, keeper) if r != keeper else 1.0)
            keep_col.append(r == keeper)
            px_col.append(sizes.get(idx.keys[r], 0))
    table = pa.table({"group": pa.array(g_col, pa.int32()), "key": pa.array(k_col, pa.string()),
                      "score": pa.array(s_col, pa.float32()), "keep": pa.array(keep_col, pa.bool_()),
                      "pixels": pa.array(px_col, pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(storage.join(dst, DEDUP_DIR, "groups.parquet"), buf.getvalue())
    summary = {"threshold": threshold, "neighbours": k, "rows": len(idx), "groups": len(groups),
               "rows_in_groups": len(k_col), "removable": len(k_col) - len(groups),
               "largest_group": max((len(g) for g in groups), default=0), "embedding_model": idx.model}
    storage.write_bytes(storage.join(dst, DEDUP_DIR, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def kmeans(x: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine), k-means++ seeding: (assignment [n], centroids [k, d]).
    ``write_groups`` clusters the full vectors only (never the region ones)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    centroids = [x[int(rng.integers(n))]]
    d2 = np.full(n, np.inf)
    for _ in range(1, k):
        d2 = np.minimum(d2, np.maximum(0.0, 2 - 2 * x @ centroids[-1]))
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centroids.append(x[int(rng.choice(n, p=p))])
    c = np.stack(centroids).astype(np.float32)
    assign = np.zeros(n, np.int64)
    for it in range(iters):
        new = np.concatenate([np.argmax(x[s : s + 8192] @ c.T, 1) for s in range(0, n, 8192)])
        if it and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            m = x[assign == j]
            if len(m):
                v = m.sum(0)
                c[j] = v / max(float(np.linalg.norm(v)), 1e-12)
            else:  # an empty cluster restarts at the point worst served
                worst = int(np.argmin(np.sum(x * c[assign], 1)))
                c[j] = x[worst]
    return assign, c


def write_groups(dst: str, idx: SearchIndex, k: int, seed: int = 0) -> dict[str, Any]:
    """``DST/_groups/groups.parquet`` (key, group, score = cosine to the centroid) and
    ``summary.json`` (size and the most central keys of each group)."""
    if len(idx) == 0:
        raise SearchIndexError(f"{dst}: the index is empty")
    assign, cent = kmeans(idx.vectors, k, seed=seed)
    score = np.sum(idx.vectors * cent[assign], 1)
    table = pa.table({"key": pa.array(idx.keys, pa.string()), "group": pa.array(assign, pa.int32()),
                      "score": pa.array(score, pa.float32())})
    buf = io.BytesIO()
    pq.write_table(table.sort_by([("group", "ascending"), ("score", "descending")]), buf, compression="zstd")
    storage.write_bytes(storage.join(dst, GROUPS_DIR, "groups.parquet"), buf.getvalue())
    groups = []
    for j in range(len(cent)):
        rows = np.flatnonzero(assign == j)
        top = rows[np.argsort(-score[rows])[:5]]
        groups.append({"group": j, "size": int(len(rows)), "central_keys": [idx.keys[r] for r in top]})
    summary = {"k": len(cent), "rows": len(idx), "embedding_model": idx.model, "groups": groups}
    storage.write_bytes(storage.join(dst, GROUPS_DIR, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary
