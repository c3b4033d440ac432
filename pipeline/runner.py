"""The job driver shared by ``clean`` and ``compress``. The run's whole path, top to bottom:

    plan     (driver)  stream SRC's listing, skip done units, write the plan under _tmp/<run>/plan
    read     (workers) plan rows -> raw bytes (tar members and Parquet row groups streamed)
    decode   (workers) decode + validate; a bad input becomes an error row, never a lost one
    model    (actors)  denoise / compress, batched, CPU or GPU
    encode   (workers) pixels -> image bytes
    write    (workers) one part file per shard and batch under _tmp; only metadata comes back
    commit   (driver)  complete shard -> publish task (worker merges + publishes) -> done-marker;
                       run record and manifest last

The driver never holds a data byte: its memory is the in-flight shards plus 8 bytes per done
unit, and what it writes is the plan, the markers and the manifest.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import commit as commit_mod
from pipeline import decode, layout, malloc, sink, sources, storage
from pipeline.commit import Commit, reconcile

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
PLAN_FIRST_FILE_UNITS = 4  # plan files grow 4, 8, 16, ...: small jobs still get parallel reads
PLAN_MAX_FILE_UNITS = 4096
PLAN_ROWS_PER_BATCH = 16
BLOCK_BYTES = int(os.environ.get("AEJOB_BLOCK_BYTES", str(1 << 20)))
PROGRESS_EVERY_S = 2.0


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
    delete: bool = False  # remove the rows of sources that are gone (rsync --delete)


@dataclass(frozen=True)
class RayOptions:
    num_actors: int = 0  # fixed pool size; 0: scale between min_actors and max_actors
    min_actors: int = 1
    max_actors: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold
    num_gpus: float = 0.0
    actor_cpus: float = 0.0  # 0: pick from the cluster size
    threads: int = 0  # torch threads per actor; 0: the node's CPUs / the actors on it
    batch_size: int = 4  # images per model call
    cpu_stage_cpus: float = 0.5  # CPUs per read/decode/encode/write task
    address: str = ""  # "" = RAY_ADDRESS or a local Ray


@dataclass(frozen=True)
class JobSpec:
    """A job as the runner executes it: the user's config plus what ``clean``/``compress`` plug in."""

    job: str  # "clean" | "compress"
    config: JobConfig
    schema: pa.Schema
    fingerprint: dict[str, Any]  # settings that must match to resume into DST
    prepare: Callable[[Batch], Batch]  # CPU: decode + validate (+ noise estimate)
    actor_cls: type
    actor_kwargs: dict[str, Any]
    post: Callable[[Batch], Batch]  # CPU: encode
    probe: Callable[[int], float]  # images/s of one actor with N threads (for --dry-run)
    ray: RayOptions = field(default_factory=RayOptions)
    # model calls one actor runs at once, its threads split between them (see pipeline.actors)
    actor_calls: int = 1
    model_info: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # the resolved config, for the manifest

    @property
    def src(self) -> str:
        return self.config.src

    @property
    def dst(self) -> str:
        return self.config.dst


@dataclass
class JobResult:
    ok: bool
    manifest: dict[str, Any]
    exit_code: int


def _verbose() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def init_ray(address: str = "") -> None:
    """Connect to RAY_ADDRESS / ``address`` or start a local Ray; Ray's own output only with -v."""
    import ray
    import ray.data  # noqa: F401  (with Ray: its import is start-up, timed as ray_init_s by run_job)

    if ray.is_initialized():
        return
    _import_ray_data_executor()
    malloc.limit_arenas()  # before ray.init starts the core worker's threads
    verbose = _verbose()
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read when Ray Data sets up its logging
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a new instance even when a `ray start` cluster runs on this machine (RAY_ADDRESS or
        # --address choose a cluster)
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, **kwargs)


RAY_DATA_EXECUTION_MODULES = (
    "ray.data._internal.execution.streaming_executor",
    "ray.data._internal.planner.planner",
    "ray.data._internal.logical.optimizers",
    "ray.data._internal.issue_detection.issue_detector_configuration",
    "ray.data._internal.execution.operators.actor_pool_map_operator",
)


def _import_ray_data_executor() -> None:
    """Import the parts of Ray Data its first execution would import (~0.2 s), with the rest of
    start-up: at execution time the driver would import them while the model actor boots beside
    it. Private module names, so best effort."""
    import importlib

    for name in RAY_DATA_EXECUTION_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:  # another Ray version: imported when Ray Data needs them
            log.debug("not pre-imported: %s (%s)", name, e)


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", os.cpu_count() or 2)), float(res.get("GPU", 0))


