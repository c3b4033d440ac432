"""Worker-side output: the write stage and the shard publisher. No data byte goes through the driver.

Rows of one shard reach the end of the pipeline spread over several batches, in any order and
possibly more than once (actor pools and lost nodes retry tasks). So:

1. ``write_parts`` (a Ray Data stage on CPU workers) writes each batch's rows of each shard as one
   *part* file under ``_tmp/<run>/parts/<shard>/``, named by a digest of its keys: a retried task
   rewrites the same part instead of adding a second copy. It returns small metadata rows only
   (per shard and unit: rows, ok/error counts, the unit's end-row count, the part's name and size).
2. The driver adds up that metadata; once every unit of a shard has delivered all its rows it
   starts ``publish_shard`` (a Ray task, on a worker): the parts are merged into one file with
   repeated keys dropped, the file is published whole under its final name (atomic rename, or a
   server-side copy on S3), and the parts are deleted. Then the driver writes the done-marker.

A crash leaves at most ``_tmp/`` files and marker-less data files, which the next run removes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.batch import normalize, objects

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

ROW_GROUP_ROWS = 64
META_COLUMNS = ("shard", "unit", "version", "part", "part_bytes", "rows", "ok", "error", "end",
                "unit_items", "skipped_members", "node")


def parts_dir(dst: str, run_id: str, shard: str) -> str:
    return storage.join(dst, layout.TMP, run_id, "parts", shard)


def _node() -> str:
    """Where this code runs: the Ray node id when inside Ray (tests check who wrote what)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray, or an old runtime context
        pass
    return socket.gethostname()


def _column(batch: Batch, name: str, idx: list[int], typ: pa.DataType) -> pa.Array:
    if name not in batch:
        return pa.nulls(len(idx), typ)
    col = batch[name]
    if pa.types.is_fixed_size_list(typ):  # embeddings travel as float32 bytes (nullable)
        sizes = [typ.list_size]  # [dim], or [regions, dim] for region_embeddings
        while pa.types.is_fixed_size_list(typ.value_type):
            typ = typ.value_type
            sizes.append(typ.list_size)
        size = int(np.prod(sizes))
        flat = np.zeros((len(idx), size), np.float32)
        valid = np.zeros(len(idx), bool)
        for j, i in enumerate(idx):
            v = col[i]
            if v is None:
                continue
            arr = np.frombuffer(v, np.float32) if isinstance(v, (bytes, bytearray)) else np.asarray(v, np.float32)
            if arr.size == size:
                flat[j], valid[j] = arr.reshape(-1), True
        values: pa.Array = pa.array(flat.reshape(-1))
        for n in reversed(sizes[1:]):
            values = pa.FixedSizeListArray.from_arrays(values, n)
        return pa.FixedSizeListArray.from_arrays(values, sizes[0], mask=pa.array(~valid))
    vals = [col[i] for i in idx]
    if col.dtype.kind == "f":
        return pa.array([None if np.isnan(v) else float(v) for v in vals], typ)
    if col.dtype.kind in "iu":
        return pa.array([int(v) for v in vals], typ)
    vals = [v.item() if isinstance(v, np.generic) else v for v in vals]
    return pa.array(vals, typ)


