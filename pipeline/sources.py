"""SRC listing and the read stage.

SRC is one of:
- a local folder or ``s3://bucket/prefix``, listed page by page in key byte order (S3's
  ListObjectsV2 order; local folders are walked in sorted order so the full keys come out the
  same way) and never held whole;
- a single file;
- an **S3 Inventory report**: its ``manifest.json`` (local or ``s3://``). The CSV (gzip'd,
  URL-encoded keys) or Parquet data files it names in the destination bucket are streamed one
  by one; each listed object becomes ``s3://<sourceBucket>/<key>`` with key = the object key.
  Delete markers and non-latest versions are left out. Inventory order is kept (deterministic);
- a **Parquet key list**: a ``.parquet`` file with a string ``uri`` column and no binary column
  (a Parquet file with image bytes keeps its meaning: one unit of images). Optional columns
  ``key`` (default: the uri's part after the bucket, or after the folder all local uris share),
  ``size`` and ``version``. Relative local uris are relative to the list's folder.

Each listed object is a *unit*, by extension (case-insensitive):
- loose images — one unit each, key = path relative to SRC;
- tar shards (webdataset style) — each image member becomes a row with key ``<tar key>/<member>``;
  non-image members (.json/.txt/.cls sidecars) are skipped and counted;
- Parquet files with a binary image column — the ``key`` column is the key as is
  (``<parquet key>/<row>`` when the file has none).
Anything else is skipped and counted; hidden files and folders are left out.

Units are grouped into output *shards*: one per tar/Parquet file, and chunks of loose files.
The read stage turns unit rows into item rows carrying the raw bytes, streaming containers
(tar members one by one, Parquet in small batches); it never decodes (a bad file must become an
error row, not a failed task). Every unit ends with one ``kind='meta'`` row that carries the
number of item rows the unit yielded (a streamed container's count is known only at its end).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
READ_CHUNK_ROWS = 16  # rows per yielded batch: keeps blocks of raw bytes small
READ_CHUNK_BYTES = 16 << 20  # and fewer rows when the images are large
LIST_PAGE_KEYS = 1000  # ListObjectsV2 page size (S3's maximum)
KEYLIST_BATCH_ROWS = 8192  # rows per batch read from key lists and inventory files
PARQUET_READ_ROWS = 4  # image rows per batch read from a Parquet input
STREAM_BUFFER = 4 << 20  # S3 reads are ranged GETs: read containers in 4 MiB requests, not 10 kB
SKIPPED_EXAMPLES = 20


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _kind_of(name: str) -> str | None:
    low = name.lower()
    if low.endswith(IMAGE_EXTENSIONS):
        return "file"
    if low.endswith(TAR_EXTENSIONS):
        return "tar"
    if low.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return None


def _is_hidden(key: str) -> bool:  # e.g. .DS_Store, .ipynb_checkpoints/
    return any(part.startswith(".") for part in key.split("/"))


@dataclass(frozen=True)
class Unit:
    key: str  # DST key: relative to SRC, '/'-separated
    uri: str  # where to read it (local path or s3://bucket/key)
    kind: str  # "file" | "tar" | "parquet"
    size: int
    version: str = ""  # change token: local mtime_ns; S3 "<ETag>@<LastModified>" as listed (no extra request)


@dataclass
class ListingStats:
    """Filled while :func:`iter_units` is consumed (bounded: only the first skipped keys)."""

    units: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def skip(self, key: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < SKIPPED_EXAMPLES:
            self.skipped_examples.append(key)


@dataclass
class Listing:
    src: str
    units: list[Unit]
    skipped: list[str]  # keys of non-image files

    @property
    def total_bytes(self) -> int:
        return sum(u.size for u in self.units)


@dataclass(frozen=True)
class _Entry:
    """One listed object before classification; an empty uri means an unusable row (skipped)."""

    key: str
    uri: str
    size: int = 0
    version: str = ""


# ---- versions -----------------------------------------------------------------------------


def _iso_s(t: Any) -> str:
    """S3 LastModified in one form whatever the source (boto3 datetime, inventory CSV text,
    Parquet timestamp or epoch ms), so a listing, a HEAD and an inventory give equal versions
    (S3 keeps whole seconds; HEAD's Last-Modified header has no milliseconds)."""
    if t is None or t == "":
        return ""
    if isinstance(t, (int, np.integer)):
        t = dt.datetime.fromtimestamp(int(t) / 1000, dt.timezone.utc)
    if isinstance(t, str):
        try:
            t = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            return t
    if isinstance(t, dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        t = t.astimezone(dt.timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(t)


def _s3_version(etag: Any, last_modified: Any) -> str:
    e = str(etag or "").strip('"')
    m = _iso_s(last_modified)
    return f"{e}@{m}" if e or m else ""


# ---- listers ------------------------------------------------------------------------------


def _walk_local(root: str) -> Iterator[_Entry]:
    """Files under ``root`` in byte order of their relative keys, hidden names left out.

    Entries sort by name + '/' for folders: "a.png" < "a/x.png" as full keys, which a plain
    sort of names would invert. Only one folder's names are held at a time per level.
    """
    seen: set[tuple[int, int]] = set()  # folders already walked (symlink loops)

    def walk(path: str, prefix: str) -> Iterator[_Entry]:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(path) as it:
            entries = [(e.name + "/" if e.is_dir() else e.name, e) for e in it if not e.name.startswith(".")]
        entries.sort(key=lambda t: t[0])
        for sort_name, e in entries:
            if sort_name.endswith("/"):
                yield from walk(e.path, prefix + sort_name)
            elif e.is_file():
                s = e.stat()
                yield _Entry(prefix + e.name, e.path, int(s.st_size), str(s.st_mtime_ns))

    yield from walk(root, "")


def _missing(e: Exception) -> bool:
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _walk_s3(bucket: str, prefix: str, must_exist: bool, src: str) -> Iterator[_Entry]:
    """Objects under ``prefix``, one ListObjectsV2 page at a time (S3 returns them in key order)."""
    client = storage.s3_client()
    kwargs: dict[str, Any] = {"Bucket": bucket, "MaxKeys": LIST_PAGE_KEYS}
    if prefix:
        kwargs["Prefix"] = prefix
    first = True
    while True:
        resp = client.list_objects_v2(**kwargs)
        contents = resp.get("Contents") or []
        if first and not contents and must_exist:
            raise FileNotFoundError(f"source not found: {src}")
        first = False
        for o in contents:
            k = str(o["Key"])
            rel = k[len(prefix):].lstrip("/")
            if not rel or k.endswith("/") or _is_hidden(rel):  # folder markers, hidden names
                continue
            yield _Entry(rel, f"s3://{bucket}/{k}", int(o.get("Size") or 0),
                         _s3_version(o.get("ETag"), o.get("LastModified")))
        if not resp.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = resp["NextContinuationToken"]


def _norm(col: str) -> str:
    """Inventory column names: CSV schema says "LastModifiedDate", Parquet "last_modified_date"."""
    return col.strip().lower().replace("_", "")


_INVENTORY_COLUMNS = ("key", "size", "etag", "lastmodifieddate", "islatest", "isdeletemarker")


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() == "true")


def _inventory_batches(uri: str, fmt: str, csv_columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """One inventory data file as batches of {normalised column: values}, never whole."""
    fs, path = storage.resolve(uri)
    if fmt == "csv":
        wanted = [c for c in csv_columns if _norm(c) in _INVENTORY_COLUMNS]
        # AWS writes gzip'd CSV without a header; every value is read as text
        with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None,
                                  buffer_size=STREAM_BUFFER) as f:
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(column_names=csv_columns, block_size=1 << 20),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in csv_columns},
                                                     include_columns=wanted))
            for batch in reader:
                yield {_norm(n): batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)}
        return
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=STREAM_BUFFER)
        cols = [n for n in pf.schema_arrow.names if _norm(n) in _INVENTORY_COLUMNS]
        for batch in pf.iter_batches(columns=cols, batch_size=KEYLIST_BATCH_ROWS):
            yield {_norm(n): batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)}


