"""The commit side of a run, on the driver: metadata in, files published by workers, markers out.

- ``Commit`` adds up the metadata rows of the write stage per shard; a complete shard gets a
  publish task (``sink.publish_shard``, on a worker), then its done-marker;
- ``reconcile`` (after the data phase) drops superseded rows from older shards: changed units
  now in a newer shard, leftovers of a run that died mid-way, and with ``--delete`` the rows of
  sources that are gone;
- ``compact`` merges the small shards that many small runs leave behind.

Every change is a whole file published over the old one (or removed), so raw Parquet readers
see exactly one current row per key when a command returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import layout, sink, storage

if TYPE_CHECKING:
    from pipeline.runner import JobSpec, Plan

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
PUBLISH_CPUS = 0.1  # publish/rewrite tasks are I/O: a sliver of a CPU, never a whole one


@dataclass
class Commit:
    """The driver's side of the write: shard progress from metadata, publish tasks, markers."""

    spec: "JobSpec"
    run_id: str
    shard_units: dict[str, int]
    lease: layout.Lease
    open: dict[str, sink.ShardProgress] = field(default_factory=dict)
    publishing: dict[Any, sink.ShardProgress] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0, "skipped_members": 0,
                                                           "duplicates_dropped": 0, "bytes": 0})
    seen: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})  # rows delivered so far
    published: int = 0
    units_published: int = 0
    writers: dict[str, int] = field(default_factory=dict)  # node -> part/data files written there
    small: int = 0  # small shards this run published (compaction candidates)
    committed: list[np.ndarray] = field(default_factory=list)  # key hashes of the units published
    names: set[str] = field(default_factory=set)  # shards published by this run
    env: dict[str, str] = field(default_factory=storage.job_env)  # storage settings for the workers

    def add(self, meta: Batch) -> None:
        touched = set()
        for i in range(len(meta["shard"])):
            row = {c: meta[c][i] for c in sink.META_COLUMNS}
            shard = str(row["shard"])
            if shard not in self.shard_units:
                continue  # a late retry of a shard this run already published
            st = self.open.get(shard)
            if st is None:
                if any(p.name == shard for p in self.publishing.values()):
                    continue
                st = self.open[shard] = sink.ShardProgress(shard, self.shard_units[shard])
            st.add(row)
            self.seen["ok"] += int(row["ok"])
            self.seen["error"] += int(row["error"])
            if row["part"]:
                self.writers[str(row["node"])] = self.writers.get(str(row["node"]), 0) + 1
            touched.add(shard)
        for shard in sorted(touched):
            if shard in self.open and self.open[shard].complete():
                self._publish(self.open.pop(shard))

    def _publish(self, st: sink.ShardProgress) -> None:
        import ray

        if self.lease.lost:
            raise layout.DstError("the DST lease was lost to another run; stopping before publishing")
        task = ray.remote(sink.publish_shard).options(num_cpus=PUBLISH_CPUS, max_retries=3)
        expected = {u: int(v["items"]) for u, v in st.units.items()}
        ref = task.remote(self.spec.dst, self.run_id, st.name, sorted(st.parts), expected, self.spec.schema,
                          self.env)
        self.publishing[ref] = st

    def reap(self, wait: bool = False) -> None:
        import ray

        while self.publishing:
            ready, _ = ray.wait(list(self.publishing), num_returns=1, timeout=None if wait else 0)
            if not ready:
                return
            st = self.publishing.pop(ready[0])
            res = ray.get(ready[0])
            if res["short"]:  # overlapping retried parts: wait for the missing rows
                log.debug("shard %s is %s rows short; waiting for more parts", st.name, res["short"])
                self.open[st.name] = st
                continue
            self._mark(st, res)

    def _mark(self, st: sink.ShardProgress, res: dict[str, Any]) -> None:
        units = sorted(st.units)
        marker = {
            "shard": st.name,
            "file": st.name + layout.DATA_SUFFIX,
            "units": units,
            "versions": [st.units[u]["version"] for u in units],
            "rows": res["rows"],
            "ok": res["ok"],
            "error": res["error"],
            "bytes": res["bytes"],
            "skipped_members": sum(int(u["skipped_members"]) for u in st.units.values()),
            "run_id": self.run_id,
            "written_on": res["node"],
            "seconds": round(time.time() - st.started, 3),
            "finished_at": time.time(),
        }
        layout.write_json(layout.marker_file(self.spec.dst, st.name), marker)
        for k in ("ok", "error", "skipped_members", "bytes"):
            self.counts[k] += int(marker[k])
        self.counts["duplicates_dropped"] += int(res["duplicates_dropped"])
        self.writers[str(res["node"])] = self.writers.get(str(res["node"]), 0) + 1
        self.published += 1
        self.units_published += len(units)
        self.committed.append(layout.key_hashes(units))
        self.small += int(is_small(marker, self.spec.config.shard_size))
        self.names.add(st.name)