def to_table(batch: Batch, idx: list[int], schema: pa.Schema) -> pa.Table:
    """Rows ``idx`` of a numpy batch as an Arrow table with exactly ``schema``."""
    return pa.Table.from_arrays([_column(batch, f.name, idx, f.type) for f in schema], schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as Parquet: zstd and dictionaries for the small columns; binary payloads (encoded
    images, entropy-coded streams) stored plain, as they neither compress nor repeat (both only
    cost CPU on every write and read: 33 -> 18 ms to write a 68-image shard, 8.7 -> 2.2 ms to read)."""
    binary = {f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS,
                   compression={n: "none" if n in binary else "zstd" for n in table.column_names},
                   use_dictionary=[n for n in table.column_names if n not in binary])
    return buf.getvalue()


def write_parts(batch: Batch, dst: str, run_id: str, schema: pa.Schema, env: dict[str, str] | None = None) -> Batch:
    """Ray Data stage: write this batch's item rows as one part file per shard; return metadata."""
    storage.apply_env(env)
    batch = normalize(batch)
    batch["run_id"] = objects([run_id] * len(batch["key"]))
    node = _node()
    by_shard: dict[str, list[int]] = defaultdict(list)
    for i in range(len(batch["key"])):
        by_shard[str(batch["shard"][i])].append(i)
    out: dict[str, list[Any]] = {c: [] for c in META_COLUMNS}
    for shard, idx in by_shard.items():
        items = [i for i in idx if batch["kind"][i] == "item"]
        part, nbytes = "", 0
        if items:
            keys = sorted(str(batch["key"][i]) for i in items)
            part = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20] + layout.DATA_SUFFIX
            data = parquet_bytes(to_table(batch, items, schema).sort_by("key"))
            storage.write_bytes(storage.join(parts_dir(dst, run_id, shard), part), data)
            nbytes = len(data)
        units: dict[str, dict[str, Any]] = {}
        for i in idx:
            u = units.setdefault(str(batch["unit"][i]), {"rows": 0, "ok": 0, "error": 0, "end": False,
                                                          "unit_items": 0, "skipped_members": 0, "version": ""})
            if batch["kind"][i] == "item":
                u["rows"] += 1
                u["ok" if batch["status"][i] == "ok" else "error"] += 1
                if "source_version" in batch and batch["source_version"][i]:
                    u["version"] = str(batch["source_version"][i])
            else:  # the unit's end row: how many item rows the unit has in all
                u["end"] = True
                u["unit_items"] = int(batch["unit_items"][i])
                u["skipped_members"] = int(batch["skipped_members"][i])
        for unit, u in units.items():
            for c, v in (("shard", shard), ("unit", unit), ("part", part), ("part_bytes", nbytes), ("node", node)):
                out[c].append(v)
            for c in ("version", "rows", "ok", "error", "end", "unit_items", "skipped_members"):
                out[c].append(u[c])
    res: Batch = {c: objects(out[c]) for c in ("shard", "unit", "version", "part", "node")}
    for c in ("part_bytes", "rows", "ok", "error", "unit_items", "skipped_members"):
        res[c] = np.asarray(out[c], dtype=np.int64)
    res["end"] = np.asarray(out["end"], dtype=bool)
    return res


@dataclass
class ShardProgress:
    """What the driver knows of one in-flight shard: units seen, their counts, its parts."""

    name: str
    n_units: int
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> unit -> rows
    started: float = field(default_factory=time.time)

    def add(self, row: dict[str, Any]) -> None:
        u = self.units.setdefault(row["unit"], {"items": None, "skipped_members": 0, "version": ""})
        if row["end"]:
            u["items"] = int(row["unit_items"])
            u["skipped_members"] = int(row["skipped_members"])
        if row["version"]:
            u["version"] = row["version"]
        if row["part"]:  # a retried part repeats its name: counted once
            self.parts.setdefault(row["part"], {})[row["unit"]] = int(row["rows"])

    def received(self, unit: str) -> int:
        return sum(p.get(unit, 0) for p in self.parts.values())

    def complete(self) -> bool:
        return len(self.units) >= self.n_units and all(
            u["items"] is not None and self.received(k) >= u["items"] for k, u in self.units.items())