def _walk_inventory(manifest: dict[str, Any], src: str) -> Iterator[_Entry]:
    fmt = str(manifest.get("fileFormat", "")).lower()
    if fmt == "orc":
        raise ValueError(f"{src}: ORC inventory reports are not supported; configure the S3 Inventory "
                         "with CSV or Parquet output (or pass a Parquet key list)")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"{src}: unknown inventory fileFormat {manifest.get('fileFormat')!r}")
    dest = str(manifest["destinationBucket"])
    dest_bucket = dest.rsplit(":", 1)[-1] if dest.startswith("arn:") else dest  # arn:aws:s3:::name
    src_bucket = str(manifest["sourceBucket"])
    csv_columns = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",") if c.strip()]
    if fmt == "csv" and not any(_norm(c) == "key" for c in csv_columns):
        raise ValueError(f"{src}: the inventory's fileSchema has no Key column: {manifest.get('fileSchema')!r}")
    for f in manifest["files"]:
        for cols in _inventory_batches(f"s3://{dest_bucket}/{f['key']}", fmt, csv_columns):
            keys = cols["key"]
            n = len(keys)
            none = [None] * n
            sizes, etags, mtimes = cols.get("size", none), cols.get("etag", none), cols.get("lastmodifieddate", none)
            latest, deleted = cols.get("islatest"), cols.get("isdeletemarker")
            for i in range(n):
                if (latest is not None and latest[i] is not None and not _truthy(latest[i])) or (
                        deleted is not None and _truthy(deleted[i])):
                    continue  # older versions and delete markers are not current objects
                raw = keys[i]
                if not raw:
                    yield _Entry(f"<{f['key']} row {i}>", "")
                    continue
                key = unquote_plus(raw) if fmt == "csv" else str(raw)  # CSV keys are URL-encoded
                if key.endswith("/") or _is_hidden(key):
                    continue
                yield _Entry(key, f"s3://{src_bucket}/{key}", int(sizes[i] or 0), _s3_version(etags[i], mtimes[i]))


