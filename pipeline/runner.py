"""The job driver shared by ``clean`` and ``compress``: list → plan → Ray Data → shard writer.

    units (listing) ─ read_units ─ prepare (decode+validate, CPU) ─ model actors ─ post (encode,
    CPU) ─ driver: ShardWriter (per-shard Parquet + markers) ─ _manifest.json

Every input yields a row: bad files are error rows, never dropped, never a failed task.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import decode, layout, sources, storage
from pipeline.writer import ShardWriter

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def package_version() -> str:
    try:
        return version("aejob")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class JobConfig:
    """What every SRC → DST job takes (``aejob clean`` and ``aejob compress`` extend it)."""

    src: str
    dst: str
    image_column: str = "image"  # binary image column of Parquet inputs
    max_pixels: int = decode.DEFAULT_MAX_PIXELS  # decompression-bomb guard
    shard_size: int = 256  # loose files per output shard
    max_error_rate: float = 1.0
    limit: int = 0  # only the first N inputs (0: all)
    overwrite: bool = False  # replace a DST made with other settings
    device: str = "auto"


@dataclass(frozen=True)
class RayOptions:
    num_actors: int = 1
    num_gpus: float = 0.0
    actor_cpus: float = 0.0  # 0: pick from the cluster size
    threads: int = 0  # torch threads per actor; 0: pick
    batch_size: int = 4  # images per model call
    cpu_stage_cpus: float = 0.5  # CPUs per decode/encode task
    address: str = ""  # "" = RAY_ADDRESS or a local Ray


@dataclass(frozen=True)
class JobSpec:
    job: str  # "clean" | "compress"
    src: str
    dst: str
    schema: pa.Schema
    fingerprint: dict[str, Any]  # settings that must match to resume into DST
    prepare: Callable[[Batch], Batch]  # CPU: decode + validate (+ noise estimate)
    actor_cls: type
    actor_kwargs: dict[str, Any]
    post: Callable[[Batch], Batch]  # CPU: encode
    image_column: str = "image"
    shard_size: int = 256
    max_error_rate: float = 1.0
    limit: int = 0
    overwrite: bool = False
    ray: RayOptions = field(default_factory=RayOptions)
    model_info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # resolved, for the manifest


@dataclass
class JobResult:
    ok: bool
    manifest: dict[str, Any]
    exit_code: int


def init_ray(address: str = "") -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=True)


def actor_resources(opts: RayOptions, cluster_cpus: float) -> tuple[float, int]:
    """(CPUs per actor, torch threads per actor).

    On small machines an actor pool that asks for every CPU starves the read tasks and the
    pipeline hangs without an error, so actors together leave at least one CPU for the CPU
    stages; torch threads are set explicitly (Ray gives fractional actors OMP_NUM_THREADS=1).
    """
    if opts.num_gpus > 0:
        cpus = opts.actor_cpus or 1.0
        return cpus, opts.threads or max(1, int(cpus))
    free = max(0.5, cluster_cpus - 1)
    cpus = opts.actor_cpus or min(1.0, free / max(1, opts.num_actors))
    threads = opts.threads or max(1, int(round(cluster_cpus / max(1, opts.num_actors))))
    return cpus, threads


def plan(spec: JobSpec) -> tuple[sources.Listing, list[sources.Unit]]:
    listing = sources.list_source(spec.src)
    units = listing.units
    if spec.limit:
        units = units[: spec.limit]
    return listing, units


def dry_run(spec: JobSpec, images_per_s: float = 3.0) -> dict[str, Any]:
    listing, units = plan(spec)
    done: set[str] = set()
    if storage.exists(storage.join(spec.dst, layout.CONFIG)):
        done = {u for m in layout.read_markers(spec.dst).values() for u in m.get("units", [])}
    pending = [u for u in units if u.key not in done]
    by_kind: dict[str, int] = {}
    for u in pending:
        by_kind[u.kind] = by_kind.get(u.kind, 0) + 1
    est_images = sum(1 if u.kind == "file" else max(1, u.size // 500_000) for u in pending)
    actors = max(1, spec.ray.num_actors)
    return {
        "src": spec.src,
        "dst": spec.dst,
        "units": len(units),
        "pending_units": len(pending),
        "already_done_units": len(units) - len(pending),
        "by_kind": by_kind,
        "bytes": sum(u.size for u in pending),
        "skipped_files": len(listing.skipped),
        "shards": len(sources.plan_shards(pending, spec.shard_size)),
        "estimated_seconds": round(est_images / (images_per_s * actors), 1),
        "estimate_basis": f"{images_per_s} images/s per actor, ~500 kB per image in containers",
    }


def run_job(spec: JobSpec, progress: bool = True) -> JobResult:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    t0 = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    listing, units = plan(spec)
    t_list = time.time() - t0
    lease = layout.Lease(spec.dst, run_id=run_id)
    lease.acquire()
    writer: ShardWriter | None = None
    status, reason = "succeeded", None
    try:
        state = layout.prepare(spec.dst, spec.fingerprint, spec.overwrite)
        pending = [u for u in units if u.key not in state.done_units]
        shards = sources.plan_shards(pending, spec.shard_size)
        log.info("%s: %d units listed, %d already done, %d pending in %d shards",
                 spec.src, len(units), len(units) - len(pending), len(pending), len(shards))
        writer = ShardWriter(spec.dst, spec.schema, run_id, lease=lease)
        writer.begin(shards)
        resources: dict[str, Any] = {}
        if shards:
            init_ray(spec.ray.address)
            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            cluster_cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 2))
            cpus, threads = actor_resources(spec.ray, cluster_cpus)
            resources = {"num_actors": spec.ray.num_actors, "actor_cpus": cpus,
                         "threads": threads, "num_gpus": spec.ray.num_gpus}
            log.info("actors: %s", resources)
            rows = sources.unit_rows(shards)
            ds: Any = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 200)))
            # CPU stages ask a different CPU amount than the actors so Ray does not fuse the
            # decode into the model actors (decode then runs in parallel with inference).
            stage_cpus = spec.ray.cpu_stage_cpus if spec.ray.cpu_stage_cpus != cpus else cpus / 2
            ds = ds.map_batches(sources.read_units, batch_size=4, batch_format="numpy",
                                fn_kwargs={"image_column": spec.image_column}, num_cpus=stage_cpus)
            ds = ds.map_batches(spec.prepare, batch_size=spec.ray.batch_size, batch_format="numpy",
                                num_cpus=stage_cpus)
            ds = ds.map_batches(
                spec.actor_cls,
                fn_constructor_kwargs={**spec.actor_kwargs, "threads": threads,
                                       "batch_size": spec.ray.batch_size},
                compute=ActorPoolStrategy(min_size=spec.ray.num_actors, max_size=spec.ray.num_actors),
                batch_size=spec.ray.batch_size,
                batch_format="numpy",
                num_cpus=cpus,
                num_gpus=spec.ray.num_gpus or None,
                # Ray 2.60's actor-pool default, pinned: a crashed actor restarts and its tasks
                # are retried (at-least-once; the writer drops repeated keys).
                max_restarts=-1,
                max_task_retries=-1,
            )
            ds = ds.map_batches(spec.post, batch_size=spec.ray.batch_size, batch_format="numpy",
                                num_cpus=stage_cpus)
            status, reason = _drain(ds, writer, spec, len(pending), progress)
    except BaseException as e:
        status, reason = "failed", f"{type(e).__name__}: {e}"
        if writer is not None:
            writer.abort()
        lease.release()
        _finish(spec, run_id, t0, t_list, listing, units, writer, {}, status, reason)
        raise
    if writer is not None and status != "succeeded":
        writer.abort()
    try:
        storage.delete(storage.join(spec.dst, layout.TMP))
    except OSError as e:
        log.warning("could not remove %s: %s", layout.TMP, e)
    manifest = _finish(spec, run_id, t0, t_list, listing, units, writer, resources, status, reason)
    lease.release()
    ok = status == "succeeded"
    return JobResult(ok=ok, manifest=manifest, exit_code=0 if ok else 1)


def _drain(ds: Any, writer: ShardWriter, spec: JobSpec, n_units: int, progress: bool) -> tuple[str, str | None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress)
    units_done = 0
    with bar:
        task = bar.add_task(spec.job, total=n_units, info="")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            writer.add_batch(batch)
            units_done = writer.units_published
            pend = writer.pending_counts()
            ok = writer.counts["ok"] + pend["ok"]
            err = writer.counts["error"] + pend["error"]
            bar.update(task, completed=units_done, info=f"ok {ok} · error {err}")
            if spec.max_error_rate < 1.0 and ok + err >= 1000 and err / (ok + err) > spec.max_error_rate:
                return "failed", _rate_reason(err, ok + err, spec.max_error_rate)
        if writer.open:
            missing = sorted(writer.open)[:5]
            return "failed", f"{len(writer.open)} shards did not deliver all rows (e.g. {missing})"
        total = writer.rows_done
        if spec.max_error_rate < 1.0 and total and writer.counts["error"] / total > spec.max_error_rate:
            return "failed", _rate_reason(writer.counts["error"], total, spec.max_error_rate)
    return "succeeded", None


def _rate_reason(err: int, total: int, limit: float) -> str:
    return (f"error rate {err}/{total} = {err / total:.3f} exceeds --max-error-rate {limit}; "
            "stopped, rows already written are kept")


def _finish(spec: JobSpec, run_id: str, t0: float, t_list: float, listing: sources.Listing,
            units: list[sources.Unit], writer: ShardWriter | None, resources: dict[str, Any],
            status: str, reason: str | None) -> dict[str, Any]:
    elapsed = time.time() - t0
    counts = dict(writer.counts) if writer else {}
    rows = counts.get("ok", 0) + counts.get("error", 0)
    markers = layout.read_markers(spec.dst) if storage.exists(spec.dst) else {}
    dataset = {
        "shards": len(markers),
        "rows": sum(m.get("rows", 0) for m in markers.values()),
        "ok": sum(m.get("ok", 0) for m in markers.values()),
        "error": sum(m.get("error", 0) for m in markers.values()),
    }
    manifest = {
        "job": spec.job,
        "run_id": run_id,
        "status": status,
        "reason": reason,
        "aejob_version": package_version(),
        "src": spec.src,
        "dst": spec.dst,
        "config": spec.config,
        "fingerprint": spec.fingerprint,
        "model": spec.model_info,
        "ray": {**asdict(spec.ray), **resources},
        "counts": {
            "units_listed": len(units),
            "shards_published": len(writer.published) if writer else 0,
            "rows_ok": counts.get("ok", 0),
            "rows_error": counts.get("error", 0),
            "skipped_files": len(listing.skipped),
            "skipped_members": counts.get("skipped_members", 0),
            "duplicates_dropped": counts.get("duplicates_dropped", 0),
        },
        "dataset": dataset,
        "timings": {
            "list_s": round(t_list, 3),
            "total_s": round(elapsed, 3),
            "rows_per_s": round(rows / elapsed, 3) if elapsed > 0 and rows else 0.0,
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_safely(storage.join(spec.dst, layout.RUNS, f"{run_id}.json"), manifest)
    _write_safely(storage.join(spec.dst, layout.MANIFEST), manifest)  # last
    return manifest


def read_json_safe(uri: str) -> dict[str, Any] | None:
    try:
        return layout.read_json(uri)  # type: ignore[no-any-return]
    except Exception:
        return None


def _write_safely(uri: str, obj: dict[str, Any]) -> None:
    try:
        layout.write_json(uri, obj)
    except Exception as e:
        log.error("could not write %s: %s", uri, e)