def _read(uri: str, schema: pa.Schema | None = None) -> pa.Table:
    """One Parquet file whole. Through ``ParquetFile``, not ``pq.read_table``: the latter imports
    ``pyarrow.dataset`` on first use (0.25 s), which a publish task at the end of a run waited on."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read()
    if schema is not None and not table.schema.equals(schema):
        table = table.cast(schema)  # parts are written with the job's schema: this is a safeguard
    return table


def _publish_table(dst: str, run_id: str, table: pa.Table, name: str, src: str | None = None) -> dict[str, Any]:
    """Publish ``table`` whole as DST/<name>.parquet: written under the run's ``_tmp/`` first (or
    ``src``, a file that already holds exactly ``table``), then moved over the final name.
    Returns the counts a marker records."""
    fs = storage.resolve(dst)[0]
    if src is None:
        src = storage.join(dst, layout.TMP, run_id, f"{name}.{uuid.uuid4().hex[:8]}{layout.DATA_SUFFIX}")
        data = parquet_bytes(table)
        storage.write_bytes(src, data)
        nbytes = len(data)
    else:
        nbytes = int(fs.get_file_info(storage.resolve(src)[1]).size or 0)
    storage.publish(fs, storage.resolve(src)[1], storage.resolve(storage.join(dst, name + layout.DATA_SUFFIX))[1])
    status = table.column("status").to_pylist()
    ok = sum(1 for s in status if s == "ok")
    return {"rows": table.num_rows, "ok": ok, "error": len(status) - ok, "bytes": nbytes, "node": _node()}


def publish_shard(dst: str, run_id: str, shard: str, parts: list[str],
                  expected: dict[str, int], schema: pa.Schema, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge a shard's parts into one file (repeated keys dropped), publish it whole, delete the parts.

    Runs as a Ray task on a worker. Returns the counts for the done-marker, or ``short`` when a
    unit has fewer distinct rows than it announced (parts of a retried task with another
    grouping overlap): the driver then waits for more parts.
    """
    storage.apply_env(env)
    t0 = time.time()
    pdir = parts_dir(dst, run_id, shard)
    tables = [_read(storage.join(pdir, p), schema) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    keys = table.column("key").to_pylist()
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    duplicates = len(keys) - len(first)
    if duplicates:
        table = table.take(pa.array(sorted(first.values()), pa.int64()))
    # Repeated keys come only from retried work, so fewer distinct rows than the units announced
    # means a part is still missing (keys of Parquet inputs need not name their unit).
    if len(first) < sum(expected.values()):
        return {"shard": shard, "short": sum(expected.values()) - len(first), "node": _node()}
    # Parts are sorted by key (write_parts): a shard that arrived in one part is published as is.
    whole = storage.join(pdir, parts[0]) if len(parts) == 1 and not duplicates else None
    res = _publish_table(dst, run_id, table if whole else table.sort_by("key"), shard, whole)
    storage.delete(pdir)
    return {**res, "shard": shard, "short": None, "duplicates_dropped": duplicates,
            "seconds": round(time.time() - t0, 3)}


def rewrite_shard(dst: str, run_id: str, shard: str, drop: list[int],
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """Rewrite a published shard without the rows whose key hashes are in ``drop`` (a changed
    unit now lives in a newer shard, or its source was deleted), publishing the new file whole
    over the old one. Runs as a Ray task on a worker."""
    storage.apply_env(env)
    table = _read(storage.join(dst, shard + layout.DATA_SUFFIX))
    keep = ~np.isin(layout.key_hashes(table.column("key").to_pylist()), np.asarray(drop, np.uint64))
    res = _publish_table(dst, run_id, table.filter(pa.array(keep)), shard)
    return {**res, "shard": shard, "dropped": int((~keep).sum())}


def merge_shards(dst: str, run_id: str, shards: list[str], name: str,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge published shard files into one new shard ``name`` (compaction), published whole.
    Runs as a Ray task on a worker; files of older releases (fewer columns) merge with nulls."""
    storage.apply_env(env)
    tables = [_read(storage.join(dst, s + layout.DATA_SUFFIX)) for s in shards]
    return _publish_table(dst, run_id, pa.concat_tables(tables, promote_options="default").sort_by("key"), name)