def _is_keylist(schema: pa.Schema) -> bool:
    if "uri" not in schema.names:
        return False
    t = schema.field("uri").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return False
    return not any(pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                   or pa.types.is_fixed_size_binary(f.type) for f in schema)


def _keylist_uri(raw: str, base: str) -> str:
    """A key list's uri: s3:// as is; local paths absolute, relative ones against the list's folder."""
    if storage.is_s3(raw):
        return raw
    if raw.startswith("file://"):
        raw = raw[len("file://"):]
    if os.path.isabs(raw):
        return os.path.normpath(raw)
    return storage.join(base, raw) if storage.is_s3(base) else os.path.normpath(os.path.join(base, raw))


def _walk_keylist(pf: pq.ParquetFile, src: str) -> Iterator[_Entry]:
    names = pf.schema_arrow.names
    base = posixpath.dirname(src.rstrip("/")) if storage.is_s3(src) else os.path.dirname(os.path.abspath(src))
    cols = [c for c in ("uri", "key", "size", "version") if c in names]
    common = None
    if "key" not in names:  # keys relative to the folder all local uris share: one pass over uris first
        for batch in pf.iter_batches(columns=["uri"], batch_size=KEYLIST_BATCH_ROWS):
            for raw in batch.column(0).to_pylist():
                if raw and not storage.is_s3(raw):
                    d = os.path.dirname(_keylist_uri(raw, base))
                    common = d if common is None else os.path.commonpath([common, d])
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=KEYLIST_BATCH_ROWS):
        d = batch.to_pydict()
        n = batch.num_rows
        none = [None] * n
        for i in range(n):
            raw, key = d["uri"][i], d.get("key", none)[i]
            row += 1
            if not raw:
                yield _Entry(str(key) if key else f"<row {row - 1}>", "")
                continue
            uri = _keylist_uri(str(raw), base)
            if not key:
                if storage.is_s3(uri):
                    key = storage.split_s3(uri)[1]
                elif storage.is_s3(base):
                    key = uri[len(base):].lstrip("/")
                else:
                    key = os.path.relpath(uri, common or "/").replace(os.sep, "/")
            yield _Entry(str(key), uri, int(d.get("size", none)[i] or 0), str(d.get("version", none)[i] or ""))


