"""SRC listing and the read stage.

SRC is a local folder or ``s3://bucket/prefix`` holding any mix of:
- loose images (by extension, case-insensitive) — one *unit* each, key = path relative to SRC;
- tar shards (webdataset style) — one unit per tar; each image member becomes a row with key
  ``<tar key>/<member>``; non-image members (.json/.txt/.cls sidecars) are skipped and counted;
- Parquet files with a binary image column — one unit per file; the ``key`` column is the key
  as is (``<parquet key>/<row>`` when the file has none).
Anything else is skipped and counted.

Units are grouped into output *shards*: one per tar/Parquet file, and chunks of loose files.
The read stage turns unit rows into item rows carrying the raw bytes; it never decodes (a bad
file must become an error row, not a failed task).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
READ_CHUNK_ROWS = 16  # rows per yielded batch: keeps blocks of raw bytes small


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Unit:
    key: str  # relative to SRC, '/'-separated
    uri: str
    kind: str  # "file" | "tar" | "parquet"
    size: int


@dataclass
class Listing:
    src: str
    units: list[Unit]
    skipped: list[str]  # keys of non-image files at the top level

    @property
    def total_bytes(self) -> int:
        return sum(u.size for u in self.units)


def list_source(src: str) -> Listing:
    """List SRC (a folder, a prefix, or a single file) into units, sorted by key."""
    fs, root = storage.resolve(src)
    info = fs.get_file_info(root)
    if info.type == storage.pafs.FileType.NotFound:
        raise FileNotFoundError(f"source not found: {src}")
    if info.type == storage.pafs.FileType.File:
        files = [info]
        root = posixpath.dirname(root) if storage.is_s3(src) else root.rsplit("/", 1)[0]
    else:
        files = storage.list_files(src)
    units, skipped = [], []
    for f in files:
        key = f.path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in key.split("/")):
            continue  # hidden files and folders (e.g. .DS_Store, .ipynb_checkpoints)
        low = key.lower()
        kind = (
            "file" if is_image_name(low)
            else "tar" if low.endswith(TAR_EXTENSIONS)
            else "parquet" if low.endswith(PARQUET_EXTENSIONS)
            else None
        )
        if kind is None:
            skipped.append(key)
            continue
        units.append(Unit(key=key, uri=storage.to_uri(fs, f.path), kind=kind, size=int(f.size or 0)))
    units.sort(key=lambda u: u.key)
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


def plan_shards(units: list[Unit], shard_size: int) -> list[Shard]:
    """Group pending units: one shard per container, loose files in sorted chunks."""
    shards: list[Shard] = []
    loose: list[Unit] = []
    for u in units:
        if u.kind == "file":
            loose.append(u)
        else:
            shards.append(Shard(shard_name_for([u.key], u.kind), (u,)))
    for i in range(0, len(loose), max(1, shard_size)):
        chunk = loose[i : i + shard_size]
        shards.append(Shard(shard_name_for([u.key for u in chunk], "file"), tuple(chunk)))
    return shards


def unit_rows(shards: list[Shard]) -> list[dict[str, Any]]:
    return [
        {"unit": u.key, "uri": u.uri, "kind": u.kind, "size": u.size, "shard": s.name}
        for s in shards
        for u in s.units
    ]


# ---- read stage --------------------------------------------------------------------------

ITEM_COLUMNS = (
    "key", "source_uri", "shard", "unit", "unit_items", "kind", "data",
    "status", "error", "note", "source_sha256", "source_bytes", "skipped_members",
)


def _row(unit: dict[str, Any], key: str, uri: str, data: bytes | None, *, error: str | None = None,
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
    }


def _to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for col in ITEM_COLUMNS:
        vals = [r[col] for r in rows]
        if col in ("unit_items", "source_bytes", "skipped_members"):
            out[col] = np.asarray(vals, dtype=np.int64)
        else:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            out[col] = arr
    return out


def _read_tar(unit: dict[str, Any], blob: bytes) -> tuple[list[dict[str, Any]], int]:
    rows, skipped, seen = [], 0, set()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            if not is_image_name(m.name):
                skipped += 1
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
            rows.append(_row(unit, key, f"{unit['uri']}#{name}", data))
    return rows, skipped


def _read_parquet(unit: dict[str, Any], blob: bytes, image_column: str) -> list[dict[str, Any]]:
    table = pq.read_table(pa.BufferReader(blob))
    if image_column not in table.column_names:
        raise ValueError(f"no column {image_column!r} (columns: {', '.join(table.column_names)})")
    images = table.column(image_column).to_pylist()
    keys = (table.column("key").to_pylist() if "key" in table.column_names
            else [f"{unit['unit']}/{i}" for i in range(len(images))])
    rows, seen = [], set()
    for i, (k, data) in enumerate(zip(keys, images)):
        key = str(k) if k is not None else f"{unit['unit']}/{i}"
        uri = f"{unit['uri']}#row={i}"
        if key in seen:
            rows.append(_row(unit, f"{key}#dup{i}", uri, None, error=f"duplicate key {key!r} in source"))
            continue
        seen.add(key)
        if data is None:
            rows.append(_row(unit, key, uri, None, error=f"null {image_column!r} value"))
        else:
            rows.append(_row(unit, key, uri, bytes(data)))
    return rows


def read_units(batch: dict[str, np.ndarray], image_column: str = "image") -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: unit rows -> item rows with raw bytes (a generator: blocks stay small).

    Every row of a unit carries ``unit_items`` (how many item rows that unit yields) so the
    writer knows when a shard is complete; a unit with no images yields one ``kind='meta'`` row.
    """
    pending: list[dict[str, Any]] = []
    for i in range(len(batch["unit"])):
        unit = {c: batch[c][i] for c in ("unit", "uri", "kind", "shard")}
        rows: list[dict[str, Any]]
        skipped = 0
        try:
            blob = storage.read_bytes(str(unit["uri"]))
            if unit["kind"] == "file":
                rows = [_row(unit, str(unit["unit"]), str(unit["uri"]), blob)]
            elif unit["kind"] == "tar":
                rows, skipped = _read_tar(unit, blob)
            else:
                rows = _read_parquet(unit, blob, image_column)
        except Exception as e:  # unreadable file or container: one error row for the unit
            what = {"file": "read failed", "tar": "unreadable tar", "parquet": "unreadable Parquet"}
            msg = f"{what.get(str(unit['kind']), 'read failed')}: {type(e).__name__}: {e}"
            rows = [_row(unit, str(unit["unit"]), str(unit["uri"]), None, error=msg)]
        if not rows:
            rows = [_row(unit, f"{unit['unit']}#empty", str(unit["uri"]), None, kind="meta")]
            rows[0]["unit_items"] = 0
        else:
            for r in rows:
                r["unit_items"] = len(rows)
        rows[0]["skipped_members"] = skipped
        for r in rows:
            pending.append(r)
            if len(pending) >= READ_CHUNK_ROWS:
                yield _to_batch(pending)
                pending = []
    if pending:
        yield _to_batch(pending)