PART_ROWS = 16  # rows per part file where the object store allows (fewer parts per shard to merge)
ROOMY_STORE = 1 << 30  # per-node object store from which PART_ROWS is used


def part_rows(batch_size: int, node_store_bytes: float) -> int:
    """Rows per part file (the write stage's batch). The write fuses with the encode, so its batch
    is the encode's input bundle: rows that still hold decoded pixels. 16 rows of ~1 MP photos
    (26 MB) outgrew a 150 MiB object store's budget and stalled the actors behind them (40 photos
    on one 2-CPU node: 298 s; one model batch per part: 86 s); with a roomy store, 16-row parts
    spare the CPU stages and the driver many small tasks (CBSD68 on 2 cores: 16.0-16.7 s against
    17.4-18.6 s with 4-row parts)."""
    return max(batch_size, PART_ROWS) if node_store_bytes >= ROOMY_STORE else batch_size


def smallest_store() -> float:
    """The smallest object store of the cluster's nodes that have CPUs (0 if unknown)."""
    import ray

    try:
        stores = [float(n["Resources"].get("object_store_memory", 0)) for n in ray.nodes()
                  if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    except Exception:  # a client without node state: be safe
        return 0.0
    return min(stores) if stores else 0.0


@dataclass(frozen=True)
class ActorPlan:
    cpus: float  # CPUs each actor reserves
    min_size: int
    max_size: int
    threads: int  # 0: each actor takes its node's share


def actor_plan(opts: RayOptions, cluster_cpus: float, cluster_gpus: float = 0.0) -> ActorPlan:
    """How many model actors, with how many CPUs each.

    On small machines a pool that asks for every CPU starves the read tasks and the pipeline
    hangs without an error, so CPU actors together leave room for the CPU stages. Torch threads
    are decided by each actor from its own node (``pipeline.actors.node_threads``) unless set.
    """
    if opts.num_gpus > 0:
        cpus = opts.actor_cpus or 1.0
        most = max(1, int(cluster_gpus // opts.num_gpus)) if cluster_gpus else 1
    else:
        fixed = max(1, opts.num_actors)
        free = max(0.5, cluster_cpus - 1)
        cpus = opts.actor_cpus or (min(1.0, free / fixed) if opts.num_actors else min(1.0, free))
        most = max(1, int(cluster_cpus * 0.75 // cpus))
    if opts.num_actors:
        return ActorPlan(cpus, opts.num_actors, opts.num_actors, opts.threads)
    top = min(most, opts.max_actors) if opts.max_actors else most
    return ActorPlan(cpus, min(max(1, opts.min_actors), top), top, opts.threads)


# ---- plan ---------------------------------------------------------------------------------

PLAN_SCHEMA = pa.schema([("unit", pa.string()), ("uri", pa.string()), ("kind", pa.string()),
                         ("size", pa.int64()), ("version", pa.string()), ("shard", pa.string())])


@dataclass
class Plan:
    """What a run will process; only per-shard facts stay in memory, never per-unit ones."""

    stats: sources.ListingStats = field(default_factory=sources.ListingStats)
    units_done: int = 0  # listed and already in DST, unchanged
    units: int = 0  # pending: new + changed
    new: int = 0
    changed: int = 0
    changed_pos: list[np.ndarray] = field(default_factory=list)  # DoneIndex positions of changed units
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    shard_units: dict[str, int] = field(default_factory=dict)  # pending shard -> its unit count
    files: list[str] = field(default_factory=list)  # plan Parquet files
    seconds: float = 0.0


def pending_units(spec: JobSpec, done: layout.DoneIndex, plan: Plan, chunk: int = 4096) -> Iterator[sources.Unit]:
    """SRC's new and changed units, streamed (the done check runs on chunks of hashes).

    A unit is changed when its source version (local mtime, or S3 ETag + LastModified)
    differs from the one its marker recorded; markers without versions count as unchanged.
    """
    it = sources.iter_units(spec.src, plan.stats)
    taken = 0
    while True:
        units: list[sources.Unit] = []
        for u in it:
            units.append(u)
            if len(units) >= chunk:
                break
        if spec.config.limit:
            units = units[: max(0, spec.config.limit - taken)]
        if not units:
            return
        taken += len(units)
        is_done, pos = done.lookup([u.key for u in units])
        old = done.versions[pos[is_done]] if len(done) else np.zeros(0, np.uint64)
        new_v = layout.version_hashes([u.version for u, d in zip(units, is_done) if d])
        differs = (old != 0) & (new_v != 0) & (old != new_v)
        changed = np.zeros(len(units), bool)
        changed[np.flatnonzero(is_done)[differs]] = True
        plan.units_done += int(is_done.sum() - differs.sum())
        plan.changed += int(differs.sum())
        plan.new += int((~is_done).sum())
        if differs.any():
            plan.changed_pos.append(pos[changed])
        for u, d, c in zip(units, is_done, changed):
            if not d or c:
                yield u


def make_plan(spec: JobSpec, done: layout.DoneIndex, plan_dir: str | None) -> Plan:
    """Stream the listing into pending shards; with ``plan_dir``, write them as plan files."""
    t0 = time.time()
    plan = Plan()
    rows: list[dict[str, Any]] = []
    file_units = PLAN_FIRST_FILE_UNITS

    def flush() -> None:
        nonlocal rows, file_units
        if rows and plan_dir is not None:
            uri = storage.join(plan_dir, f"plan-{len(plan.files):06d}.parquet")
            buf = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA), buf)
            storage.write_bytes(uri, buf.getvalue().to_pybytes())
            plan.files.append(uri)
            file_units = min(PLAN_MAX_FILE_UNITS, file_units * 2)
        rows = []

    for shard in sources.iter_shards(pending_units(spec, done, plan), spec.config.shard_size):
        plan.shard_units[shard.name] = len(shard.units)
        for u in shard.units:
            plan.units += 1
            plan.bytes += u.size
            plan.by_kind[u.kind] = plan.by_kind.get(u.kind, 0) + 1
            if plan_dir is not None:
                rows.append({"unit": u.key, "uri": u.uri, "kind": u.kind, "size": u.size,
                             "version": u.version, "shard": shard.name})
        if len(rows) >= file_units:
            flush()
    flush()
    plan.seconds = time.time() - t0
    return plan


def dry_run(spec: JobSpec) -> dict[str, Any]:
    """What a run would do: counts and bytes from the real plan (nothing written), and a time
    estimate from a measured rate (a short probe of the model on this machine)."""
    state = layout.read_state(spec.dst) if storage.exists(storage.join(spec.dst, layout.CONFIG)) else None
    plan = make_plan(spec, state.done if state else layout.DoneIndex(), None)
    cpus, gpus = float(os.cpu_count() or 2), 0.0  # a local run: this machine
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        try:
            init_ray(spec.ray.address)
            cpus, gpus = cluster_resources()
        except Exception as e:  # no cluster reachable: estimate for this machine
            log.warning("cluster not reachable (%s): estimating for this machine", e)
    ap = actor_plan(spec.ray, cpus, gpus)
    threads = ap.threads or max(1, int(cpus // ap.max_size))
    rate = spec.probe(threads)
    images = plan.by_kind.get("file", 0) + sum(
        max(1, round(plan.bytes / max(1, plan.units) / 500_000)) * n
        for kind, n in plan.by_kind.items() if kind != "file")
    return {
        "src": spec.src,
        "dst": spec.dst,
        "units": plan.units + plan.units_done,
        "pending_units": plan.units,
        "already_done_units": plan.units_done,
        "by_kind": plan.by_kind,
        "bytes": plan.bytes,
        "skipped_files": plan.stats.skipped,
        "shards": len(plan.shard_units),
        "listing_seconds": round(plan.seconds, 3),
        "actors": ap.max_size,
        "estimated_seconds": round(images / (rate * ap.max_size), 1) if rate > 0 else None,
        "estimate_basis": (f"probe: {rate:.2f} images/s per actor at {threads} threads on a 768x512 image, "
                           f"{ap.max_size} actors; containers counted as ~500 kB per image"),
    }


# ---- run ----------------------------------------------------------------------------------


def read_plan(batch: Batch, env: dict[str, str] | None = None) -> Iterator[Batch]:
    """Ray Data stage: plan file URIs → plan rows, a few at a time."""
    storage.apply_env(env)
    for uri in batch["plan"]:
        f = pq.ParquetFile(pa.BufferReader(storage.read_bytes(str(uri))))
        for rb in f.iter_batches(batch_size=PLAN_ROWS_PER_BATCH):
            yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}


def start_ray_data_helpers() -> None:
    """Create Ray Data's three detached helper actors now rather than at its first execution.

    On a fresh (local) Ray each is a new process that imports Ray Data, and the executor blocks
    on the location tracker's first answer before the model actors start; created here, they
    boot while the dataset is built (first row 0.4 s sooner on 2 cores). On a long-lived cluster
    they exist already and this is a lookup. Private Ray Data API, so best effort only.
    """
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.execution.node_trackers.actor_location import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_actor_location_tracker()
        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as e:  # another Ray version: Ray Data creates them itself
        log.debug("Ray Data helper actors not started early: %s", e)


STATS_BLOCKS_KEPT = 64  # per map operator: the recent blocks Ray Data's end-of-run summary covers


class RecentStats(list):  # type: ignore[type-arg]
    """A list that keeps only its last ``STATS_BLOCKS_KEPT`` items (trimmed in steps of that many)."""

    def extend(self, items: Any) -> None:
        super().extend(items)
        if len(self) > 2 * STATS_BLOCKS_KEPT:
            del self[:-STATS_BLOCKS_KEPT]

    def append(self, item: Any) -> None:
        self.extend([item])


def cap_block_stats() -> None:
    """Bound the per-block stats Ray Data's map operators keep in the driver.

    Each operator appends one ``BlockStats`` (~1 KB with its exec stats) per output block for the
    whole run, read only by ``Dataset.stats()`` at the end: O(inputs) driver memory, the largest
    Python part of its growth (100k small inputs: ~10k blocks). The summary then covers the last
    blocks only; nothing else reads the list. Private Ray Data API, so best effort.
    """
    try:
        from ray.data._internal.execution.operators.map_operator import MapOperator
    except ImportError:
        return
    if getattr(MapOperator, "_aejob_recent_stats", False):
        return
    start = MapOperator.start

    def capped_start(self: Any, *args: Any, **kwargs: Any) -> None:
        start(self, *args, **kwargs)
        if type(getattr(self, "_output_blocks_stats", None)) is list:
            self._output_blocks_stats = RecentStats(self._output_blocks_stats)

    setattr(MapOperator, "start", capped_start)  # noqa: B010 (mypy: no assigning to a method)
    setattr(MapOperator, "_aejob_recent_stats", True)  # noqa: B010


def build_dataset(spec: JobSpec, plan: Plan, run_id: str, ap: ActorPlan) -> Any:
    """read → decode → model → encode → write, as one streaming Ray Data pipeline."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    start_ray_data_helpers()
    cap_block_stats()

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = _verbose()
    # Small blocks: Ray Data coalesces a stage's outputs up to target_max_block_size (128 MiB by
    # default), which turned a whole shard of decoded images into one block, one actor task and
    # one encode task in a row: no overlap of decode, inference and encode at all. At 1 MiB a
    # block is one or two model calls of small images (4 MiB held ~9 CBSD68 images, all encoded
    # after the actor's last call: 0.2 s more tail), and one image of ordinary photos.
    ctx.target_max_block_size = BLOCK_BYTES
    opts = spec.ray
    # CPU stages ask a different CPU amount than the actors so Ray does not fuse the decode into
    # the model actors (decode then runs in parallel with inference).
    stage_cpus = opts.cpu_stage_cpus if opts.cpu_stage_cpus != ap.cpus else ap.cpus / 2
    # One row per plan file (the driver holds file names, never units); workers read the plan.
    # (Not read_parquet: its listing task asks a whole CPU, which a 1-CPU node never frees.)
    ds: Any = ray.data.from_items([{"plan": f} for f in plan.files], override_num_blocks=len(plan.files))
    ds = ds.map_batches(read_plan, batch_size=1, batch_format="numpy", num_cpus=stage_cpus,
                        fn_kwargs={"env": storage.job_env()})
    ds = ds.map_batches(sources.read_units, batch_size=4, batch_format="numpy",
                        fn_kwargs={"image_column": spec.config.image_column, "env": storage.job_env()},
                        num_cpus=stage_cpus)
    ds = ds.map_batches(spec.prepare, batch_size=opts.batch_size, batch_format="numpy", num_cpus=stage_cpus)
    ds = ds.map_batches(
        spec.actor_cls,
        fn_constructor_kwargs={**spec.actor_kwargs, "threads": ap.threads, "batch_size": opts.batch_size,
                               "actor_cpus": ap.cpus, "pool_max": ap.max_size,
                               **({"calls": spec.actor_calls} if spec.actor_calls > 1 else {})},
        # actor pools restart crashed actors and retry their tasks by default (at-least-once;
        # parts are named by their keys and the publisher drops repeated keys). Concurrent calls
        # need true multi-threading: Ray Data otherwise runs one UDF call at a time per actor.
        compute=ActorPoolStrategy(min_size=ap.min_size, max_size=ap.max_size,
                                  max_concurrent_calls_per_actor=spec.actor_calls,
                                  enable_true_multi_threading=spec.actor_calls > 1),
        batch_size=opts.batch_size,
        batch_format="numpy",
        num_cpus=ap.cpus,
        num_gpus=opts.num_gpus or None,
    )
    ds = ds.map_batches(spec.post, batch_size=opts.batch_size, batch_format="numpy", num_cpus=stage_cpus)
    write: Any = sink.write_parts
    return ds.map_batches(write, batch_size=part_rows(opts.batch_size, smallest_store()), batch_format="numpy",
                          num_cpus=stage_cpus,
                          fn_kwargs={"dst": spec.dst, "run_id": run_id, "schema": spec.schema,
                                     "env": storage.job_env()})


def run_job(spec: JobSpec, progress: bool = True) -> JobResult:
    t0 = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    lease = layout.Lease(spec.dst, run_id=run_id)
    lease.acquire()
    run_tmp = storage.join(spec.dst, layout.TMP, run_id)
    plan = Plan()
    state: layout.DstState | None = None
    commit: Commit | None = None
    resources: dict[str, Any] = {}
    curve: list[list[float]] = []
    marks: dict[str, float] = {}  # ray_init_s; first_row_s: run start to the first row back at the driver
    status, reason = "succeeded", None
    try:
        state = layout.prepare(spec.dst, spec.fingerprint, spec.config.overwrite,  # commit side first
                               commit_mod.small_rows(spec.config.shard_size))
        plan = make_plan(spec, state.done, storage.join(run_tmp, "plan"))
        log.info("%s: %d units listed in %.1f s, %d already done, %d pending in %d shards",
                 spec.src, plan.units + plan.units_done, plan.seconds, plan.units_done, plan.units,
                 len(plan.shard_units))
        commit = Commit(spec, run_id, plan.shard_units, lease)
        if plan.shard_units:
            t_init = time.time()
            init_ray(spec.ray.address)
            marks["ray_init_s"] = round(time.time() - t_init, 3)  # connect, or start a local Ray
            cpus, gpus = cluster_resources()
            if cpus <= 0:
                raise RuntimeError("the Ray cluster has no CPUs (a head with num_cpus=0 and no worker "
                                   "nodes?): the job would wait forever")
            ap = actor_plan(spec.ray, cpus, gpus)
            resources = {"actors_min": ap.min_size, "actors_max": ap.max_size, "actor_cpus": ap.cpus,
                         "threads": ap.threads or "per node", "num_gpus": spec.ray.num_gpus,
                         "cluster_cpus": cpus, "cluster_gpus": gpus, "actor_calls": spec.actor_calls}
            log.info("actors: %s", resources)
            ds = build_dataset(spec, plan, run_id, ap)
            status, reason = _drain(ds, commit, spec, plan.units, progress, t0, curve, marks)
        sync = reconcile(spec, run_id, state, plan, commit)
        if state.small + commit.small >= commit_mod.AUTO_COMPACT_SHARDS:
            sync.update(commit_mod.compact(spec.dst, run_id, spec.config.shard_size, spec.ray.address))
    except BaseException as e:
        status, reason = "failed", f"{type(e).__name__}: {e}"
        lease.release()
        _finish(spec, run_id, t0, plan, state, commit, resources, curve, status, reason, {}, marks)
        raise
    try:  # the lease is ours: all of _tmp is this run's
        storage.delete(storage.join(spec.dst, layout.TMP))
    except OSError as e:
        log.warning("could not remove %s: %s", run_tmp, e)
    manifest = _finish(spec, run_id, t0, plan, state, commit, resources, curve, status, reason, sync, marks)
    lease.release()
    ok = status == "succeeded"
    return JobResult(ok=ok, manifest=manifest, exit_code=0 if ok else 1)


def _drain(ds: Any, commit: Commit, spec: JobSpec, n_units: int, progress: bool, t0: float,
           curve: list[list[float]], marks: dict[str, float] | None = None) -> tuple[str, str | None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not progress)
    limit = spec.config.max_error_rate
    last = 0.0
    with bar:
        task = bar.add_task(spec.job, total=n_units, info="")
        for meta in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            if marks is not None and "first_row_s" not in marks:
                marks["first_row_s"] = round(time.time() - t0, 3)
            commit.add(meta)
            commit.reap()
            ok, err = commit.seen["ok"], commit.seen["error"]
            bar.update(task, completed=commit.units_published, info=f"ok {ok} · error {err}")
            if time.time() - last >= PROGRESS_EVERY_S:
                last = time.time()
                malloc.release()
                curve.append([round(last - t0, 2), commit.counts["ok"] + commit.counts["error"]])
            if limit < 1.0 and ok + err >= 1000 and err / (ok + err) > limit:
                commit.reap(wait=True)
                return "failed", _rate_reason(err, ok + err, limit)
        commit.reap(wait=True)
        bar.update(task, completed=commit.units_published)
    curve.append([round(time.time() - t0, 2), commit.counts["ok"] + commit.counts["error"]])
    if commit.open:
        missing = sorted(commit.open)[:5]
        return "failed", f"{len(commit.open)} shards did not deliver all rows (e.g. {missing})"
    total = commit.counts["ok"] + commit.counts["error"]
    if limit < 1.0 and total and commit.counts["error"] / total > limit:
        return "failed", _rate_reason(commit.counts["error"], total, limit)
    return "succeeded", None


def _rate_reason(err: int, total: int, limit: float) -> str:
    return (f"error rate {err}/{total} = {err / total:.3f} exceeds --max-error-rate {limit}; "
            "stopped, rows already written are kept")


def _finish(spec: JobSpec, run_id: str, t0: float, plan: Plan, state: layout.DstState | None,
            commit: Commit | None, resources: dict[str, Any], curve: list[list[float]],
            status: str, reason: str | None, sync: dict[str, int],
            marks: dict[str, float] | None = None) -> dict[str, Any]:
    elapsed = time.time() - t0
    counts = commit.counts if commit else {}
    rows = counts.get("ok", 0) + counts.get("error", 0)
    before = state.totals if state else {"rows": 0, "ok": 0, "error": 0}
    republished = len(commit.names & set(state.done.shard_names)) if commit and state else 0
    dataset = {
        "shards": (state.shards if state else 0) + (commit.published if commit else 0) - republished
        - sync.get("shards_deleted", 0),
        "rows": before["rows"] + rows - sync.get("rows_removed", 0),
        "ok": before["ok"] + counts.get("ok", 0) - sync.get("ok_removed", 0),
        "error": before["error"] + counts.get("error", 0) - sync.get("error_removed", 0),
    }
    manifest = {
        "job": spec.job,
        "run_id": run_id,
        "status": status,
        "reason": reason,
        "aejob_version": package_version(),
        "src": spec.src,
        "dst": spec.dst,
        "config": spec.resolved,
        "fingerprint": spec.fingerprint,
        "model": spec.model_info,
        "ray": {**asdict(spec.ray), **resources},
        "counts": {
            "units_listed": plan.units + plan.units_done,
            "units_pending": plan.units,
            # the sync view of this run, in units (files or containers)
            "new": plan.new,
            "changed": plan.changed,
            "unchanged": plan.units_done,
            "deleted": sync.get("deleted", 0),
            "gone_not_deleted": sync.get("gone", 0) - sync.get("deleted", 0),
            "failed": counts.get("error", 0),
            "shards_compacted": sync.get("shards_removed", 0),
            "shards_published": commit.published if commit else 0,
            "rows_ok": counts.get("ok", 0),
            "rows_error": counts.get("error", 0),
            "skipped_files": plan.stats.skipped,
            "skipped_members": counts.get("skipped_members", 0),
            "duplicates_dropped": counts.get("duplicates_dropped", 0),
            "bytes_written": counts.get("bytes", 0),
        },
        "writers": commit.writers if commit else {},
        "dataset": dataset,
        "progress": curve,
        "timings": {
            "list_s": round(plan.seconds, 3),
            **(marks or {}),
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