def _read_manifest(src: str) -> dict[str, Any] | None:
    """The S3 Inventory manifest at ``src``, or None when the JSON is something else."""
    try:
        m = json.loads(storage.read_bytes(src))
    except ValueError:
        return None
    if isinstance(m, dict) and {"sourceBucket", "destinationBucket", "fileFormat", "files"} <= m.keys():
        return m
    return None


def _single_file(key: str, uri: str, size: int, version: str, src: str) -> tuple[str, Iterator[_Entry]]:
    """A single-file SRC: an inventory manifest, a Parquet key list, or one unit."""
    low = key.lower()
    if low.endswith(".json"):
        manifest = _read_manifest(uri) if size < (64 << 20) else None
        if manifest is not None:
            what = (f"S3 Inventory report ({manifest.get('fileFormat')}, {len(manifest['files'])} data files, "
                    f"source bucket {manifest['sourceBucket']})")
            return what, _walk_inventory(manifest, src)
    if low.endswith(PARQUET_EXTENSIONS):
        fs, path = storage.resolve(uri)
        f = fs.open_input_file(path)
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=STREAM_BUFFER)
        if _is_keylist(pf.schema_arrow):
            what = f"Parquet key list ({pf.metadata.num_rows} rows, {pf.metadata.num_row_groups} row groups)"
            return what, _closing(_walk_keylist(pf, src), f)
        f.close()
    entries = iter([] if _is_hidden(key) else [_Entry(key, uri, size, version)])
    return "single file", entries


def _closing(it: Iterator[_Entry], f: Any) -> Iterator[_Entry]:
    try:
        yield from it
    finally:
        f.close()


def _open_source(src: str) -> tuple[str, Iterator[_Entry]]:
    """(what kind of SRC, its entries as a lazy stream)."""
    if storage.is_s3(src):
        bucket, key = storage.split_s3(src.rstrip("/"))
        if key:
            try:
                head = storage.s3_client().head_object(Bucket=bucket, Key=key)
            except Exception as e:
                if not _missing(e):
                    raise
            else:
                return _single_file(posixpath.basename(key), f"s3://{bucket}/{key}",
                                    int(head.get("ContentLength") or 0),
                                    _s3_version(head.get("ETag"), head.get("LastModified")), src)
        what = "S3 prefix (paged ListObjectsV2, key order)"
        return what, _walk_s3(bucket, f"{key}/" if key else "", must_exist=bool(key), src=src)
    root = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(root):
        return "local folder (sorted walk)", _walk_local(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"source not found: {src}")
    st = os.stat(root)
    return _single_file(os.path.basename(root), root, int(st.st_size), str(st.st_mtime_ns), src)


def _iter_units(src: str, stats: ListingStats, on_skip: Callable[[str], None] | None) -> Iterator[Unit]:
    t0 = time.monotonic()
    what, entries = _open_source(src)
    log.info("SRC %s: %s", src, what)
    for e in entries:
        kind = _kind_of(e.uri) if e.uri else None
        if kind is None:
            stats.skip(e.key)
            if on_skip is not None:
                on_skip(e.key)
            continue
        stats.units += 1
        stats.bytes += e.size
        stats.seconds = time.monotonic() - t0
        yield Unit(key=e.key, uri=e.uri, kind=kind, size=e.size, version=e.version)
    stats.seconds = time.monotonic() - t0


def iter_units(src: str, stats: ListingStats | None = None) -> Iterator[Unit]:
    """SRC's units as a stream, page by page, never the whole listing at once.

    Folders and S3 prefixes come in key byte order; inventories and key lists in their own
    (deterministic) order. ``stats`` is filled as the stream is consumed.
    """
    return _iter_units(src, stats if stats is not None else ListingStats(), None)


def list_source(src: str) -> Listing:
    """The whole listing, sorted by key: for small callers (verify, tests)."""
    skipped: list[str] = []
    units = sorted(_iter_units(src, ListingStats(), skipped.append), key=lambda u: u.key)
    return Listing(src=src, units=units, skipped=sorted(skipped))


