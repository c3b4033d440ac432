"""Per-shard Parquet writer with a commit protocol, run on the driver.

Rows stream in from Ray Data in any order and possibly more than once (actor pools retry
tasks: at-least-once). The writer keeps one open file per shard under ``_tmp/``, appends
bounded row groups, drops repeated keys, and when every unit of a shard has delivered all its
rows it publishes the file under its deterministic name (rename locally; on S3 a server-side
copy, so the object appears whole) and then writes the shard's done-marker. A crash leaves at
most temp files and marker-less data files, which the next run removes and redoes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.batch import normalize
from pipeline.sources import Shard

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 64
ROW_GROUP_BYTES = 64 << 20


def clean_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("note", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.large_binary()),
        ("image_format", pa.string()),
        ("embedding", pa.list_(pa.float32(), embedding_dim)),
        ("embedding_model", pa.string()),
        ("noise_sigma", pa.float32()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        ("model", pa.string()),
        ("checkpoint_sha256", pa.string()),
    ])


def _value(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


@dataclass
class _ShardState:
    shard: Shard
    expected: dict[str, int | None]
    received: dict[str, set[str]]
    skipped_members: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    buffered_bytes: int = 0
    writer: pq.ParquetWriter | None = None
    stream: Any = None
    tmp: str = ""
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    started: float = field(default_factory=time.time)

    def complete(self) -> bool:
        return all(
            e is not None and len(self.received[u]) >= e for u, e in self.expected.items()
        )


class ShardWriter:
    def __init__(self, dst: str, schema: pa.Schema, run_id: str,
                 on_publish: Callable[[str, dict[str, Any]], None] | None = None,
                 lease: layout.Lease | None = None) -> None:
        self.dst = dst
        self.schema = schema
        self.run_id = run_id
        self.fs, self.root = storage.resolve(dst)
        self.open: dict[str, _ShardState] = {}
        self.unit_to_shard: dict[str, str] = {}
        self.seen_keys: dict[str, str] = {}
        self.counts = {"ok": 0, "error": 0, "skipped_members": 0, "duplicates_dropped": 0}
        self.published: list[str] = []
        self.units_published = 0
        self.on_publish = on_publish
        self.lease = lease
        self.fs.create_dir(self._path(layout.TMP), recursive=True)
        self.fs.create_dir(self._path(layout.MARKERS), recursive=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def begin(self, shards: list[Shard]) -> None:
        for s in shards:
            self.open[s.name] = _ShardState(
                shard=s, expected={u.key: None for u in s.units}, received={u.key: set() for u in s.units}
            )
            for u in s.units:
                self.unit_to_shard[u.key] = s.name

    @property
    def rows_done(self) -> int:
        return self.counts["ok"] + self.counts["error"]

    def add_batch(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Take a batch of finished rows; returns the shards it completed (published)."""
        batch = normalize(batch)
        touched = set()
        n = len(batch["key"])
        for i in range(n):
            unit = str(batch["unit"][i])
            shard = self.unit_to_shard.get(unit)
            if shard is None or shard not in self.open:
                self.counts["duplicates_dropped"] += 1  # a retry of an already published shard
                continue
            st = self.open[shard]
            st.expected[unit] = int(batch["unit_items"][i])
            st.skipped_members = max(st.skipped_members, int(batch["skipped_members"][i]))
            touched.add(shard)
            if batch["kind"][i] != "item":
                continue
            key = str(batch["key"][i])
            if key in st.received[unit]:
                self.counts["duplicates_dropped"] += 1
                continue
            st.received[unit].add(key)
            row = {name: _value(batch[name][i]) if name in batch else None for name in self.schema.names}
            emb = row.get("embedding")
            if isinstance(emb, bytes):
                row["embedding"] = np.frombuffer(emb, dtype=np.float32).tolist()
            owner = self.seen_keys.get(key)
            if owner is not None and owner != shard:  # two source containers used the same key
                row.update(key=f"{key}#dup-{shard}", status="error", image=None,
                           error=f"duplicate key: already written by shard {owner}")
            self.seen_keys.setdefault(key, shard)
            st.counts["ok" if row["status"] == "ok" else "error"] += 1
            st.rows.append(row)
            for col in ("image", "latent"):
                blob = row.get(col)
                if isinstance(blob, (bytes, bytearray)):
                    st.buffered_bytes += len(blob)
            if len(st.rows) >= ROW_GROUP_ROWS or st.buffered_bytes >= ROW_GROUP_BYTES:
                self._flush(st)
        done = []
        for shard in sorted(touched):
            st = self.open[shard]
            if st.complete():
                self._publish(st)
                done.append(shard)
        return done

    def _flush(self, st: _ShardState) -> None:
        if not st.rows:
            return
        if st.writer is None:
            st.tmp = self._path(layout.TMP, f"{st.shard.name}.{self.run_id}.{uuid.uuid4().hex[:8]}.tmp")
            st.stream = self.fs.open_output_stream(st.tmp)
            st.writer = pq.ParquetWriter(st.stream, self.schema, compression="zstd")
        table = pa.Table.from_pylist(st.rows, schema=self.schema)
        st.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        st.rows, st.buffered_bytes = [], 0

    def _publish(self, st: _ShardState) -> None:
        if self.lease is not None and self.lease.lost:
            raise layout.DstError("the DST lease was lost to another run; stopping before publishing")
        name = st.shard.name
        if st.writer is None and not st.rows:
            # A shard with no image rows (a tar of sidecars only): publish an empty file so
            # readers and markers stay uniform.
            pass
        self._flush(st)
        if st.writer is None:
            st.tmp = self._path(layout.TMP, f"{name}.{self.run_id}.empty.tmp")
            st.stream = self.fs.open_output_stream(st.tmp)
            st.writer = pq.ParquetWriter(st.stream, self.schema, compression="zstd")
        st.writer.close()
        st.stream.close()
        final = self._path(name + layout.DATA_SUFFIX)
        storage.publish(self.fs, st.tmp, final)  # local: atomic rename; S3: copy, delete temp
        rows = st.counts["ok"] + st.counts["error"]
        marker = {
            "shard": name,
            "file": name + layout.DATA_SUFFIX,
            "units": sorted(st.expected),
            "rows": rows,
            "ok": st.counts["ok"],
            "error": st.counts["error"],
            "skipped_members": st.skipped_members,
            "run_id": self.run_id,
            "seconds": round(time.time() - st.started, 3),
            "finished_at": time.time(),
        }
        layout.write_json(layout.marker_file(self.dst, name), marker)
        self.counts["ok"] += st.counts["ok"]
        self.counts["error"] += st.counts["error"]
        self.counts["skipped_members"] += st.skipped_members
        self.published.append(name)
        self.units_published += len(st.expected)
        del self.open[name]
        if self.on_publish:
            self.on_publish(name, marker)

    def abort(self) -> None:
        """Drop unfinished shards' temp files (their units are redone by the next run)."""
        for st in self.open.values():
            try:
                if st.writer is not None:
                    st.writer.close()
                    st.stream.close()
                if st.tmp:
                    self.fs.delete_file(st.tmp)
            except Exception as e:
                log.warning("could not remove temp file %s: %s", st.tmp, e)
        self.open.clear()

    def pending_counts(self) -> dict[str, int]:
        """Rows received for shards not yet published (for progress and error-rate checks)."""
        out = {"ok": 0, "error": 0}
        for st in self.open.values():
            out["ok"] += st.counts["ok"]
            out["error"] += st.counts["error"]
        return out