def reconcile(spec: "JobSpec", run_id: str, state: layout.DstState, plan: "Plan", commit: Commit) -> dict[str, int]:
    """After the data phase: drop the old rows of changed units (now in this run's shards), the
    leftovers of a run that died before doing so, and, with ``--delete``, the rows of sources
    that are gone. Whole shard files are rewritten (on workers) or removed, so raw Parquet
    readers see exactly one current row per key when the command returns."""
    done = state.done
    drops: dict[int, set[int]] = {}
    for si, h in done.superseded:
        drops.setdefault(si, set()).add(h)
    if plan.changed_pos and commit.committed:
        pos = np.concatenate(plan.changed_pos)
        now = pos[np.isin(done.hashes[pos], np.concatenate(commit.committed))]
        for p in now:
            drops.setdefault(int(done.shards[p]), set()).add(int(done.hashes[p]))
    gone = done.unseen() if not spec.config.limit else np.zeros(0, np.int64)
    if spec.config.delete:
        for p in gone:
            drops.setdefault(int(done.shards[p]), set()).add(int(done.hashes[p]))
    out = {"gone": len(gone), "deleted": len(gone) if spec.config.delete else 0, "shards_rewritten": 0,
           "shards_deleted": 0, "rows_removed": 0, "ok_removed": 0, "error_removed": 0}
    drops = {si: hs for si, hs in drops.items() if done.shard_names[si] not in commit.names}
    if not drops:
        return out
    units_in = np.bincount(done.shards, minlength=len(done.shard_names))
    for si, _h in done.superseded:
        units_in[si] += 1
    rewrites = []
    for si, hs in sorted(drops.items()):
        name = done.shard_names[si]
        marker = layout.read_json(layout.marker_file(spec.dst, name)) or {"units": [], "versions": []}
        if len(hs) >= units_in[si]:  # nothing of it stays: the marker goes first, then the file
            storage.delete(layout.marker_file(spec.dst, name))
            storage.delete(layout.data_file(spec.dst, name))
            out["shards_deleted"] += 1
            for k, c in (("rows_removed", "rows"), ("ok_removed", "ok"), ("error_removed", "error")):
                out[k] += int(marker.get(c, 0))
        else:
            rewrites.append((name, sorted(hs), marker))
    if rewrites:
        import ray

        from pipeline.runner import init_ray

        init_ray(spec.ray.address)
        task = ray.remote(sink.rewrite_shard).options(num_cpus=PUBLISH_CPUS, max_retries=3)
        refs = [task.remote(spec.dst, run_id, name, hs, storage.job_env()) for name, hs, _m in rewrites]
        for (name, dropped_list, marker), res in zip(rewrites, ray.get(refs)):
            dropped = set(dropped_list)
            units = marker.get("units", [])
            versions = marker.get("versions") or [""] * len(units)
            keep = [i for i, h in enumerate(layout.key_hashes(units)) if int(h) not in dropped]
            for k, c in (("rows_removed", "rows"), ("ok_removed", "ok"), ("error_removed", "error")):
                out[k] += int(marker.get(c, 0)) - int(res[c])
            marker.update(units=[units[i] for i in keep], versions=[versions[i] for i in keep], rows=res["rows"],
                          ok=res["ok"], error=res["error"], bytes=res["bytes"], rewritten_by=run_id)
            layout.write_json(layout.marker_file(spec.dst, name), marker)
            out["shards_rewritten"] += 1
    log.info("sync: %d shards rewritten, %d removed, %d rows dropped", out["shards_rewritten"],
             out["shards_deleted"], out["rows_removed"])
    return out




AUTO_COMPACT_SHARDS = 32  # small shards that trigger a compaction at the end of a run


def is_small(marker: dict[str, Any], target_rows: int) -> bool:
    """A loose-file shard holding less than half a full shard (containers keep their own file)."""
    return str(marker.get("shard", "")).startswith("files-") and int(marker.get("rows", 0)) < small_rows(target_rows)


def small_rows(target_rows: int) -> int:
    return max(1, target_rows // 2)


def compact(dst: str, run_id: str, target_rows: int, address: str = "") -> dict[str, int]:
    """Merge small loose-file shards into shards of about ``target_rows`` rows.

    Each merged file is written and published by a worker under a new deterministic name, its
    marker written (newest, so it wins over the old ones), then the old markers and files go.
    A crash in between leaves duplicate keys that the next run's ``reconcile`` drops.
    """
    from pipeline.sources import shard_name_for

    small = sorted((m for m in layout.iter_markers(dst) if is_small(m, target_rows)), key=lambda m: m["shard"])
    groups: list[list[dict[str, Any]]] = [[]]
    for m in small:
        if groups[-1] and sum(int(x.get("rows", 0)) for x in groups[-1]) + int(m.get("rows", 0)) > target_rows:
            groups.append([])
        groups[-1].append(m)
    groups = [g for g in groups if len(g) >= 2]
    out = {"small_shards": len(small), "merged_into": 0, "shards_removed": 0}
    if not groups:
        return out
    import ray

    from pipeline.runner import init_ray

    init_ray(address)
    task = ray.remote(sink.merge_shards).options(num_cpus=PUBLISH_CPUS, max_retries=3)
    plans = []
    for g in groups:
        units = [u for m in g for u in m.get("units", [])]
        versions = [v for m in g for v in (m.get("versions") or [""] * len(m.get("units", [])))]
        name = shard_name_for(units, "file")
        ref = task.remote(dst, run_id, [m["shard"] for m in g], name, storage.job_env())
        plans.append((g, name, units, versions, ref))
    for g, name, units, versions, ref in plans:
        res = ray.get(ref)
        order = sorted(range(len(units)), key=units.__getitem__)
        layout.write_json(layout.marker_file(dst, name), {
            "shard": name, "file": name + layout.DATA_SUFFIX, "units": [units[i] for i in order],
            "versions": [versions[i] for i in order], "rows": res["rows"], "ok": res["ok"], "error": res["error"],
            "bytes": res["bytes"], "skipped_members": sum(int(m.get("skipped_members", 0)) for m in g),
            "run_id": run_id, "compacted_from": [m["shard"] for m in g], "written_on": res["node"],
            "finished_at": time.time(),
        })
        for m in g:
            if m["shard"] != name:
                storage.delete(layout.marker_file(dst, m["shard"]))
                storage.delete(layout.data_file(dst, m["shard"]))
                out["shards_removed"] += 1
        out["merged_into"] += 1
    log.info("compacted %d small shards into %d", out["shards_removed"], out["merged_into"])
    return out