def shard_name_for(unit_keys: list[str], kind: str) -> str:
    """Deterministic shard name: the container's key, or a hash of a chunk's sorted keys."""
    if kind in ("tar", "parquet"):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in unit_keys[0])
        digest = hashlib.sha1(unit_keys[0].encode()).hexdigest()[:8]
        return f"{safe[-80:]}-{digest}"
    digest = hashlib.sha1("\n".join(sorted(unit_keys)).encode()).hexdigest()[:16]
    return f"files-{digest}"


@dataclass(frozen=True)
class Shard:
    name: str
    units: tuple[Unit, ...]


def iter_shards(units: Iterable[Unit], shard_size: int) -> Iterator[Shard]:
    """Group units as they arrive: a container is its own shard at once, loose files go out in
    chunks of ``shard_size`` (the last, shorter chunk at the end). Holds one chunk at most."""
    size = max(1, shard_size)
    loose: list[Unit] = []
    for u in units:
        if u.kind != "file":
            yield Shard(shard_name_for([u.key], u.kind), (u,))
            continue
        loose.append(u)
        if len(loose) >= size:
            yield Shard(shard_name_for([x.key for x in loose], "file"), tuple(loose))
            loose = []
    if loose:
        yield Shard(shard_name_for([x.key for x in loose], "file"), tuple(loose))


def plan_shards(units: list[Unit], shard_size: int) -> list[Shard]:
    """All shards of ``units`` at once (see :func:`iter_shards`)."""
    return list(iter_shards(units, shard_size))


def unit_rows(shards: list[Shard]) -> list[dict[str, Any]]:
    return [
        {"unit": u.key, "uri": u.uri, "kind": u.kind, "size": u.size, "version": u.version, "shard": s.name}
        for s in shards
        for u in s.units
    ]


# ---- read stage --------------------------------------------------------------------------

ITEM_COLUMNS = (
    "key", "source_uri", "shard", "unit", "unit_items", "kind", "data",
    "status", "error", "note", "source_sha256", "source_bytes", "skipped_members", "source_version",
)
_INT_COLUMNS = ("unit_items", "source_bytes", "skipped_members")
_WHAT_FAILED = {"file": "read failed", "tar": "unreadable tar", "parquet": "unreadable Parquet"}


def _row(unit: dict[str, str], key: str, uri: str, data: bytes | None, *, error: str | None = None,
         kind: str = "item") -> dict[str, Any]:
    return {
        "key": key,
        "source_uri": uri,
        "shard": unit["shard"],
        "unit": unit["unit"],
        "unit_items": 0,
        "kind": kind,
        "data": data,
        "status": "error" if error else "ok",
        "error": error,
        "note": None,
        "source_sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "source_bytes": len(data) if data is not None else 0,
        "skipped_members": 0,
        "source_version": unit["version"],
    }


def _to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for col in ITEM_COLUMNS:
        vals = [r[col] for r in rows]
        if col in _INT_COLUMNS:
            out[col] = np.asarray(vals, dtype=np.int64)
        else:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            out[col] = arr
    return out


def _tar_items(unit: dict[str, str], skipped: list[int]) -> Iterator[dict[str, Any]]:
    """Tar members one by one from a stream (``r|*``): one member in memory at a time."""
    fs, path = storage.resolve(unit["uri"])
    seen: set[str] = set()
    with fs.open_input_stream(path, compression=None, buffer_size=STREAM_BUFFER) as raw, \
            tarfile.open(fileobj=raw, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            if not is_image_name(m.name):
                skipped[0] += 1
                continue
            name = m.name.lstrip("./")
            key = f"{unit['unit']}/{name}"
            if key in seen:  # a tar may repeat a member name; keys must stay unique
                n = 2
                while f"{key}#{n}" in seen:
                    n += 1
                key = f"{key}#{n}"
            seen.add(key)
            f = tf.extractfile(m)
            data = f.read() if f is not None else b""
            yield _row(unit, key, f"{unit['uri']}#{name}", data)


def _parquet_items(unit: dict[str, str], image_column: str) -> Iterator[dict[str, Any]]:
    """Image rows in small batches, row group by row group (no pre-buffering of the file)."""
    fs, path = storage.resolve(unit["uri"])
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=STREAM_BUFFER)
        names = pf.schema_arrow.names
        if image_column not in names:
            raise ValueError(f"no column {image_column!r} (columns: {', '.join(names)})")
        has_key = "key" in names
        seen: set[str] = set()
        i = 0
        for batch in pf.iter_batches(columns=[image_column] + (["key"] if has_key else []),
                                     batch_size=PARQUET_READ_ROWS):
            images = batch.column(0).to_pylist()
            keys = batch.column(1).to_pylist() if has_key else [None] * len(images)
            for k, data in zip(keys, images):
                key = str(k) if k is not None else f"{unit['unit']}/{i}"
                uri = f"{unit['uri']}#row={i}"
                if key in seen:
                    yield _row(unit, f"{key}#dup{i}", uri, None, error=f"duplicate key {key!r} in source")
                elif data is None:
                    seen.add(key)
                    yield _row(unit, key, uri, None, error=f"null {image_column!r} value")
                else:
                    seen.add(key)
                    yield _row(unit, key, uri, bytes(data))
                i += 1


def _failure(unit: dict[str, str], e: Exception, before_any: bool) -> str:
    if before_any and isinstance(e, OSError) and not isinstance(e, storage.ArchivedObjectError) \
            and storage.is_s3(unit["uri"]):
        tier = storage.archived_storage_class(unit["uri"])  # one HEAD, only for failed opens
        if tier:
            e = storage.ArchivedObjectError(f"object is in an archive storage class ({tier}): restore it first")
    return f"{_WHAT_FAILED.get(unit['kind'], 'read failed')}: {type(e).__name__}: {e}"


def unit_items(unit: dict[str, str], image_column: str = "image") -> Iterator[dict[str, Any]]:
    """One unit's rows: its item rows (an error row where reading stopped), then its end row.

    A container failing midway keeps the rows already yielded and adds one error row keyed
    ``<unit>#error``; a loose file's error row takes the file's key. The end row (``kind='meta'``,
    key ``<unit>#end``) carries ``unit_items`` = the item rows yielded and ``skipped_members``.
    """
    count, skipped = 0, [0]
    try:
        items: Iterator[dict[str, Any]]
        if unit["kind"] == "file":
            items = iter([_row(unit, unit["unit"], unit["uri"], storage.read_bytes(unit["uri"]))])
        elif unit["kind"] == "tar":
            items = _tar_items(unit, skipped)
        else:
            items = _parquet_items(unit, image_column)
        for r in items:
            count += 1
            yield r
    except Exception as e:  # unreadable file or container: one error row, the unit goes on
        key = unit["unit"] if unit["kind"] == "file" else f"{unit['unit']}#error"
        count += 1
        yield _row(unit, key, unit["uri"], None, error=_failure(unit, e, before_any=count == 1))
    end = _row(unit, f"{unit['unit']}#end", unit["uri"], None, kind="meta")
    end["unit_items"] = count
    end["skipped_members"] = skipped[0]
    yield end


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v)


def read_units(batch: dict[str, np.ndarray], image_column: str = "image",
               env: dict[str, str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: plan rows (unit, uri, kind, shard[, version]) -> item rows with raw bytes.

    A generator yielding at most ``READ_CHUNK_ROWS`` rows (or about ``READ_CHUNK_BYTES``) per
    block; containers are streamed, so a worker holds one tar member or one small Parquet
    batch, never a whole container.
    Every unit ends with one ``kind='meta'`` row (see :func:`unit_items`). ``env``: the
    driver's storage settings (``storage.job_env``).
    """
    storage.apply_env(env)
    versions = batch.get("version")
    pending: list[dict[str, Any]] = []
    nbytes = 0
    for i in range(len(batch["unit"])):
        unit = {c: _text(batch[c][i]) for c in ("unit", "uri", "kind", "shard")}
        unit["version"] = _text(versions[i]) if versions is not None else ""
        for r in unit_items(unit, image_column):
            pending.append(r)
            nbytes += r["source_bytes"]
            if len(pending) >= READ_CHUNK_ROWS or nbytes >= READ_CHUNK_BYTES:
                yield _to_batch(pending)
                pending, nbytes = [], 0
    if pending:
        yield _to_batch(pending)
